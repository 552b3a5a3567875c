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

The base product is never run alone: it shares one GEMM with the pool. How is the pool's path
(ops/paths/, one class each, chosen by kernel and `grouped`): `fold_base_weight` prepares the
GEMM's weight and `forward` runs the path.

    TorchPath (the oracle) and NumbaPath (CPU):  rows stacked, y_all = x [W ; A ; P]^T; then
        routing (plain torch ops, or ONE numba call: cpu_route.py) and one B product per part.
    NumbaGroupedPath (CPU engine, the numba kernel with token slots, one slot or several): the
        GEMM is the base product alone; each slot's A, router and B products run on that slot's
        tokens only (the adapter FLOPs of one checkpoint, none for base-model tokens), each one
        GEMM of the kernel `prepare` was given (in vLLM: oneDNN, prepacked, as the base GEMM).
    TritonDensePath (GPU):  columns stacked, y = [x | gated h] [W | block-diagonal B]^T; before
        it ONE Triton kernel does the A and router products, routes and writes [x | gated h].
    TritonGroupedPath (GPU, several slots, grouped=True): the grouped scheme in two Triton
        kernels; triton's default stays dense until a GPU run of `make bench-gpu` shows it faster.

Checkpoint slots (ops/slots.py): a pool sized for C slots holds C checkpoints' pools and routers
side by side (slot-major: every tensor's rows, or B's columns, slot by slot); the engine's slot
buffer gives each token's slot, -1 for base-model tokens. The dense paths (torch, and triton by
default) run the narrow product for every slot (C times the adapter FLOPs); each token keeps its
own slot's hidden states and logits, and its gated hidden states go to its slot's columns.

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
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from remix_infer.ops.paths import PoolPath, make_path
from remix_infer.ops.paths.base import Gemm
from remix_infer.ops.shared import SharedRouter
from remix_infer.ops.slots import TokenSlots
from remix_infer.ops.stats import stats_width

Kernel = Literal["torch", "numba", "triton"]


