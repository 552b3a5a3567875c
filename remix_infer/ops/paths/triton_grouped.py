"""The grouped Triton path (GPU, several slots, opt-in with grouped=True): the base GEMM alone,
each slot's A, router and always-on products and routing on its own tokens (one shrink kernel,
in the punica/vLLM-LoRA layout), then each slot's B products added into its tokens' rows (one
expand kernel); ops/triton_grouped.py. The kernels read the pool's tensors themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from remix_infer.ops.paths.base import Gemm, PoolPath, Reduce
from remix_infer.ops.paths.triton_dense import new_semaphore

if TYPE_CHECKING:
    from remix_infer.ops.pool import RemixPool


class TritonGroupedPath(PoolPath):
    grouped = True

    def __init__(self, pool: RemixPool, max_step_tokens: int) -> None:
        super().__init__(pool)
        new_semaphore(self, max_step_tokens, pool.layout.num_slots)
        self._b_bounds = pool.layout.adapted_column_bounds()  # where the B products add

    def fold_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight itself: nothing of the pool's rides on the GEMM."""
        return weight

    def refresh_fold(self, folded: torch.Tensor, slot: int | None = None) -> None:
        """Nothing to rewrite: the kernels read the pool's tensors."""

    def forward(self, x: torch.Tensor, gemm: Gemm, reduce: Reduce | None) -> torch.Tensor:
        from remix_infer.ops.triton_grouped import expand

        pool = self.pool
        order, counts = pool.slots.order, pool.slots.counts  # grouped once per step
        hidden, always_h = self.routed_hidden(x, order, counts, reduce)
        out = gemm(x)
        if pool.count_b:
            expand(
                out, order, counts, hidden, list(pool.lora_b), always_h,
                list(pool.always_b), self._b_bounds,
            )  # fmt: skip
        return out

    def routed_hidden(
        self, x: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, reduce: Reduce | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each token's own slot's gated hidden states [T, S*n*r] and always-on ones [T, S*r0]
        (None without), routed. A row-parallel shard computes its partial products first,
        `reduce` sums them over the ranks, and the kernel routes the sums."""
        from remix_infer.ops.triton_grouped import shrink, shrink_route

        pool = self.pool
        layout = pool.layout
        tokens, s, n, r0 = x.shape[0], layout.num_parts, layout.num_loras, layout.always_rank
        hidden = x.new_empty(tokens, layout.slot_width)
        always_h = x.new_empty(tokens, s * r0) if r0 else None
        route_args = (
            pool.stats, pool.step_selected, self.semaphore, n, layout.rank, layout.top_k,
            layout.omega, layout.weighting == "softmax_topk",
        )  # fmt: skip
        if reduce is None:
            shrink_route(
                x, order, counts, pool.lora_a, pool.router, pool.router_bias, pool.always_a,
                hidden, always_h, *route_args,
            )  # fmt: skip
            return hidden, always_h
        lora_h = x.new_empty(tokens, layout.slot_width, dtype=torch.float32)
        logits = x.new_empty(tokens, s * n, dtype=torch.float32)
        partial_always = torch.empty_like(always_h, dtype=torch.float32) if r0 else None
        shrink(
            x, order, counts, pool.lora_a, pool.router, pool.always_a, lora_h, logits,
            partial_always, self.semaphore, n, layout.rank,
        )  # fmt: skip
        lora_h, logits = reduce(lora_h), reduce(logits)
        shrink_route(
            x, order, counts, pool.lora_a, pool.router, pool.router_bias, None, hidden, None,
            *route_args, lora_h=lora_h, logits=logits,
        )  # fmt: skip
        return hidden, reduce(partial_always).to(x.dtype) if r0 else None
