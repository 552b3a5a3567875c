"""Supervised fine-tuning data, tokenized into batches.

Records are {"prompt", "completion"} (the loss on the completion) or chat {"messages": [{"role",
"content"}, ...]} (formatted with the tokenizer's chat template, the loss on the assistant
turns), from a JSONL file, a Parquet file, a folder written by `datasets`' save_to_disk, or a
Hugging Face hub dataset already in the local cache (read offline).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss there
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    prompt: str
    completion: str
    domain: int | None = None  # the LoRA that hard domain routing sends it to (--domain-routing)
    messages: list[dict[str, str]] | None = None  # a chat record (then prompt, completion: "")


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


def example_from_record(record: dict, where: str) -> Example:
    """One training record (prompt/completion or chat messages, and an optional domain) as an
    Example; a bad record is refused naming `where` and the field."""
    domain = record.get("domain")
    if domain is not None and (
        not isinstance(domain, int) or isinstance(domain, bool) or domain < 0
    ):
        raise ValueError(f"{where}: field 'domain' must be a LoRA index (an integer >= 0)")
    if record.get("messages") is not None:
        return Example("", "", domain, chat_messages(record["messages"], where))
    for field in ("prompt", "completion"):
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: field '{field}' must be a string")
    return Example(record["prompt"], record["completion"], domain)


def chat_messages(messages: object, where: str) -> list[dict[str, str]]:
    """The 'messages' of a chat record: {role, content} strings with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise ValueError(f"{where}: field 'messages[{i}].role' must be one of {CHAT_ROLES}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: field 'messages[{i}].content' must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: field 'messages' has no assistant turn to learn")
    return out


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read training records; errors name the file, the line and the field."""
    fields = "'prompt' and 'completion' or 'messages'"
    return non_empty(
        [example_from_record(r, where) for where, r in jsonl_records(path, fields)], path
    )


def non_empty(examples: list[Example], source: str | os.PathLike) -> list[Example]:
    if not examples:
        raise ValueError(f"{source}: no records")
    return examples


def read_examples(source: str | os.PathLike, split: str = "train") -> list[Example]:
    """Training records from a JSONL file, a Parquet file, a save_to_disk folder (its `split`
    if it holds several) or a hub dataset name in the local cache (its `split`)."""
    path = Path(source)
    if path.is_dir():
        return read_saved_dataset(path, split)
    if path.suffix == ".parquet":
        return read_parquet(path)
    if path.is_file() or path.suffix in (".jsonl", ".json"):
        return read_jsonl(path)  # a missing .jsonl is "not found", not a hub name
    return read_hub_dataset(str(source), split)


def read_parquet(path: Path) -> list[Example]:
    """Rows of a Parquet file (row numbers from 0 in errors)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001  pyarrow raises several kinds for a broken file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    return non_empty([example_from_record(r, f"{path}: row {i}") for i, r in enumerate(rows)], path)


def read_saved_dataset(path: Path, split: str) -> list[Example]:
    """A folder written by datasets' save_to_disk: a Dataset, or a DatasetDict's `split`."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: not a folder written by datasets' save_to_disk") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{path}: no split '{split}' (it has {sorted(data)})")
        data = data[split]
    return dataset_examples(data, f"{path} [{split}]")


def read_hub_dataset(name: str, split: str) -> list[Example]:
    """A hub dataset from the local cache only: offline, whatever the environment says."""
    import datasets
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001  datasets raises many kinds for a missing dataset
        raise ValueError(
            f"{name}: not a data file, a save_to_disk folder, or a hub dataset in the local "
            f"cache with split '{split}' ({type(e).__name__})"
        ) from None
    return dataset_examples(data, f"{name} [{split}]")


def dataset_examples(data: object, where: str) -> list[Example]:  # data: a datasets.Dataset
    return non_empty(
        [example_from_record(r, f"{where}: row {i}") for i, r in enumerate(data)], where
    )


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
    truncated: int = 0  # examples cut at max_length

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


def completion_tokens(tokenizer, ex: Example) -> tuple[list[int], list[int]]:  # noqa: ANN001
    """BOS + prompt + completion + EOS; the loss covers the completion and EOS only."""
    prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + prompt + completion + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt)) + completion + [tokenizer.eos_token_id]
    return ids, labels


def chat_tokens(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:  # noqa: ANN001
    """The conversation through the tokenizer's chat template; the loss covers each assistant
    turn (its content and the template's end of turn), not its header nor the other turns.
    A turn's tokens are the difference between the rendering up to it (with the generation
    prompt: the header) and through it, so the template must render prefixes as prefixes."""

    def render(turns: list[dict[str, str]], header: bool = False) -> list[int]:
        if not turns and not header:
            return []
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=header)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = render(messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = render(messages[:i], header=True), render(messages[: i + 1])
        if ids[: len(end)] != end or end[: len(start)] != start:
            raise ValueError("the chat template does not render a conversation's turns in order")
        labels[len(start) : len(end)] = end[len(start) :]
    return ids, labels


def example_tokens(tokenizer, ex: Example, index: int) -> tuple[list[int], list[int]]:  # noqa: ANN001
    if ex.messages is None:
        return completion_tokens(tokenizer, ex)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"record {index} is a chat record, but the tokenizer has no chat template")
    try:
        return chat_tokens(tokenizer, ex.messages)
    except ValueError as e:
        raise ValueError(f"record {index}: {e}") from None


def tokenize(tokenizer, examples: list[Example], max_length: int) -> TokenizedData:  # noqa: ANN001
    """Token ids and labels of every example (completion_tokens, chat_tokens), cut at
    max_length; the log says how many were cut."""
    rows = []
    truncated = lost = 0
    for index, ex in enumerate(examples):
        ids, labels = example_tokens(tokenizer, ex, index)
        if len(ids) > max_length:
            truncated += 1
            lost += all(label == IGNORE_INDEX for label in labels[:max_length])
        rows.append((ids[:max_length], labels[:max_length]))
    if truncated:
        log.warning(
            "--max-length %d: %d of %d examples truncated (%d of them kept no loss tokens)",
            max_length, truncated, len(examples), lost,
        )  # fmt: skip
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
    return TokenizedData(input_ids, attention_mask, labels, domains, truncated)


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each sequence's labelled tokens: [B, S, V] -> [B]."""
    targets = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counted = (targets != IGNORE_INDEX).sum(-1).clamp_min(1)
    return token_loss.sum(-1) / counted
