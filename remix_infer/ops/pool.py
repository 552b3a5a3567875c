"""The serving layer's math: the ReMix term of one (possibly merged) projection, without vLLM.

A projection may be merged (vLLM's qkv_proj = [q | k | v], gate_up_proj = [gate | up]); each of
its S adapted parts has its own pool of n LoRAs of rank r and its own router. For T tokens:

    h_s      = x A_s^T                       [T, n*r]  the pool's hidden states
    logits_s = x P_s^T (+ bias), float32     [T, n]    the router, always in float32
    gates_s  = top-k of logits_s, ties to the lower index: omega (constant) or
               omega * softmax over the k chosen logits (softmax_topk); zero elsewhere
    y        = x W^T + [ (h_s * gates_s) B_s^T  for each part s ]

An optional always-on LoRA per part (A0_s [r0, d_in], B0_s [d_out_s, r0], weight 1) is one more
always-selected member of the pool: its A rows ride on the pool's A product, its hidden states
h0_s = x A0_s^T follow the gated ones ungated, and B0_s sits beside B_s in the same product.

The base product is never run alone: it shares one GEMM with the pool, in one of two ways that
`fold_base_weight` prepares and `forward` consumes.

    "torch" (the oracle) and "numba" (CPU):  rows stacked, y_all = x [W ; A ; P]^T, so the
        pool's narrow A and router products ride on the base GEMM; then routing (plain torch
        ops, or ONE numba call: cpu_route.py) and one B product per part added into the base
        columns.
    "triton" (GPU):  columns stacked, y = [x | gated h] [W | block-diagonal B]^T, so the base
        product and every B product are one GEMM; before it, ONE Triton kernel reads x, does the
        A and router products (router in float32), routes, gates, writes [x | gated h] and
        accumulates the routing statistics (triton_route.py).

In the shared routing scope (ops/shared.py) the pools take their logits from the model's one
router instead of their own (no router rows in the GEMM; on triton the kernel routes the given
products).

Tensor parallelism is the caller's: a row-parallel shard passes its input slice, a `reduce` for
the partial pool products, and count_b=False on every rank but one, so B's term is added once.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from remix_infer.config import RemixConfig
from remix_infer.ops.shared import SharedRouter
from remix_infer.ops.stats import record_routing, stats_width
from remix_infer.routing import routing_gates, topk_select

Kernel = Literal["torch", "numba", "triton"]
Gemm = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PoolLayout:
    """Shapes and routing rule of the pools of one projection (this rank's shard)."""

    in_features: int
    part_widths: tuple[int, ...]  # output columns of every part, adapted or not
    adapted: tuple[int, ...]  # indices of the parts that carry a pool
    num_loras: int
    rank: int
    top_k: int
    omega: float
    weighting: str
    always_rank: int = 0  # r0 of the always-on LoRA of every adapted part; 0: none

    @classmethod
    def from_config(
        cls,
        config: RemixConfig,
        in_features: int,
        part_widths: list[int],
        adapted: list[int],
        always_on: bool = True,
    ) -> PoolLayout:
        """always_on: the pool carries the config's always-on LoRA (if it has one); the parts
        of a merged projection share it, so one that the config leaves out gets zeros."""
        return cls(
            in_features,
            tuple(part_widths),
            tuple(adapted),
            config.num_loras,
            config.rank,
            config.top_k,
            config.omega,
            config.weighting,
            config.always_on_rank if always_on else 0,
        )

    @property
    def num_parts(self) -> int:
        return len(self.adapted)

    @property
    def out_features(self) -> int:
        return sum(self.part_widths)

    @property
    def pool_width(self) -> int:
        """Columns of the pool's hidden states, all parts: S*n*r."""
        return self.num_parts * self.num_loras * self.rank

    @property
    def always_width(self) -> int:
        """Columns of the always-on LoRAs' hidden states, all parts: S*r0."""
        return self.num_parts * self.always_rank

    def part_columns(self) -> list[slice]:
        """The base output columns of each part (adapted or not), in order."""
        starts = [sum(self.part_widths[:i]) for i in range(len(self.part_widths))]
        return [slice(a, a + w) for a, w in zip(starts, self.part_widths, strict=True)]


def default_kernel(device: torch.device, dtype: torch.dtype) -> Kernel:
    """triton on CUDA; on CPU numba's routing kernel for float32 (numpy has no bfloat16) where
    numba is installed (it comes with vLLM), else plain torch."""
    if device.type == "cuda":
        return "triton"
    if dtype == torch.float32 and importlib.util.find_spec("numba") is not None:
        return "numba"
    return "torch"


class RemixPool(nn.Module):
    """The pool tensors, routing buffers and forward of one projection.

    Parameters (this rank's shard): lora_a [S*n*r, d_in] (part-major, then LoRA, then rank) in
    the serving dtype; router [S*n, d_in] and router_bias [S, n] in float32; lora_b[j]
    [d_out of part j, n*r] (column i*r + c is rank c of LoRA i) in the serving dtype; with an
    always-on LoRA, always_a [S*r0, d_in] and always_b[j] [d_out of part j, r0].
    """

    def __init__(
        self,
        layout: PoolLayout,
        dtype: torch.dtype,
        max_step_tokens: int,
        router_bias: bool = False,
        kernel: Kernel | None = None,
        count_b: bool = True,
        device: torch.device | str | None = None,
        name: str = "",
        part_names: list[str] | None = None,
        shared: SharedRouter | None = None,
        routes_shared: bool = False,
    ) -> None:
        """count_b=False: leave B's term to another rank of a row-parallel group;
        part_names: what each adapted part is called in reports (e.g. its HF module path);
        shared: the model's one router (shared routing scope; its owner registers it), whose
        logits replace this pool's own router; routes_shared: this pool reads the first layer's
        input and runs the shared router for every pool."""
        super().__init__()
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.layout, self.name, self.count_b = layout, name, count_b
        self.part_names = part_names or [f"{name}.{i}" for i in layout.adapted]
        self.kernel: Kernel = kernel or default_kernel(device, dtype)
        if self.kernel == "numba" and dtype != torch.float32:
            raise ValueError("the numba routing kernel serves float32 only")
        n, r, s, d_in = layout.num_loras, layout.rank, layout.num_parts, layout.in_features
        self.constant_k = layout.top_k if layout.weighting == "constant" else None

        def frozen(*shape: int, dtype: torch.dtype = dtype) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device), False)

        self.lora_a = frozen(s * n * r, d_in)
        self.router = frozen(s * n, d_in, dtype=torch.float32)
        self.router_bias = frozen(s, n, dtype=torch.float32) if router_bias else None
        self.lora_b = nn.ParameterList(frozen(layout.part_widths[i], n * r) for i in layout.adapted)
        r0 = layout.always_rank
        self.always_a = frozen(s * r0, d_in) if r0 else None
        self.always_b = nn.ParameterList(
            frozen(layout.part_widths[i], r0) for i in (layout.adapted if r0 else ())
        )
        # The stacked GEMM carries the router rows only when it runs in float32.
        self.fold_router = self.kernel != "triton" and dtype == torch.float32 and shared is None
        self._shared = (shared,) if shared is not None else ()  # a tuple: not a submodule here
        self.routes_shared = routes_shared
        self.register_buffer(
            "stats", torch.zeros(s, stats_width(n), dtype=torch.float64, device=device)
        )
        self.register_buffer(
            "step_selected",
            torch.zeros(max_step_tokens, s, n, dtype=torch.uint8, device=device),
            persistent=False,
        )
        if self.kernel == "triton":  # split-K tickets of the routing kernel; it resets them
            from remix_infer.ops.triton_route import semaphore_size

            self.register_buffer(
                "semaphore",
                torch.zeros(semaphore_size(max_step_tokens, s), dtype=torch.int32, device=device),
                persistent=False,
            )
        self.prepare()
        # Debug/test hook (torch kernel): keep every forward's selections [T, S, k] while on.
        self.capture_selections = False
        self.captured: list[torch.Tensor] = []

    @torch.no_grad()
    def load_part(
        self,
        part: int,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        router_weight: torch.Tensor | None,
        router_bias: torch.Tensor | None = None,
        always_a: torch.Tensor | None = None,
        always_b: torch.Tensor | None = None,
    ) -> None:
        """Copy one adapted part's tensors, already cut to this rank's shard: lora_a
        [n, r, d_in], lora_b [n, d_out, r], router_weight [n, d_in], router_bias [n], and with
        an always-on LoRA always_a [r0, d_in], always_b [d_out, r0]."""
        n, r, r0 = self.layout.num_loras, self.layout.rank, self.layout.always_rank
        j = self.layout.adapted.index(part)
        if r0:
            self.always_a[j * r0 : (j + 1) * r0].copy_(always_a)
            self.always_b[j].copy_(always_b)
        self.lora_a[j * n * r : (j + 1) * n * r].copy_(lora_a.reshape(n * r, -1))
        if router_weight is not None:  # None in the shared routing scope
            self.router[j * n : (j + 1) * n].copy_(router_weight)
        if self.router_bias is not None:
            self.router_bias[j].copy_(router_bias)
        self.lora_b[j].copy_(lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], n * r))

    def prepare(self, make_gemm: Callable[[torch.Tensor], Gemm] | None = None) -> None:
        """Pick the kernels of the B products (torch kernel) for the current weights; call again
        after loading (an always-on LoRA's [B | B0] is a copy made here).
        make_gemm(weight) -> (x -> x @ weight.T); default F.linear."""
        make_gemm = make_gemm or (lambda w: lambda x: F.linear(x, w))
        self._product_b = [make_gemm(b) for b in self.part_b_weights()]

    def part_b_weights(self) -> list[torch.Tensor]:
        """Each adapted part's B as its product reads the hidden states: [B_j | B0_j]."""
        if not self.layout.always_rank:
            return list(self.lora_b)
        return [torch.cat([b, b0], dim=1) for b, b0 in zip(self.lora_b, self.always_b, strict=True)]

    @torch.no_grad()
    def fold_base_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight of the one GEMM that `forward` hands to its `gemm`, from the base weight
        [d_out, d_in]: [W ; A (; P)] for the torch kernel, [W | block-diagonal B] for triton."""
        if self.kernel != "triton":
            rows = [weight, self.lora_a.to(weight.dtype)]
            if self.always_a is not None:
                rows.append(self.always_a.to(weight.dtype))
            if self.fold_router:
                rows.append(self.router.to(weight.dtype))
            return torch.cat(rows)
        layout = self.layout
        b = torch.zeros(
            layout.out_features, layout.pool_width + layout.always_width, dtype=weight.dtype,
            device=weight.device,
        )  # fmt: skip
        if self.count_b:  # block-diagonal: the pool's columns, then the always-on LoRAs'
            width, r0 = layout.num_loras * layout.rank, layout.always_rank
            columns = layout.part_columns()
            for j, part in enumerate(layout.adapted):
                b[columns[part], j * width : (j + 1) * width] = self.lora_b[j]
                if r0:
                    start = layout.pool_width + j * r0
                    b[columns[part], start : start + r0] = self.always_b[j]
        return torch.cat([weight, b], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        gemm: Gemm,
        bias: torch.Tensor | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [T, d_in] -> base product + ReMix term [T, d_out] (+ bias).

        gemm: x' -> x' @ fold_base_weight(W).T; reduce: sums a row-parallel shard's partial pool
        products over the ranks (None when the input is whole)."""
        if self.kernel == "triton":
            out = gemm(self._route_triton(x, reduce))
        else:
            out = self._forward_torch(x, gemm, reduce)
        return out if bias is None else out.add_(bias)

    def _forward_torch(self, x: torch.Tensor, gemm: Gemm, reduce: Callable | None) -> torch.Tensor:
        layout = self.layout
        s, n = layout.num_parts, layout.num_loras
        d_out, width = layout.out_features, layout.pool_width
        a_width = width + layout.always_width
        y = gemm(x)
        base, lora_h = y[:, :d_out], y[:, d_out : d_out + width]
        always_h = y[:, d_out + width : d_out + a_width]
        if self._shared:
            logits = self._shared_logits(x)
        elif self.fold_router:
            logits = y[:, d_out + a_width :]
        else:
            logits = F.linear(x.float(), self.router)
        if reduce is not None:  # the shared logits are whole already
            lora_h = reduce(lora_h.contiguous())
            logits = logits if self._shared else reduce(logits.contiguous())
            always_h = reduce(always_h.contiguous()) if layout.always_rank else always_h
        logits = logits.unflatten(-1, (s, n))
        if self.router_bias is not None:
            logits = logits + self.router_bias
        if self.kernel == "numba":
            hidden, selected = self._route_numba(logits, lora_h)
        else:
            selected = topk_select(logits, layout.top_k)  # [T, S, k]
            gates = routing_gates(logits, selected, layout.omega, layout.weighting)  # [T, S, n]
            record_routing(self.stats, self.step_selected, logits, gates, self.constant_k)
            hidden = self._gate_hidden(lora_h, gates)
        if self.capture_selections:
            self.captured.append(selected.detach().clone())
        if layout.always_rank:  # the always-on hidden states follow the gated ones, ungated
            part_major = always_h.view(-1, s, layout.always_rank).transpose(0, 1)
            hidden = torch.cat([hidden, part_major.to(hidden.dtype)], dim=-1)
        return self._add_pool_outputs(base, hidden)

    def _shared_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The shared router's logits of this step, [T, S*n]: the same for every part (run
        here first if this pool reads the first layer's input)."""
        shared = self._shared[0]
        if self.routes_shared:
            shared.route(x)
        return shared.logits(x.shape[0]).repeat(1, self.layout.num_parts)

    def _route_numba(
        self, logits: torch.Tensor, lora_h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated hidden states [S, T, n*r] and top-k [T, S, k] from ONE compiled call."""
        from remix_infer.ops.cpu_route import route_cpu

        layout = self.layout
        tokens, s = logits.shape[0], layout.num_parts
        hidden = lora_h.new_empty(s, tokens, layout.num_loras * layout.rank)
        selected = torch.empty(tokens, s, layout.top_k, dtype=torch.long)
        route_cpu(
            logits, lora_h, hidden, selected, self.stats, self.step_selected, layout.top_k,
            layout.omega, layout.weighting == "softmax_topk",
        )  # fmt: skip
        return hidden, selected

    def _gate_hidden(self, lora_h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The pool's hidden states times their gates, part-major [S, T, n*r], so that each B
        product reads a contiguous matrix."""
        layout = self.layout
        s, tokens = layout.num_parts, lora_h.shape[0]
        hidden = lora_h.new_empty(s, tokens, layout.num_loras * layout.rank)
        torch.mul(
            lora_h.view(tokens, s, layout.num_loras, layout.rank).transpose(0, 1),
            gates.to(lora_h.dtype).transpose(0, 1).unsqueeze(-1),
            out=hidden.view(s, tokens, layout.num_loras, layout.rank),
        )
        return hidden

    def _add_pool_outputs(self, base: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """base + each adapted part's B product of its gated hidden states, [T, d_out]: a new
        tensor for one part; for merged parts, added in place into base (a view of the stacked
        GEMM's output, whose row stride skips the pool's columns: vLLM's CPU ops after a merged
        projection, the qkv split, rotary embedding and SiLU-and-mul, take strided rows)."""
        layout = self.layout
        if not self.count_b:  # another rank adds B; vLLM all-reduces this, which needs it dense
            return base.contiguous()
        if layout.part_widths == (layout.out_features,):  # one part: add into its product
            return self._product_b[0](hidden[0]).add_(base)
        columns = layout.part_columns()
        for j, part in enumerate(layout.adapted):
            base[:, columns[part]].add_(self._product_b[j](hidden[j]))
        return base

    def _route_triton(self, x: torch.Tensor, reduce: Callable | None) -> torch.Tensor:
        """[x | gated h] for the column-stacked GEMM, written by the routing kernel."""
        layout = self.layout
        lora_h = logits = None
        if reduce is not None or self._shared:  # the kernel routes given products
            lora_h = F.linear(x, self.lora_a).float()
            lora_h = lora_h if reduce is None else reduce(lora_h)  # a shard's partial products
            logits = (
                self._shared_logits(x) if self._shared else reduce(F.linear(x.float(), self.router))
            )
        from remix_infer.ops.triton_route import route

        x_cat = x.new_empty(
            x.shape[0], layout.in_features + layout.pool_width + layout.always_width
        )
        if layout.always_rank:  # the always-on hidden states, in the columns after the pool's
            always_h = F.linear(x, self.always_a)
            x_cat[:, layout.in_features + layout.pool_width :] = (
                always_h if reduce is None else reduce(always_h.float()).to(x.dtype)
            )
        route(
            x, self.lora_a, self.router, self.router_bias, x_cat, self.stats,
            self.step_selected, self.semaphore, lora_h, logits,
            layout.num_loras, layout.rank, layout.top_k, layout.omega,
            layout.weighting == "softmax_topk",
        )  # fmt: skip
        return x_cat


class FusedRemixLinear(nn.Module):
    """A base linear and its pool, owning their one GEMM: the serving layer without an engine
    (benchmarks, tests; vLLM's binding lets vLLM's own linear run the GEMM instead)."""

    def __init__(self, weight: torch.Tensor, pool: RemixPool) -> None:
        super().__init__()
        self.pool = pool
        self.register_buffer("folded", pool.fold_base_weight(weight))
        pool.prepare()  # B products over the loaded tensors ([B | B0] is a copy)

    def refold(self, weight: torch.Tensor) -> None:
        """Rebuild the one GEMM's weight after the pool's tensors changed."""
        self.folded = self.pool.fold_base_weight(weight)
        self.pool.prepare()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x, lambda z: F.linear(z, self.folded))
