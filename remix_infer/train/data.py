"""Supervised fine-tuning data: JSONL of {"prompt", "completion"} records, tokenized into batches."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss there


@dataclass
class Example:
    prompt: str
    completion: str
    domain: int | None = None  # the LoRA that hard domain routing sends it to (--domain-routing)


def jsonl_records(path: str | os.PathLike, fields: str) -> Iterator[tuple[str, dict]]:
    """(where, record) of each non-empty line of a JSONL file, `where` being 'FILE:LINE' for
    error messages; refuses a missing file, bad JSON and non-objects (`fields`: what an object
    should hold, for the message)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected an object with {fields}")
        yield f"{path}:{lineno}", record


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read prompt/completion records; errors name the file, the line and the field."""
    examples = []
    for where, record in jsonl_records(path, "'prompt' and 'completion'"):
        for field in ("prompt", "completion"):
            if not isinstance(record.get(field), str):
                raise ValueError(f"{where}: field '{field}' must be a string")
        domain = record.get("domain")
        if domain is not None and (
            not isinstance(domain, int) or isinstance(domain, bool) or domain < 0
        ):
            raise ValueError(f"{where}: field 'domain' must be a LoRA index (an integer >= 0)")
        examples.append(Example(record["prompt"], record["completion"], domain))
    if not examples:
        raise ValueError(f"{path}: no records")
    return examples


def write_jsonl(path: str | os.PathLike, examples: list[Example]) -> None:
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "completion": ex.completion}) + "\n")


@dataclass
class TokenizedData:
    """Right-padded token tensors for a whole dataset (small enough to keep in memory)."""

    input_ids: torch.Tensor  # [N, S]
    attention_mask: torch.Tensor  # [N, S]
    labels: torch.Tensor  # [N, S], IGNORE_INDEX on prompt and padding
    domains: torch.Tensor | None = None  # [N] each example's domain, -1 where it has none

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows `index`, trimmed to the longest sequence among them."""
        length = int(self.attention_mask[index].sum(-1).max())
        rows = {
            "input_ids": self.input_ids[index, :length],
            "attention_mask": self.attention_mask[index, :length],
            "labels": self.labels[index, :length],
        }
        if self.domains is not None:
            rows["domains"] = self.domains[index]
        return rows


def tokenize(tokenizer, examples: list[Example], max_length: int) -> TokenizedData:  # noqa: ANN001
    """BOS + prompt + completion + EOS; the loss covers the completion and EOS only."""
    rows = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = (bos + prompt + completion + [tokenizer.eos_token_id])[:max_length]
        labels = (
            [IGNORE_INDEX] * (len(bos) + len(prompt)) + completion + [tokenizer.eos_token_id]
        )[:max_length]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(labs)] = torch.tensor(labs)
    domains = None
    if any(ex.domain is not None for ex in examples):
        domains = torch.tensor([-1 if ex.domain is None else ex.domain for ex in examples])
    return TokenizedData(input_ids, attention_mask, labels, domains)


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each sequence's labelled tokens: [B, S, V] -> [B]."""
    targets = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counted = (targets != IGNORE_INDEX).sum(-1).clamp_min(1)
    return token_loss.sum(-1) / counted
