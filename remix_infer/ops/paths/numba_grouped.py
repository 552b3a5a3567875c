"""The grouped CPU path ("numba" with the engine's token slots, one slot or several): the GEMM is
the base product alone, and each token's adapter uses its own slot's weights only (the adapter
FLOPs of one checkpoint, none for base-model tokens). Two ways, by step size (`kernel_tokens`):

- ONE numba call from x (cpu_route.remix_rows in eager mode, the grouped_cpu op when
  compiled): per token, the router's products, top-k, then only the k chosen LoRAs' A and B
  rows (k/n of the dense arithmetic), added into the base product. Each slot's [A ; A0 ; P]
  rows wait in `slot_narrow`, its [B | B0]^T in `slot_b_t`.
- Each slot's products as GEMMs of the binding's kernel (`prepare(make_gemm)`: in vLLM oneDNN
  with prepacked weights, the base GEMM's own library, on torch's threads), run by
  ops/slots.py's grouped ops on each slot's tokens: [A ; A0 ; P] (`slot_narrow`), one numba
  call to route them, then each part's [B | B0] (`slot_b<j>`). Also what a row-parallel shard
  does, whose partial products are summed over the ranks before routing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.compiler import is_compiling

from remix_infer.ops.paths.base import Gemm, PoolPath, Reduce, narrow_rows, refresh_prepacked
from remix_infer.ops.slots import add_slot_b_products, own_slot_products, register_products

if TYPE_CHECKING:
    from remix_infer.ops.pool import RemixPool


class NumbaGroupedPath(PoolPath):
    """The router rows ride on each slot's narrow product (numba serves float32, and the shared
    routing scope is never grouped, so every pool here has its own router in float32)."""

    grouped = True

    def __init__(self, pool: RemixPool, max_step_tokens: int) -> None:
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
        widths = [layout.part_widths[part] for part in layout.adapted]
        # the routing kernel's B: each part's [B | B0]^T, [n*r + r0, d_out_j], flat side by side
        buffer("slot_b_t", c, (n * r + r0) * sum(widths))
        self._b_bounds = layout.adapted_column_bounds()  # where the B products add
        bounds = torch.tensor(self._b_bounds, dtype=torch.int64, device=like.device)
        self.register_buffer("b_columns", bounds, persistent=False)
        # each step's top-k, written by the kernel in place (read back only to capture them)
        chosen = torch.zeros(max_step_tokens, s, layout.top_k, dtype=torch.long, device=like.device)
        self.register_buffer("step_top_k", chosen, persistent=False)
        self.threads = torch.get_num_threads()  # counted again by `prepare`
        self.kernel_max_tokens = None  # (sets `_kernel_limit`)
        # the prepared products (SlotProducts), which the grouped ops find by this index
        self.narrow: list[Gemm] = []
        self.b: list[list[Gemm]] = []
        self.products = register_products(self)
        self.numpy_views: dict = {}  # the routing kernel's views of persistent tensors
        self._kernel_args: tuple | None = None  # the kernel's standing arguments, made once
        from remix_infer.ops import cpu_route  # numba: imported only where this path runs

        self.kernels = cpu_route

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
        self.slot_b_t[slots] = torch.cat(
            [b[slots].transpose(1, 2).flatten(1) for b in self.slot_b], 1
        )

    @property
    def kernel_max_tokens(self) -> int | None:
        """None: by torch's threads (`kernel_tokens`); a number: the kernel up to that many
        tokens."""
        return self._kernel_max

    @kernel_max_tokens.setter
    def kernel_max_tokens(self, value: int | None) -> None:
        self._kernel_max = value
        self._kernel_limit = self.kernel_tokens()  # what forward reads (one lookup a call)

    def prepare(self, make_gemm: Callable[[torch.Tensor], Gemm]) -> None:
        self.threads = torch.get_num_threads()
        self._kernel_limit = self.kernel_tokens()
        c = self.pool.layout.num_slots
        self.narrow = [make_gemm(self.slot_narrow[i]) for i in range(c)]
        self.b = [[make_gemm(b[i]) for b in self.slot_b] for i in range(c)]

    def refresh_products(self, slot: int | None = None) -> None:
        slots = range(len(self.narrow)) if slot is None else [slot]  # oneDNN prepacks: ~ms each
        refresh_prepacked([product for c in slots for product in (self.narrow[c], *self.b[c])])

    def kernel_tokens(self) -> int:
        """Up to how many tokens the numba kernel runs the adapter (on one thread) rather than
        oneDNN's products (on torch's threads) and a B GEMM that adds into the output. With one
        thread (vLLM's CPU worker on a small host) every step: the kernel does k/n of the
        arithmetic and adds its B products straight into the output, and measured at or above
        the dense products at every size (Intel Xeon, d 1024 model shapes, base / layer: 0.87
        against 0.85 at 512 tokens, 0.88 against 0.87 at 4096; docs/engine.md, "B added
        straight into the output"). With more threads, oneDNN's products share the work, and
        the kernel keeps the steps of up to 16 tokens (about the fixed cost of the products'
        calls at d 1024); not measured with several threads (the 2-core machines here give
        vLLM's worker one). The threads are counted when the products are prepared (vLLM has
        set them by then; torch.compile cannot trace the count)."""
        if self._kernel_max is not None:
            return self._kernel_max
        return sys.maxsize if self.threads == 1 else 16

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's)
        self._kernel_args = None  # tensors moved or cast: numpy views made again
        return super()._apply(fn, recurse)

    def kernel_args(self) -> tuple:
        """The kernel's arguments after x, out and padding (cpu_route.remix_rows), which stay
        from call to call: the top-k buffer's and the persistent tensors' numpy views and the
        layout's numbers, made once (`remix_rows_layout`)."""
        if self._kernel_args is None:
            pool, layout = self.pool, self.pool.layout
            b_t = self.slot_b_t if pool.count_b else None
            self._kernel_args = (self.step_top_k.numpy(), *self.kernels.remix_rows_layout(
                self.slot_narrow, pool.router_bias, pool.slots.index, b_t, self.b_columns,
                pool.stats, pool.step_selected, layout.top_k, layout.omega,
                layout.weighting == "softmax_topk", layout.rank, layout.always_rank,
                self.numpy_views,
            ))  # fmt: skip
        return self._kernel_args

    def forward(self, x: torch.Tensor, gemm: Gemm, reduce: Reduce | None) -> torch.Tensor:
        # Python between two GEMMs runs with cold caches: each line here costs ~5 us (a torch
        # op ~20), so the kernel's call is one line over numpy views made once
        base = gemm(x)
        tokens = x.shape[0]
        in_kernel = tokens <= self._kernel_limit  # B's products too
        if in_kernel and reduce is None and not is_compiling():  # the whole adapter, one call
            args, kernels = self._kernel_args or self.kernel_args(), self.kernels
            kernels.remix_rows(x.numpy(), base.numpy(), kernels.padding_rows(tokens), *args)
        else:
            self._adapter_by_op(x, base, reduce, in_kernel)
        pool = self.pool
        if pool.capture_selections:  # (a torch op costs ~30 us with cold caches: only here)
            pool.capture(self.step_top_k[:tokens], pool.slots.current(tokens))
        if not pool.count_b:  # another rank adds B; vLLM all-reduces this: needs it dense
            return base.contiguous()
        return base

    def _adapter_by_op(
        self, x: torch.Tensor, base: torch.Tensor, reduce: Reduce | None, in_kernel: bool
    ) -> None:
        """The adapter through the grouped op (what compiled graphs keep): from x in the kernel,
        or on oneDNN's products (a row-parallel shard's summed over the ranks first) with B in
        the kernel or on a GEMM."""
        pool, layout, groups = self.pool, self.pool.layout, self.pool.slots
        tokens, s = x.shape[0], layout.num_parts
        from_x = in_kernel and reduce is None  # the whole adapter in one call
        inputs, hidden = x, None
        if not from_x:  # the products on oneDNN (summed over ranks for a row-parallel shard)
            inputs = x.new_empty(tokens, self.slot_narrow.shape[1])
            own_slot_products(x, groups.order, groups.counts, self.products, inputs)
            if reduce is not None:
                inputs = reduce(inputs)
            if pool.count_b and not in_kernel:
                width = layout.num_loras * layout.rank + layout.always_rank
                hidden = x.new_empty(s, tokens, width)
        self.kernels.grouped_cpu(
            inputs, self.slot_narrow, pool.router_bias, groups.index,
            self.slot_b_t if in_kernel and pool.count_b else None, self.b_columns, base, hidden,
            self.step_top_k[:tokens], pool.stats, pool.step_selected, layout.top_k, layout.omega,
            layout.weighting == "softmax_topk", layout.rank, layout.always_rank, self.products,
            from_x,
        )  # fmt: skip
        if hidden is not None:
            add_slot_b_products(
                base, groups.order, groups.counts, hidden, self.products, self._b_bounds
            )
