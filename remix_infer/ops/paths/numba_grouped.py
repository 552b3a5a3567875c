"""The grouped CPU path ("numba" with the engine's token slots, one slot or several): the GEMM is
the base product alone, and each slot's A, router and B products run on that slot's tokens only
(the adapter FLOPs of one checkpoint, none for base-model tokens); routing is ONE numba call.
Each slot's narrow rows [A ; A0 ; P] wait in `slot_narrow`, one product per slot (ops/slots.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from remix_infer.ops.paths.base import (
    Gemm,
    PoolPath,
    Reduce,
    add_router_bias,
    narrow_rows,
    numba_route,
)
from remix_infer.ops.slots import add_slot_b_products, own_slot_products

if TYPE_CHECKING:
    from remix_infer.ops.pool import RemixPool


class NumbaGroupedPath(PoolPath):
    """fold_router: the router rows ride on each slot's narrow product (float32, own routers)."""

    grouped = True

    def __init__(self, pool: RemixPool, fold_router: bool) -> None:
        super().__init__(pool)
        layout = pool.layout
        self.fold_router = fold_router
        s, n, r, r0 = layout.num_parts, layout.num_loras, layout.rank, layout.always_rank
        rows = s * n * r + s * r0 + (s * n if fold_router else 0)
        like = pool.lora_a
        self.register_buffer(
            "slot_narrow",
            torch.zeros(layout.num_slots, rows, layout.in_features, dtype=like.dtype,
                        device=like.device),
            persistent=False,
        )  # fmt: skip
        self._b_bounds = layout.adapted_column_bounds()  # where the B products add

    def fold_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight itself: the pool's rows wait in slot_narrow."""
        self.refresh_fold(weight)
        return weight

    @torch.no_grad()
    def refresh_fold(self, folded: torch.Tensor, slot: int | None = None) -> None:
        c, d_in = self.pool.layout.num_slots, self.pool.layout.in_features
        slots = slice(None) if slot is None else slice(slot, slot + 1)
        narrow = [t.view(c, -1, d_in)[slots] for t in narrow_rows(self.pool, self.fold_router)]
        self.slot_narrow[slots] = torch.cat(narrow, 1)

    def forward(self, x: torch.Tensor, gemm: Gemm, reduce: Reduce | None) -> torch.Tensor:
        pool = self.pool
        layout = pool.layout
        groups = pool.slots
        slots = groups.current(x.shape[0])
        base, narrow = gemm(x), x.new_empty(x.shape[0], self.slot_narrow.shape[1])
        own_slot_products(x, groups.order, groups.counts, self.slot_narrow, narrow)
        width = layout.slot_width  # each token's own slot's products
        a_width = width + layout.num_parts * layout.always_rank
        lora_h, always_h = narrow[:, :width], narrow[:, width:a_width]
        logits = narrow[:, a_width:] if self.fold_router else F.linear(x.float(), pool.router)
        if reduce is not None:
            lora_h, logits = reduce(lora_h.contiguous()), reduce(logits.contiguous())
            always_h = reduce(always_h.contiguous()) if layout.always_rank else always_h
        logits = logits.unflatten(-1, (layout.num_parts, layout.num_loras))
        logits = add_router_bias(pool, logits, slots)
        hidden, selected = numba_route(pool, logits, lora_h, slots)
        if pool.capture_selections:
            pool.capture(selected, slots)
        return self.add_slot_b_products(base, hidden, always_h)

    def add_slot_b_products(
        self, base: torch.Tensor, hidden: torch.Tensor, always_h: torch.Tensor
    ) -> torch.Tensor:
        """base + each token's own slot's B products, in place ([S, T, n*r] gated hidden
        states; always-on ones [T, S*r0], ungated)."""
        pool = self.pool
        layout = pool.layout
        if not pool.count_b:  # another rank adds B; vLLM all-reduces this: needs it dense
            return base.contiguous()
        always = None
        if layout.always_rank:
            always = always_h.view(-1, layout.num_parts, layout.always_rank).transpose(0, 1)
        groups = pool.slots
        add_slot_b_products(
            base, groups.order, groups.counts, hidden, list(pool.lora_b), always,
            list(pool.always_b), self._b_bounds,
        )  # fmt: skip
        return base
