"""The grouped CPU path ("numba" with the engine's token slots, one slot or several): the GEMM is
the base product alone, and each slot's A, router and B products run on that slot's tokens only
(the adapter FLOPs of one checkpoint, none for base-model tokens); routing is ONE numba call.

Each slot's narrow rows [A ; A0 ; P] wait in `slot_narrow`, and each part's [B | B0] in
`slot_b<j>`, so that every product is one GEMM of the binding's kernel (`prepare(make_gemm)`:
in vLLM oneDNN with prepacked weights, the base GEMM's own library), which ops/slots.py's
grouped ops run on each slot's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from remix_infer.ops.paths.base import (
    Gemm,
    PoolPath,
    Reduce,
    narrow_rows,
    numba_route,
    refresh_prepacked,
)
from remix_infer.ops.slots import add_slot_b_products, own_slot_products, register_products

if TYPE_CHECKING:
    from remix_infer.ops.pool import RemixPool


class NumbaGroupedPath(PoolPath):
    """The router rows ride on each slot's narrow product (numba serves float32, and the shared
    routing scope is never grouped, so every pool here has its own router in float32)."""

    grouped = True

    def __init__(self, pool: RemixPool) -> None:
        super().__init__(pool)
        layout = pool.layout
        s, n, r, r0 = layout.num_parts, layout.num_loras, layout.rank, layout.always_rank
        c, like = layout.num_slots, pool.lora_a

        def buffer(name: str, *shape: int) -> None:
            zeros = torch.zeros(*shape, dtype=like.dtype, device=like.device)
            self.register_buffer(name, zeros, persistent=False)

        buffer("slot_narrow", c, s * (n * r + r0 + n), layout.in_features)
        for j, part in enumerate(layout.adapted):
            buffer(f"slot_b{j}", c, layout.part_widths[part], n * r + r0)
        self._b_bounds = layout.adapted_column_bounds()  # where the B products add
        # the prepared products (SlotProducts), which the grouped ops find by this index
        self.narrow: list[Gemm] = []
        self.b: list[list[Gemm]] = []
        self.products = register_products(self)

    @property
    def slot_b(self) -> list[torch.Tensor]:
        """Each adapted part's [B | B0] of every slot, [C, d_out_j, n*r + r0]."""
        return [getattr(self, f"slot_b{j}") for j in range(self.pool.layout.num_parts)]

    def fold_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight itself: the pool's rows wait in slot_narrow and slot_b."""
        self.refresh_fold(weight)
        return weight

    @torch.no_grad()
    def refresh_fold(self, folded: torch.Tensor, slot: int | None = None) -> None:
        pool, layout = self.pool, self.pool.layout
        c, d_in, r0 = layout.num_slots, layout.in_features, layout.always_rank
        slots = slice(None) if slot is None else slice(slot, slot + 1)
        narrow = [t.view(c, -1, d_in)[slots] for t in narrow_rows(pool, True)]
        self.slot_narrow[slots] = torch.cat(narrow, 1)
        for j, joined in enumerate(self.slot_b):
            b = [pool.lora_b[j]] + ([pool.always_b[j]] if r0 else [])
            by_slot = [t.view(t.shape[0], c, -1).transpose(0, 1)[slots] for t in b]
            joined[slots] = torch.cat(by_slot, -1)

    def prepare(self, make_gemm: Callable[[torch.Tensor], Gemm]) -> None:
        c = self.pool.layout.num_slots
        self.narrow = [make_gemm(self.slot_narrow[i]) for i in range(c)]
        self.b = [[make_gemm(b[i]) for b in self.slot_b] for i in range(c)]

    def refresh_products(self) -> None:
        refresh_prepacked([*self.narrow, *(p for products in self.b for p in products)])

    def forward(self, x: torch.Tensor, gemm: Gemm, reduce: Reduce | None) -> torch.Tensor:
        pool, layout, groups = self.pool, self.pool.layout, self.pool.slots
        tokens, s, r0 = x.shape[0], layout.num_parts, layout.always_rank
        base, narrow = gemm(x), x.new_empty(tokens, self.slot_narrow.shape[1])
        own_slot_products(x, groups.order, groups.counts, self.products, narrow)
        if reduce is not None:  # a row-parallel shard's partial products, summed over ranks
            narrow = reduce(narrow)
        width, always = layout.slot_width, s * r0  # each token's own slot's columns
        slots = groups.current(tokens)
        hidden, selected = numba_route(
            pool, narrow[:, width + always :], narrow[:, :width], slots, pool.router_bias, r0
        )
        if r0:  # the always-on hidden states follow the gated ones, ungated
            hidden[:, :, -r0:] = (
                narrow[:, width : width + always].view(tokens, s, r0).transpose(0, 1)
            )
        if pool.capture_selections:
            pool.capture(selected, slots)
        if not pool.count_b:  # another rank adds B; vLLM all-reduces this: needs it dense
            return base.contiguous()
        add_slot_b_products(
            base, groups.order, groups.counts, hidden, self.products, self._b_bounds
        )
        return base
