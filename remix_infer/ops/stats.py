"""Routing statistics, accumulated on the device inside the forward, and their row layout.

Each adapted projection keeps one float64 buffer `stats` [C*S, n + 3], one row per checkpoint slot
(ops/slots.py; C = 1 without slots) and adapted part, slot-major:

    row[:n]        selections of each LoRA (a token choosing k LoRAs adds 1 to k of them)
    row[TOKENS]    tokens routed                                   (TOKENS = n)
    row[ENTROPY]   summed router entropy, nats: H(softmax(logits))  (ENTROPY = n + 1)
    row[ESS]       summed effective support size of the routing weights, (sum w)^2 / sum w^2:
                   exactly k per token for ReMix's constant weights, lower when softmax_topk
                   weights collapse                                 (ESS = n + 2)

`StatsRow` reads one row by these names; the engine writes it here and the server reads it with
the same class. A second buffer, `step_selected` [max tokens per step, S, n] (uint8), keeps the
latest forward's per-token selections, so that requests can be given their own routing.

Padding rows (a CUDA graph's batch padded to its captured size) are not tokens. The engine says
which rows they are through `set_padding_provider`, read when the op runs, not when it is traced,
so compiled graphs see the mask of each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from remix_infer.ops.custom_op import remix_op
from remix_infer.routing import effective_loras

EXTRA_COLUMNS = 3  # tokens, entropy sum, ESS sum


def stats_width(num_loras: int) -> int:
    return num_loras + EXTRA_COLUMNS


@dataclass(frozen=True)
class StatsRow:
    """One part's accumulated row, by name."""

    selections: list[float]
    tokens: float
    entropy_sum: float
    ess_sum: float

    @classmethod
    def parse(cls, row: list[float]) -> StatsRow:
        n = len(row) - EXTRA_COLUMNS
        return cls(list(row[:n]), row[n], row[n + 1], row[n + 2])


# What the server's /metrics and `remix-train analyze` report about a module, from its row.
def routing_figures(row: StatsRow) -> dict[str, float]:
    """Derived figures of one module's accumulated counters."""
    tokens = row.tokens
    in_use = float(effective_loras(torch.tensor(row.selections))) if sum(row.selections) else 0.0
    return {
        "tokens": tokens,
        "effective_loras": in_use,
        "router_entropy": row.entropy_sum / tokens if tokens else 0.0,
        "ess": row.ess_sum / tokens if tokens else 0.0,
    }


def is_collapsed(figures: dict[str, float], top_k: int) -> bool:
    """A module has collapsed when its traffic uses fewer distinct LoRAs than each token selects,
    or its routing weights concentrate (ESS below the midpoint between 1 and k)."""
    if not figures["tokens"]:
        return False
    return figures["effective_loras"] < top_k or (top_k > 1 and figures["ess"] < (top_k + 1) / 2)


_padding_provider: Callable[[], torch.Tensor | None] = lambda: None  # noqa: E731


def set_padding_provider(provider: Callable[[], torch.Tensor | None]) -> None:
    """provider() -> bool [T] (True = padding row) for the forward being run, or None."""
    global _padding_provider
    _padding_provider = provider


@contextmanager
def padding_rows(mask: torch.Tensor | None) -> Iterator[None]:
    """Run forwards with this padding mask (bool [T]), the engine's provider restored after."""
    saved = _padding_provider
    set_padding_provider(lambda: mask)
    try:
        yield
    finally:
        set_padding_provider(saved)


def padding_mask(num_rows: int) -> torch.Tensor | None:
    """The current forward's padding mask when it covers these rows, else None."""
    padding = _padding_provider()
    return padding if padding is not None and padding.shape[0] == num_rows else None


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


@remix_op("accumulate_figures", mutates_args=("stats", "step_selected"))
def accumulate_figures(
    stats: torch.Tensor,
    step_selected: torch.Tensor,
    figures: torch.Tensor,
    slots: torch.Tensor | None = None,
) -> None:
    """stats [C*S, n+3] += figures [T, S, n+3] summed over real rows (not padding, not the base
    model) into each token's slot's rows (slots [T], None: all slot 0);
    step_selected[:T] = this forward's selections."""
    real = padding_mask(figures.shape[0])
    real = None if real is None else ~real
    if slots is not None:
        real = slots >= 0 if real is None else real & (slots >= 0)
    if real is not None:  # where, not a product: a base token's ESS is 0/0
        figures = torch.where(real[:, None, None], figures, 0)
    num_slots = stats.shape[0] // figures.shape[1]
    if num_slots == 1:
        stats += figures.sum(0)
    else:
        stats.view(num_slots, -1).index_add_(
            0, slots.clamp(min=0), figures.flatten(1).to(stats.dtype)
        )
    rows = min(figures.shape[0], step_selected.shape[0])
    step_selected[:rows] = figures[:rows, :, : step_selected.shape[-1]]


def record_routing(
    stats: torch.Tensor,
    step_selected: torch.Tensor,
    logits: torch.Tensor,
    gates: torch.Tensor,
    constant_k: int | None,
    slots: torch.Tensor | None = None,
) -> None:
    """Add one forward's routing (logits and gates [T, S, n], each token's own slot's; gates
    zero for base-model tokens) to the buffers."""
    accumulate_figures(stats, step_selected, per_token_figures(logits, gates, constant_k), slots)