class PoolSettings(Protocol):
    """The checkpoint settings a pool needs, as plain values (remix_infer.config.RemixConfig has
    them; the ops import no config schema, so they run with torch and Triton alone)."""

    num_loras: int
    rank: int
    top_k: int
    omega: float
    weighting: str
    always_on_rank: int


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
    num_slots: int = 1  # C: checkpoints held side by side (ops/slots.py)

    @classmethod
    def from_config(
        cls,
        config: PoolSettings,
        in_features: int,
        part_widths: list[int],
        adapted: list[int],
        num_slots: int = 1,
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
            num_slots,
        )

    @property
    def num_parts(self) -> int:
        return len(self.adapted)

    @property
    def out_features(self) -> int:
        return sum(self.part_widths)

    @property
    def slot_width(self) -> int:
        """Columns of one slot's pool hidden states, all parts: S*n*r."""
        return self.num_parts * self.num_loras * self.rank

    @property
    def pool_width(self) -> int:
        """Columns of the pool's hidden states, all slots and parts: C*S*n*r."""
        return self.num_slots * self.slot_width

    @property
    def always_width(self) -> int:
        """Columns of the always-on LoRAs' hidden states, all slots and parts: C*S*r0."""
        return self.num_slots * self.num_parts * self.always_rank

    def adapted_column_bounds(self) -> list[int]:
        """The first and past-the-last output column of each adapted part, flattened."""
        columns = self.part_columns()
        return [i for part in self.adapted for i in (columns[part].start, columns[part].stop)]

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

    Parameters (this rank's shard; C slots, slot-major): lora_a [C*S*n*r, d_in] (slot, part,
    LoRA, rank) in the serving dtype; router [C*S*n, d_in] and router_bias [C*S, n] in float32;
    lora_b[j] [d_out of part j, C*n*r] (column (slot*n + i)*r + c is rank c of LoRA i) in the
    serving dtype; with an always-on LoRA, always_a [C*S*r0, d_in] and always_b[j]
    [d_out of part j, C*r0].
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
        slots: TokenSlots | None = None,
        grouped: bool | None = None,
    ) -> None:
        """count_b=False: leave B's term to another rank of a row-parallel group;
        part_names: what each adapted part is called in reports (e.g. its HF module path);
        shared: the model's one router (shared routing scope; its owner registers it), whose
        logits replace this pool's own router; routes_shared: this pool reads the first layer's
        input and runs the shared router for every pool; slots: the engine's per-token
        checkpoint slots (None: every token is slot 0's); grouped: each slot's products on its
        own tokens only (None: the kernel's default, see `_grouped`)."""
        super().__init__()
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.layout, self.name, self.count_b = layout, name, count_b
        self.part_names = part_names or [f"{name}.{i}" for i in layout.adapted]
        self.kernel: Kernel = kernel or default_kernel(device, dtype)
        if self.kernel == "numba" and dtype != torch.float32:
            raise ValueError("the numba routing kernel serves float32 only")
        n, r, s, d_in = layout.num_loras, layout.rank, layout.num_parts, layout.in_features
        c = layout.num_slots
        if c > 1 and slots is None:
            raise ValueError("a pool of several checkpoint slots needs the token slots")
        if slots is not None and slots.counts.numel() < c + 1:
            raise ValueError(f"token slots sized for fewer than the pool's {c} slots")
        self.constant_k = layout.top_k if layout.weighting == "constant" else None

        def frozen(*shape: int, dtype: torch.dtype = dtype) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device), False)

        self.lora_a = frozen(c * s * n * r, d_in)
        self.router = frozen(c * s * n, d_in, dtype=torch.float32)
        self.router_bias = frozen(c * s, n, dtype=torch.float32) if router_bias else None
        self.lora_b = nn.ParameterList(
            frozen(layout.part_widths[i], c * n * r) for i in layout.adapted
        )
        r0 = layout.always_rank
        self.always_a = frozen(c * s * r0, d_in) if r0 else None
        self.always_b = nn.ParameterList(
            frozen(layout.part_widths[i], c * r0) for i in (layout.adapted if r0 else ())
        )
        grouped = self._grouped(grouped, c, slots is not None, shared is not None)
        self._shared = (shared,) if shared is not None else ()  # a tuple: not a submodule here
        self._slots = (slots,) if slots is not None else ()  # the model owns it
        self.routes_shared = routes_shared
        self.register_buffer(
            "stats", torch.zeros(c * s, stats_width(n), dtype=torch.float64, device=device)
        )
        self.register_buffer(
            "step_selected",
            torch.zeros(max_step_tokens, s, n, dtype=torch.uint8, device=device),
            persistent=False,
        )
        # Debug/test hook (torch and numba kernels): keep every forward's selections [T, S, k].
        self.capture_selections = False
        self.captured: list[torch.Tensor] = []
        self.path: PoolPath = make_path(self, grouped, max_step_tokens)
        self._run_path = self.path.forward  # in __dict__: no nn.Module lookup a call
        self.prepare()

    def _grouped(self, asked: bool | None, num_slots: int, has_slots: bool, shared: bool) -> bool:
        """Whether the slots' products run grouped (each slot's on its own tokens, nothing of
        the pool's in the GEMM): by default for numba in an engine (whose pools have the token
        slots), one slot or several, so that base-model tokens pay nothing; triton stays dense
        by default until a GPU run of `make bench-gpu` shows its grouped path faster."""
        if asked is None:
            return self.kernel == "numba" and has_slots and not shared
        one_slot_triton = self.kernel == "triton" and num_slots == 1
        if asked and (not has_slots or self.kernel == "torch" or shared or one_slot_triton):
            raise ValueError(
                "grouped products need the token slots, own routers, and the numba kernel or "
                "the triton kernel with several slots"
            )
        return asked

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
        slot: int = 0,
    ) -> None:
        """Copy one adapted part's tensors of one slot, already cut to this rank's shard: lora_a
        [n, r', d_in], lora_b [n, d_out, r'], router_weight [n, d_in], router_bias [n] (None:
        zero), and with an always-on LoRA always_a [r0, d_in], always_b [d_out, r0]. A rank
        r' below the pool's r is zero-padded (the extra ranks contribute nothing)."""
        n, r, r0 = self.layout.num_loras, self.layout.rank, self.layout.always_rank
        j = self.layout.adapted.index(part)
        row = slot * self.layout.num_parts + j  # this part's block in slot-major order
        given = lora_a.shape[1]
        if r0:
            self.always_a[row * r0 : (row + 1) * r0].copy_(always_a)
            self.always_b[j][:, slot * r0 : (slot + 1) * r0].copy_(always_b)
        a = self.lora_a[row * n * r : (row + 1) * n * r].view(n, r, -1)
        a[:, :given].copy_(lora_a)
        a[:, given:].zero_()
        if router_weight is not None:  # None in the shared routing scope
            self.router[row * n : (row + 1) * n].copy_(router_weight)
        if self.router_bias is not None:
            self.router_bias[row].copy_(router_bias if router_bias is not None else 0)
        b = self.lora_b[j][:, slot * n * r : (slot + 1) * n * r].view(-1, n, r)
        b[:, :, :given].copy_(lora_b.permute(1, 0, 2))
        b[:, :, given:].zero_()

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Zero one slot's tensors and statistics (its tokens are sent as base-model tokens)."""
        layout = self.layout
        s, n, r, r0 = layout.num_parts, layout.num_loras, layout.rank, layout.always_rank
        self.lora_a[slot * s * n * r : (slot + 1) * s * n * r].zero_()
        self.router[slot * s * n : (slot + 1) * s * n].zero_()
        if self.router_bias is not None:
            self.router_bias[slot * s : (slot + 1) * s].zero_()
        for b in self.lora_b:
            b[:, slot * n * r : (slot + 1) * n * r].zero_()
        if r0:
            self.always_a[slot * s * r0 : (slot + 1) * s * r0].zero_()
            for b0 in self.always_b:
                b0[:, slot * r0 : (slot + 1) * r0].zero_()
        self.stats[slot * s : (slot + 1) * s].zero_()

    @property
    def grouped(self) -> bool:
        """Each slot's products run on its own tokens only (nothing of the pool's in the GEMM)."""
        return self.path.grouped

    @property
    def shared(self) -> SharedRouter | None:
        """The model's one router in the shared routing scope, else None."""
        return self._shared[0] if self._shared else None

    @property
    def slots(self) -> TokenSlots | None:
        """The engine's token slots (None: every token is slot 0's)."""
        return self._slots[0] if self._slots else None

    def prepare(self, make_gemm: Callable[[torch.Tensor], Gemm] | None = None) -> None:
        """Pick the kernels of the path's own products (the stacked path's B products) for the
        current weights. make_gemm(weight) -> (x -> x @ weight.T); default F.linear. A gemm with
        a `refresh()` method (a prepacked copy of its weight) is refreshed by
        `refresh_products`."""
        self.path.prepare(make_gemm or (lambda w: lambda x: F.linear(x, w)))

    def refresh_products(self, slot: int | None = None) -> None:
        """After the pool's tensors changed in place (slot: only that slot's; None: any):
        refresh what `prepare` made, in place (so compiled graphs keep reading the same
        tensors)."""
        self.path.refresh_products(slot)

    @torch.no_grad()
    def fold_base_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight of the one GEMM that `forward` hands to its `gemm`, from the base weight
        [d_out, d_in]: [W ; A (; P)] for the stacked paths, [W | block-diagonal B] for triton's
        dense one, W itself when grouped."""
        return self.path.fold_weight(weight)

    @torch.no_grad()
    def refresh_fold(self, folded: torch.Tensor, slot: int | None = None) -> None:
        """Rewrite the pool's part of a folded weight in place after its tensors changed (the
        base rows or columns stay as they are); slot: only that slot's changed (None: any)."""
        self.path.refresh_fold(folded, slot)

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
        out = self._run_path(x, gemm, reduce)  # not path(...): no module-call overhead
        return out if bias is None else out.add_(bias)

    def token_slots(self, tokens: int) -> torch.Tensor | None:
        """This step's checkpoint slot of each token [T] (-1: base model), None without slots."""
        return self._slots[0].current(tokens) if self._slots else None

    def capture(self, selected: torch.Tensor, slots: torch.Tensor | None) -> None:
        """Keep this forward's selections [T, S, k] (-1 for base-model tokens)."""
        selected = selected.detach().clone()
        if slots is not None:
            selected[slots < 0] = -1
        self.captured.append(selected)

    def shared_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The shared router's logits of this step, [T, S*n]: the same for every part (run
        here first if this pool reads the first layer's input)."""
        shared = self._shared[0]
        if self.routes_shared:
            shared.route(x)
        return shared.logits(x.shape[0]).repeat(1, self.layout.num_parts)


class FusedRemixLinear(nn.Module):
    """A base linear and its pool, owning their one GEMM: the serving layer without an engine
    (benchmarks, tests; vLLM's binding lets vLLM's own linear run the GEMM instead)."""

    def __init__(self, weight: torch.Tensor, pool: RemixPool) -> None:
        super().__init__()
        self.pool = pool
        self.register_buffer("folded", pool.fold_base_weight(weight))
        pool.prepare()  # B products over the loaded tensors ([B | B0] is a copy)

    def refold(self, weight: torch.Tensor) -> None:
        """Rebuild the one GEMM's weight after the pool's tensors and the base weight changed."""
        self.folded = self.pool.fold_base_weight(weight)
        self.pool.prepare()

    def refresh(self, slot: int | None = None) -> None:
        """After the pool's tensors changed in place (a slot loaded or cleared; None: any): rewrite
        the pool's part of the one GEMM's weight in place, so compiled graphs see it."""
        self.pool.refresh_fold(self.folded, slot)
        self.pool.refresh_products(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x, lambda z: F.linear(z, self.folded))
