"""The reference PyTorch model's answers, for comparison with the engine."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from remix_infer.modeling import routing_selections


@dataclass
class ReferenceRun:
    tokens: list[int]  # greedy continuation
    selections: dict[str, torch.Tensor]  # per module: top-k of each prompt token [len, k]
    prompt_logprobs: torch.Tensor  # log p(prompt[i] | prompt[:i]) for i >= 1
    # per module: top-k of every token of prompt + continuation [len + max_tokens, k]
    sequence_selections: dict[str, torch.Tensor]
    # the smallest gap between the greedy token's logit and the runner-up's over the
    # continuation: an engine's float32 sums in another order can flip a near-tie
    margin: float


@torch.no_grad()
def reference_run(model: torch.nn.Module, prompt: list[int], max_tokens: int = 8) -> ReferenceRun:
    """Greedy decoding by full forwards (no KV cache: the plainest possible oracle)."""
    ids = torch.tensor([prompt])
    logits = model(input_ids=ids).logits[0]
    selections = {name: sel[0] for name, sel in routing_selections(model).items()}
    logprobs = torch.log_softmax(logits[:-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    tokens, margin = [], float("inf")
    for _ in range(max_tokens):
        top = logits[-1].topk(2)
        margin = min(margin, float(top.values[0] - top.values[1]))
        nxt = int(logits[-1].argmax())
        tokens.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        logits = model(input_ids=ids).logits[0]
    sequence = {name: sel[0] for name, sel in routing_selections(model).items()}
    return ReferenceRun(tokens, selections, logprobs, sequence, margin)


@torch.no_grad()
def plain_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int = 8) -> list[int]:
    """Greedy continuation of a model without adapters (the base model), by full forwards."""
    ids = torch.tensor([prompt])
    for _ in range(max_tokens):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt) :].tolist()


def distinct_variants(
    source: Path,
    out: Path,
    count: int,
    prompts: list[list[int]],
    max_tokens: int,
    lora_b_noise: float,
    min_margin: float,
    readable: Callable[[int], bool] = lambda token: True,
) -> dict[str, list[list[int]]]:
    """`count` router variants of the checkpoint at `source` (helpers.models.router_variant
    with lora_b_noise), saved as out/c00, out/c01, ..., that answer apart: each one's greedy
    answers to `prompts` differ from every other's in at least one prompt, and every greedy
    token leads its runner-up by min_margin (so an engine agrees with the reference) and is
    `readable`. Seeds 1, 2, ... are tried in turn. Returns {name: reference tokens per prompt}."""
    from helpers.models import router_variant

    from remix_infer.modeling import load_remix_model

    answers: dict[str, list[list[int]]] = {}
    seen: set[tuple[tuple[int, ...], ...]] = set()
    candidate = out / ".candidate"  # hidden: a --checkpoint-dir never lists it
    for seed in range(1, 16 * count + 1):
        shutil.rmtree(candidate, ignore_errors=True)
        router_variant(source, candidate, seed=seed, lora_b_noise=lora_b_noise)
        model = load_remix_model(candidate)[0]
        runs = [reference_run(model, ids, max_tokens) for ids in prompts]
        key = tuple(tuple(run.tokens) for run in runs)
        sharp = min(run.margin for run in runs) >= min_margin
        if key in seen or not sharp or not all(map(readable, sum(key, ()))):
            continue
        name = f"c{len(answers):02d}"
        candidate.rename(out / name)
        seen.add(key)
        answers[name] = [run.tokens for run in runs]
        if len(answers) == count:
            return answers
    shutil.rmtree(candidate, ignore_errors=True)
    raise AssertionError(f"{len(answers)} of {count} distinct variants of {source} found")
