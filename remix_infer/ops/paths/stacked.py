"""The stacked path (CPU; "torch", the oracle, and "numba"): rows stacked, y_all = x [W ; A ; P]^T.

The pool's narrow A (and, in float32, router) products ride on the base GEMM; then routing
(plain torch ops, or ONE numba call: cpu_route.py) and one B product per part added into the
base columns. With several slots it is dense: the narrow product runs for every slot, each token
keeps its own slot's hidden states and logits, and its gated hidden states go back to its slot's
columns (zeros elsewhere) for one product with every slot's B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from remix_infer.ops.paths.base import (
    Gemm,
    PoolPath,
    Reduce,
    add_router_bias,
    always_hidden,
    narrow_rows,
    numba_route,
    refresh_prepacked,
)
from remix_infer.ops.slots import pick_slot, spread_to_slots
from remix_infer.ops.stats import record_routing
from remix_infer.routing import routing_gates, topk_select

if TYPE_CHECKING:
    from remix_infer.ops.pool import RemixPool


class TorchPath(PoolPath):
    """The oracle: routing in plain torch ops. fold_router: the router rows ride on the GEMM
    (float32 serving, own routers); otherwise the router runs apart, in float32."""

    def __init__(self, pool: RemixPool, fold_router: bool) -> None:
        super().__init__(pool)
        self.fold_router = fold_router
        self._b_weights: list[torch.Tensor] = []
        self._product_b: list[Gemm] = []

    def fold_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight, self._narrow_fold(weight)], dim=0)

    def refresh_fold(self, folded: torch.Tensor, slot: int | None = None) -> None:
        folded[self.pool.layout.out_features :].copy_(self._narrow_fold(folded))

    def _narrow_fold(self, like: torch.Tensor) -> torch.Tensor:
        """The pool's rows of the folded weight, in `like`'s dtype."""
        return torch.cat([t.to(like.dtype) for t in narrow_rows(self.pool, self.fold_router)])

    def prepare(self, make_gemm: Callable[[torch.Tensor], Gemm]) -> None:
        self._b_weights = self.part_b_weights()  # kept: products may read them by reference
        self._product_b = [make_gemm(b) for b in self._b_weights]

    @torch.no_grad()
    def refresh_products(self, slot: int | None = None) -> None:
        """Rewrite the B products' weights in place (compiled graphs keep reading the same
        tensors) and refresh prepacked copies (a gemm with a `refresh()` method)."""
        if self.pool.layout.always_rank:
            for kept, fresh in zip(self._b_weights, self.part_b_weights(), strict=True):
                kept.copy_(fresh)
        refresh_prepacked(self._product_b)

    def part_b_weights(self) -> list[torch.Tensor]:
        """Each adapted part's B as its product reads the hidden states: [B_j | B0_j]."""
        pool = self.pool
        if not pool.layout.always_rank:
            return list(pool.lora_b)
        return [torch.cat([b, b0], dim=1) for b, b0 in zip(pool.lora_b, pool.always_b, strict=True)]

    def forward(self, x: torch.Tensor, gemm: Gemm, reduce: Reduce | None) -> torch.Tensor:
        pool = self.pool
        layout = pool.layout
        s, n, c = layout.num_parts, layout.num_loras, layout.num_slots
        slots = pool.token_slots(x.shape[0])
        y = gemm(x)
        base, narrow = y[:, : layout.out_features], y[:, layout.out_features :]
        width = layout.pool_width  # every slot's products
        a_width = width + layout.always_width
        lora_h, always_h = narrow[:, :width], narrow[:, width:a_width]
        if pool.shared is not None:
            logits = pool.shared_logits(x)
        elif self.fold_router:
            logits = narrow[:, a_width:]
        else:
            logits = F.linear(x.float(), pool.router)
        if reduce is not None:  # the shared logits are whole already
            lora_h = reduce(lora_h.contiguous())
            logits = logits if pool.shared is not None else reduce(logits.contiguous())
            always_h = reduce(always_h.contiguous()) if layout.always_rank else always_h
        if c > 1:  # each token's own slot's products
            lora_h, logits = pick_slot(lora_h, slots, c), pick_slot(logits, slots, c)
        logits = add_router_bias(pool, logits.unflatten(-1, (s, n)), slots)
        hidden, selected = self.route(logits, lora_h, slots)
        if pool.capture_selections:
            pool.capture(selected, slots)
        if c > 1:
            hidden = spread_to_slots(hidden, slots, c)
        if layout.always_rank:  # the always-on hidden states follow the gated ones, ungated
            hidden = torch.cat([hidden, always_hidden(layout, always_h, slots, hidden.dtype)], -1)
        return self.add_pool_outputs(base, hidden)

    def route(
        self, logits: torch.Tensor, lora_h: torch.Tensor, slots: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, S, n], hidden states [T, S*n*r] -> gated hidden states [S, T, n*r] and
        top-k [T, S, k], the statistics recorded."""
        pool = self.pool
        layout = pool.layout
        selected = topk_select(logits, layout.top_k)  # [T, S, k]
        gates = routing_gates(logits, selected, layout.omega, layout.weighting)  # [T, S, n]
        if slots is not None:  # base-model tokens: no adapter
            gates = gates * (slots >= 0).to(gates.dtype)[:, None, None]
        record_routing(pool.stats, pool.step_selected, logits, gates, pool.constant_k, slots)
        return self.gate_hidden(lora_h, gates), selected

    def gate_hidden(self, lora_h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The pool's hidden states times their gates, part-major [S, T, n*r], so that each B
        product reads a contiguous matrix."""
        layout = self.pool.layout
        s, tokens = layout.num_parts, lora_h.shape[0]
        hidden = lora_h.new_empty(s, tokens, layout.num_loras * layout.rank)
        torch.mul(
            lora_h.view(tokens, s, layout.num_loras, layout.rank).transpose(0, 1),
            gates.to(lora_h.dtype).transpose(0, 1).unsqueeze(-1),
            out=hidden.view(s, tokens, layout.num_loras, layout.rank),
        )
        return hidden

    def add_pool_outputs(self, base: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """base + each adapted part's B product of its gated hidden states, [T, d_out]: a new
        tensor for one part; for merged parts, added in place into base (a view of the stacked
        GEMM's output, whose row stride skips the pool's columns: vLLM's CPU ops after a merged
        projection, the qkv split, rotary embedding and SiLU-and-mul, take strided rows)."""
        layout = self.pool.layout
        if not self.pool.count_b:  # another rank adds B; vLLM all-reduces this: needs it dense
            return base.contiguous()
        if layout.part_widths == (layout.out_features,):  # one part: add into its product
            return self._product_b[0](hidden[0]).add_(base)
        columns = layout.part_columns()
        for j, part in enumerate(layout.adapted):
            base[:, columns[part]].add_(self._product_b[j](hidden[j]))
        return base


class NumbaPath(TorchPath):
    """The stacked path with ONE numba call for top-k, gates, gating and statistics (CPU,
    float32; without token slots or in the shared routing scope, where it is not grouped)."""

    def route(
        self, logits: torch.Tensor, lora_h: torch.Tensor, slots: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return numba_route(self.pool, logits, lora_h, slots)
