"""The dense Triton path (GPU; triton's default): columns stacked, y = [x | gated h] [W |
block-diagonal B]^T, so the base product and every B product are one GEMM. Before it, ONE Triton
kernel (triton_route.py) reads x, does the A and router products (router in float32), routes,
gates, writes [x | gated h] and accumulates the routing statistics. With several slots, a row-
parallel shard or the shared routing scope, the products run here (every slot's) and the kernel
routes the given ones: each token keeps its own slot's, its gated hidden states go into its
slot's columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from remix_infer.ops.paths.base import Gemm, PoolPath, Reduce, always_hidden
from remix_infer.ops.slots import pick_slot

if TYPE_CHECKING:
    from remix_infer.ops.pool import RemixPool


def new_semaphore(path: PoolPath, max_step_tokens: int, copies: int) -> None:
    """Register the routing kernels' split-K tickets on `path` (the kernels reset them)."""
    from remix_infer.ops.triton_route import semaphore_size

    pool = path.pool
    tickets = semaphore_size(max_step_tokens, pool.layout.num_parts) * copies
    path.register_buffer(
        "semaphore",
        torch.zeros(tickets, dtype=torch.int32, device=pool.lora_a.device),
        persistent=False,
    )


class TritonDensePath(PoolPath):
    def __init__(self, pool: RemixPool, max_step_tokens: int) -> None:
        super().__init__(pool)
        new_semaphore(self, max_step_tokens, 1)
        # `route`'s keywords (a triton_route.CONFIGURATIONS entry; {}: the defaults), set by
        # `make gpu-check` to verify each configuration through the pool
        self.route_config: dict[str, int | str | bool] = {}

    def fold_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight, self._b_columns(weight)], dim=1)

    def refresh_fold(self, folded: torch.Tensor, slot: int | None = None) -> None:
        folded[:, self.pool.layout.in_features :].copy_(self._b_columns(folded))

    def _b_columns(self, like: torch.Tensor) -> torch.Tensor:
        """The pool's columns of the folded weight, [block-diagonal B | B0] per slot, in
        `like`'s dtype and device (zeros on a rank that leaves B's term to another)."""
        pool = self.pool
        layout = pool.layout
        b = torch.zeros(
            layout.out_features, layout.pool_width + layout.always_width, dtype=like.dtype,
            device=like.device,
        )  # fmt: skip
        if not pool.count_b:
            return b
        width, r0, s = layout.num_loras * layout.rank, layout.always_rank, layout.num_parts
        columns = layout.part_columns()
        for slot in range(layout.num_slots):  # the pool's columns, then the always-on ones
            for j, part in enumerate(layout.adapted):
                start = (slot * s + j) * width
                b[columns[part], start : start + width] = pool.lora_b[j][
                    :, slot * width : (slot + 1) * width
                ]
                if r0:
                    start = layout.pool_width + (slot * s + j) * r0
                    b[columns[part], start : start + r0] = pool.always_b[j][
                        :, slot * r0 : (slot + 1) * r0
                    ]
        return b

    def forward(self, x: torch.Tensor, gemm: Gemm, reduce: Reduce | None) -> torch.Tensor:
        return gemm(self.gemm_input(x, reduce))

    def gemm_input(self, x: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
        """[x | gated h] for the column-stacked GEMM, written by the routing kernel into a
        zeroed x_cat (a column no program writes must not carry garbage into the GEMM)."""
        from remix_infer.ops.triton_route import route

        pool = self.pool
        layout = pool.layout
        c = layout.num_slots
        slots = pool.token_slots(x.shape[0])
        lora_h, logits, bias = self._given_products(x, reduce, slots)
        width = layout.in_features + layout.pool_width + layout.always_width
        x_cat = x.new_zeros(x.shape[0], width)
        if layout.always_rank:  # the always-on hidden states, in the columns after the pool's
            x_cat[:, layout.in_features + layout.pool_width :] = self._always(x, reduce, slots)
        route(
            x, pool.lora_a, pool.router, bias, x_cat, pool.stats,
            pool.step_selected, self.semaphore, lora_h, logits,
            layout.num_loras, layout.rank, layout.top_k, layout.omega,
            layout.weighting == "softmax_topk", slots, c, **self.route_config,
        )  # fmt: skip
        return x_cat

    def _given_products(
        self, x: torch.Tensor, reduce: Reduce | None, slots: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The products the kernel routes instead of its own (None: it runs them) and the
        router bias it adds (None: none, or already added here): with a row-parallel shard's
        partial products, the shared router's logits, or several slots (each token's own)."""
        pool = self.pool
        layout = pool.layout
        c, s, n = layout.num_slots, layout.num_parts, layout.num_loras
        bias = pool.router_bias
        if reduce is None and pool.shared is None and c == 1:
            return None, None, bias
        lora_h = F.linear(x, pool.lora_a).float()
        lora_h = lora_h if reduce is None else reduce(lora_h)  # a shard's partial products
        if pool.shared is not None:
            logits = pool.shared_logits(x)
        else:
            logits = F.linear(x.float(), pool.router)
            logits = logits if reduce is None else reduce(logits)
        if c > 1:
            lora_h, logits = pick_slot(lora_h, slots, c), pick_slot(logits, slots, c)
            if bias is not None:  # each token's own slot's bias, added here
                logits, bias = logits + bias.view(c, s * n)[slots.clamp(min=0)], None
        return lora_h, logits, bias

    def _always(
        self, x: torch.Tensor, reduce: Reduce | None, slots: torch.Tensor | None
    ) -> torch.Tensor:
        """The always-on LoRAs' hidden states [T, C*S*r0] in x's dtype (slot-major, part-major),
        each token's in its own slot's columns."""
        layout = self.pool.layout
        always_h = F.linear(x, self.pool.always_a)
        always_h = always_h if reduce is None else reduce(always_h.float()).to(x.dtype)
        if slots is None:
            return always_h
        by_part = always_hidden(layout, always_h, slots, x.dtype)  # [S, T, C*r0]
        by_part = by_part.view(layout.num_parts, -1, layout.num_slots, layout.always_rank)
        return by_part.permute(1, 2, 0, 3).reshape(x.shape[0], -1)
