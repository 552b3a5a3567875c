"""The reference PyTorch model's answers, for comparison with the engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from remix_infer.modeling import routing_selections


@dataclass
class ReferenceRun:
    tokens: list[int]  # greedy continuation
    selections: dict[str, torch.Tensor]  # per module: top-k of each prompt token [len, k]
    prompt_logprobs: torch.Tensor  # log p(prompt[i] | prompt[:i]) for i >= 1
    # per module: top-k of every token of prompt + continuation [len + max_tokens, k]
    sequence_selections: dict[str, torch.Tensor]


@torch.no_grad()
def reference_run(model: torch.nn.Module, prompt: list[int], max_tokens: int = 8) -> ReferenceRun:
    """Greedy decoding by full forwards (no KV cache: the plainest possible oracle)."""
    ids = torch.tensor([prompt])
    logits = model(input_ids=ids).logits[0]
    selections = {name: sel[0] for name, sel in routing_selections(model).items()}
    logprobs = torch.log_softmax(logits[:-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    tokens = []
    for _ in range(max_tokens):
        nxt = int(logits[-1].argmax())
        tokens.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        logits = model(input_ids=ids).logits[0]
    sequence = {name: sel[0] for name, sel in routing_selections(model).items()}
    return ReferenceRun(tokens, selections, logprobs, sequence)


@torch.no_grad()
def plain_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int = 8) -> list[int]:
    """Greedy continuation of a model without adapters (the base model), by full forwards."""
    ids = torch.tensor([prompt])
    for _ in range(max_tokens):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt) :].tolist()
