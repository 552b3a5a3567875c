"""Routing statistics accumulated on the device inside the engine's forward.

Each adapted (part of a) projection keeps one float64 buffer `stats` of shape [S, n + 3]:

    stats[s, :n]   selections of each LoRA (a token choosing k LoRAs adds 1 to k of them)
    stats[s, n]    tokens routed
    stats[s, n+1]  summed router entropy, nats: H(softmax(logits)) per token
    stats[s, n+2]  summed effective support size of the routing weights, ESS = (sum w)^2 / sum w^2
                   (exactly k per token for ReMix's constant weights; lower when softmax_topk
                   weights collapse)

A second buffer, `step_selected` [max tokens per step, S, n] (uint8), keeps the latest forward's
per-token selections, so that the worker can attribute them to the requests of that step (see
worker.py; only when a request asked for its routing summary).

The per-token figures are plain tensor code (fused by torch.compile in compiled mode); only the
writes into the buffers are a custom op, which mutates them (so compiled graphs keep it) and reads
vLLM's padding mask (CUDA-graph padding rows are not tokens). Nothing syncs with the host.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.forward_context import get_forward_context, is_forward_context_available

EXTRA_COLUMNS = 3  # tokens, entropy sum, ESS sum


def per_token_figures(
    logits: torch.Tensor, gates: torch.Tensor, constant_k: int | None
) -> torch.Tensor:
    """[T, S, n + 3]: selected (0/1) per LoRA, 1 (a token), router entropy, ESS of the weights.

    constant_k: for constant weights the ESS is k by construction and is not recomputed.
    """
    entropy = torch.special.entr(torch.softmax(logits, -1)).sum(-1, keepdim=True)
    if constant_k is None:  # over the n gates equals over the k weights: zeros add nothing
        ess = gates.sum(-1, keepdim=True) ** 2 / (gates * gates).sum(-1, keepdim=True)
    else:
        ess = torch.full_like(entropy, constant_k)
    return torch.cat(
        [(gates != 0).to(logits.dtype), torch.ones_like(entropy), entropy, ess], dim=-1
    )


def accumulate_impl(
    stats: torch.Tensor, step_selected: torch.Tensor, figures: torch.Tensor
) -> None:
    """stats [S, n+3] += figures [T, S, n+3] summed over real (non-padding) tokens;
    step_selected[:T] = this forward's selections."""
    padding = get_forward_context().is_padding if is_forward_context_available() else None
    if padding is not None and padding.shape[0] == figures.shape[0]:
        figures = figures * (~padding).to(figures.dtype)[:, None, None]
    stats += figures.sum(0)
    rows = min(figures.shape[0], step_selected.shape[0])
    step_selected[:rows] = figures[:rows, :, : step_selected.shape[-1]]


def _accumulate_fake(
    stats: torch.Tensor, step_selected: torch.Tensor, figures: torch.Tensor
) -> None:
    return None


def _register_op() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        op_name="remix_accumulate_routing",
        op_func=accumulate_impl,
        mutates_args=["stats", "step_selected"],
        fake_impl=_accumulate_fake,
    )


_register_op()


class RoutingCounters(nn.Module):
    """The stats buffer of one adapter and the call that updates it."""

    def __init__(
        self,
        name: str,
        num_parts: int,
        num_loras: int,
        constant_k: int | None,
        max_step_tokens: int,
    ) -> None:
        super().__init__()
        self.name = name
        self.constant_k = constant_k
        self.register_buffer(
            "stats", torch.zeros(num_parts, num_loras + EXTRA_COLUMNS, dtype=torch.float64)
        )
        self.register_buffer(
            "step_selected",
            torch.zeros(max_step_tokens, num_parts, num_loras, dtype=torch.uint8),
            persistent=False,
        )

    def record(self, logits: torch.Tensor, gates: torch.Tensor) -> None:
        """logits and gates [T, S, n]."""
        figures = per_token_figures(logits, gates, self.constant_k)
        # Compiled graphs need the op (opaque, declared to mutate stats); eager mode calls the
        # function directly and skips the dispatcher's overhead.
        if torch.compiler.is_compiling():
            torch.ops.vllm.remix_accumulate_routing(self.stats, self.step_selected, figures)
        else:
            accumulate_impl(self.stats, self.step_selected, figures)

    def reset(self) -> None:
        self.stats.zero_()
