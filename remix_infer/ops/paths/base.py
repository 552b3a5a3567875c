"""The interface of a pool's execution paths, and the small pieces several paths share.

A RemixPool (ops/pool.py) holds the weights, the layout, the statistics and the token slots; its
path (one class per way of running it, like vLLM's PunicaWrapperBase and its GPU and CPU
wrappers) holds what only that way needs (prepared products, tickets, per-slot copies) and runs
the forward. A path reads the pool's tensors by reference, so a slot loaded into the pool is seen
after `refresh_fold` / `refresh_products`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from remix_infer.ops.pool import PoolLayout, RemixPool

Gemm = Callable[[torch.Tensor], torch.Tensor]
Reduce = Callable[[torch.Tensor], torch.Tensor]


class PoolPath(nn.Module):
    """One way of running a pool: how its part of the one GEMM's weight is laid out
    (`fold_weight`, `refresh_fold`), what it prepares (`prepare`, `refresh_products`) and its
    forward. A module so that its buffers follow the pool's device; holds no parameters."""

    # grouped: each slot's products on its own tokens only (nothing of the pool's in the GEMM)
    grouped = False

    def __init__(self, pool: RemixPool) -> None:
        super().__init__()
        self._pool = (pool,)  # a tuple: the pool owns this path, not the other way round

    @property
    def pool(self) -> RemixPool:
        return self._pool[0]

    def fold_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The one GEMM's weight from the base weight [d_out, d_in]."""
        raise NotImplementedError

    def refresh_fold(self, folded: torch.Tensor, slot: int | None = None) -> None:
        """Rewrite the pool's part of `folded` in place after the pool's tensors changed (slot:
        only that slot's changed; None: any)."""
        raise NotImplementedError

    def prepare(self, make_gemm: Callable[[torch.Tensor], Gemm]) -> None:
        """Pick the kernels of the path's own products for the current weights (none here)."""

    def refresh_products(self, slot: int | None = None) -> None:
        """After the pool's tensors changed in place (slot: only that slot's; None: any):
        refresh what `prepare` made (none here)."""

    def forward(self, x: torch.Tensor, gemm: Gemm, reduce: Reduce | None) -> torch.Tensor:
        """x [T, d_in] -> base product + ReMix term [T, d_out] (see RemixPool.forward)."""
        raise NotImplementedError


def refresh_prepacked(products: Iterable[Gemm]) -> None:
    """Refresh the prepacked copies among `products` (a gemm with a `refresh()` method), after
    the weights they were made from changed in place."""
    for product in products:
        if hasattr(product, "refresh"):
            product.refresh()


def narrow_rows(pool: RemixPool, with_router: bool) -> list[torch.Tensor]:
    """The pool's rows that ride on a product of x: [A ; A0 (; P)], every slot's."""
    rows = [pool.lora_a]
    if pool.always_a is not None:
        rows.append(pool.always_a)
    if with_router:
        rows.append(pool.router)
    return rows


def add_router_bias(
    pool: RemixPool, logits: torch.Tensor, slots: torch.Tensor | None
) -> torch.Tensor:
    """logits [T, S, n] + each token's own slot's router bias (slot 0's for base-model tokens,
    whose gates are zeroed later); the logits as they are without a bias."""
    if pool.router_bias is None:
        return logits
    c, s, n = pool.layout.num_slots, pool.layout.num_parts, pool.layout.num_loras
    bias = pool.router_bias.view(c, s, n)
    return logits + (bias[0] if c == 1 else bias[slots.clamp(min=0)])


def always_hidden(
    layout: PoolLayout, always_h: torch.Tensor, slots: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The always-on LoRAs' hidden states [T, C*S*r0] -> part-major [S, T, C*r0]: each token's
    in its own slot's columns, zero elsewhere and for base-model tokens."""
    c, s, r0 = layout.num_slots, layout.num_parts, layout.always_rank
    tokens = always_h.shape[0]
    by_part = always_h.reshape(tokens, c, s, r0).permute(2, 0, 1, 3)  # [S, T, C, r0]
    if slots is not None:
        owner = F.one_hot(slots.clamp(min=0), c) * (slots >= 0)[:, None]
        by_part = by_part * owner.to(by_part.dtype)[None, :, :, None]
    return by_part.reshape(s, tokens, c * r0).to(dtype)


def numba_route(
    pool: RemixPool,
    logits: torch.Tensor,
    lora_h: torch.Tensor,
    slots: torch.Tensor | None,
    router_bias: torch.Tensor | None = None,
    extra_columns: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated hidden states [S, T, n*r + extra_columns] (the gated ones first, the others left for
    the caller to fill) and top-k [T, S, k] from ONE compiled call (cpu_route.py; numba is
    imported only by the paths that run it). logits [T, S, n] or [T, S*n]; router_bias: added
    to each token's own slot's logits there (None: none, or added already)."""
    from remix_infer.ops.cpu_route import route_cpu

    layout = pool.layout
    tokens, s = logits.shape[0], layout.num_parts
    hidden = lora_h.new_empty(s, tokens, layout.num_loras * layout.rank + extra_columns)
    selected = torch.empty(tokens, s, layout.top_k, dtype=torch.long)
    route_cpu(
        logits, lora_h, router_bias, hidden, selected, pool.stats, pool.step_selected,
        layout.top_k, layout.omega, layout.weighting == "softmax_topk", slots,
    )  # fmt: skip
    return hidden, selected
