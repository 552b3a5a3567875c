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

Checkpoint slots (ops/slots.py): a pool sized for C slots holds C checkpoints' pools and routers
side by side (slot-major: every tensor's rows, or B's columns, slot by slot); the engine's slot
buffer gives each token's slot, -1 for base-model tokens. The "numba" kernel (CPU) with a slot
buffer is grouped, one slot or several: the GEMM is the base product alone, and each slot's A,
router and B products run on that slot's tokens only (the adapter FLOPs of one checkpoint, none
for base-model tokens). Without a slot buffer (or in the shared routing scope) it is the stacked
path above, and so is the "torch" kernel with one slot (zero gates for base-model tokens). The
"triton" kernel has the same grouped path (triton_grouped.py), taken
with grouped=True: its default stays dense until a GPU run of `make bench-gpu` shows it faster.
The "torch" kernel and triton by default are dense: the narrow product runs for
every slot (C times the adapter FLOPs); each token keeps its own slot's hidden states and logits
(a gather), routes them as above, and its gated hidden states go back to its slot's columns
(zeros elsewhere) for one product with every slot's B.

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
from remix_infer.ops.slots import (
    TokenSlots,
    add_slot_b_products,
    own_slot_products,
    pick_slot,
    spread_to_slots,
)
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
    num_slots: int = 1  # C: checkpoints held side by side (ops/slots.py)

    @classmethod
    def from_config(
        cls,
        config: RemixConfig,
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
        self.grouped = self._grouped(grouped, c, slots is not None, shared is not None)
        self._b_bounds = layout.adapted_column_bounds()  # where the grouped B products add
        # The stacked GEMM carries the router rows only when it runs in float32.
        self.fold_router = self.kernel != "triton" and dtype == torch.float32 and shared is None
        if self.grouped and self.kernel == "numba":  # each slot's rows [A ; A0 ; P], one product
            rows = s * n * r + s * r0 + (s * n if self.fold_router else 0)
            self.register_buffer(
                "slot_narrow", torch.zeros(c, rows, d_in, dtype=dtype, device=device), False
            )
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
        if self.kernel == "triton":  # split-K tickets of the routing kernel; it resets them
            from remix_infer.ops.triton_route import semaphore_size

            tickets = semaphore_size(max_step_tokens, s) * (c if self.grouped else 1)
            self.register_buffer(
                "semaphore",
                torch.zeros(tickets, dtype=torch.int32, device=device),
                persistent=False,
            )
        self.prepare()
        # Debug/test hook (torch kernel): keep every forward's selections [T, S, k] while on.
        self.capture_selections = False
        self.captured: list[torch.Tensor] = []

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

    def prepare(self, make_gemm: Callable[[torch.Tensor], Gemm] | None = None) -> None:
        """Pick the kernels of the B products (torch kernel) for the current weights.
        make_gemm(weight) -> (x -> x @ weight.T); default F.linear. A gemm with a `refresh()`
        method (a prepacked copy of its weight) is refreshed by `refresh_products`."""
        make_gemm = make_gemm or (lambda w: lambda x: F.linear(x, w))
        if self.grouped:  # the grouped products read each slot's part of lora_b itself
            self._b_weights, self._product_b = [], []
            return
        self._b_weights = self.part_b_weights()  # kept: products may read them by reference
        self._product_b = [make_gemm(b) for b in self._b_weights]

    @torch.no_grad()
    def refresh_products(self) -> None:
        """After the pool's tensors changed in place: rewrite the B products' weights in place
        (so compiled graphs keep reading the same tensors) and refresh prepacked copies."""
        if self.layout.always_rank and not self.grouped:
            for kept, fresh in zip(self._b_weights, self.part_b_weights(), strict=True):
                kept.copy_(fresh)
        for product in self._product_b:
            if hasattr(product, "refresh"):
                product.refresh()

    def part_b_weights(self) -> list[torch.Tensor]:
        """Each adapted part's B as its product reads the hidden states: [B_j | B0_j]."""
        if not self.layout.always_rank:
            return list(self.lora_b)
        return [torch.cat([b, b0], dim=1) for b, b0 in zip(self.lora_b, self.always_b, strict=True)]

    @torch.no_grad()
    def fold_base_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight of the one GEMM that `forward` hands to its `gemm`, from the base weight
        [d_out, d_in]: [W ; A (; P)] for the torch kernel, [W | block-diagonal B] for triton,
        W itself when grouped (whose narrow rows wait in slot_narrow)."""
        if self.grouped:
            self.refresh_fold(weight)
            return weight
        return torch.cat(
            [weight, self._adapter_fold(weight)], dim=0 if self.kernel != "triton" else 1
        )

    @torch.no_grad()
    def refresh_fold(self, folded: torch.Tensor, slot: int | None = None) -> None:
        """Rewrite the pool's part of a folded weight in place after its tensors changed (the
        base rows or columns stay as they are); slot: only that slot's changed (None: any)."""
        if self.grouped:  # nothing of the pool's in the GEMM: numba's rows are slot_narrow
            if self.kernel == "numba":  # (triton's kernels read the pool's tensors themselves)
                c, d_in = self.layout.num_slots, self.layout.in_features
                slots = slice(None) if slot is None else slice(slot, slot + 1)
                narrow = [t.view(c, -1, d_in)[slots] for t in self._narrow_rows()]
                self.slot_narrow[slots] = torch.cat(narrow, 1)
            return
        if self.kernel != "triton":
            folded[self.layout.out_features :].copy_(self._adapter_fold(folded))
        else:
            folded[:, self.layout.in_features :].copy_(self._adapter_fold(folded))

    def _narrow_rows(self) -> list[torch.Tensor]:
        """The pool's rows that ride on the base product: [A ; A0 ; P], every slot's."""
        rows = [self.lora_a]
        if self.always_a is not None:
            rows.append(self.always_a)
        if self.fold_router:
            rows.append(self.router)
        return rows

    def _adapter_fold(self, like: torch.Tensor) -> torch.Tensor:
        """The pool's rows [A ; A0 ; P] (torch kernel) or columns [block-diagonal B | B0]
        (triton) of the folded weight, in `like`'s dtype and device."""
        if self.kernel != "triton":
            return torch.cat([t.to(like.dtype) for t in self._narrow_rows()])
        layout = self.layout
        b = torch.zeros(
            layout.out_features, layout.pool_width + layout.always_width, dtype=like.dtype,
            device=like.device,
        )  # fmt: skip
        if self.count_b:  # block-diagonal per slot: the pool's columns, then the always-on ones
            width, r0, s = layout.num_loras * layout.rank, layout.always_rank, layout.num_parts
            columns = layout.part_columns()
            for slot in range(layout.num_slots):
                for j, part in enumerate(layout.adapted):
                    start = (slot * s + j) * width
                    b[columns[part], start : start + width] = self.lora_b[j][
                        :, slot * width : (slot + 1) * width
                    ]
                    if r0:
                        start = layout.pool_width + (slot * s + j) * r0
                        b[columns[part], start : start + r0] = self.always_b[j][
                            :, slot * r0 : (slot + 1) * r0
                        ]
        return b

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
        if self.kernel == "triton" and self.grouped:
            out = self._forward_triton_grouped(x, gemm, reduce)
        elif self.kernel == "triton":
            out = gemm(self._route_triton(x, reduce))
        else:
            out = self._forward_torch(x, gemm, reduce)
        return out if bias is None else out.add_(bias)

    def _forward_torch(self, x: torch.Tensor, gemm: Gemm, reduce: Callable | None) -> torch.Tensor:
        layout = self.layout
        s, n, c = layout.num_parts, layout.num_loras, layout.num_slots
        slots = self.token_slots(x.shape[0])
        base, lora_h, always_h, logits = self._narrow_products(x, gemm)
        if reduce is not None:  # the shared logits are whole already
            lora_h = reduce(lora_h.contiguous())
            logits = logits if self._shared else reduce(logits.contiguous())
            always_h = reduce(always_h.contiguous()) if layout.always_rank else always_h
        dense_slots = c > 1 and not self.grouped
        if dense_slots:  # each token's own slot's products
            lora_h, logits = pick_slot(lora_h, slots, c), pick_slot(logits, slots, c)
        logits = logits.unflatten(-1, (s, n))
        if self.router_bias is not None:
            bias = self.router_bias.view(c, s, n)
            logits = logits + (bias[0] if c == 1 else bias[slots.clamp(min=0)])
        if self.kernel == "numba":
            hidden, selected = self._route_numba(logits, lora_h, slots)
        else:
            selected = topk_select(logits, layout.top_k)  # [T, S, k]
            gates = routing_gates(logits, selected, layout.omega, layout.weighting)  # [T, S, n]
            if slots is not None:  # base-model tokens: no adapter
                gates = gates * (slots >= 0).to(gates.dtype)[:, None, None]
            record_routing(self.stats, self.step_selected, logits, gates, self.constant_k, slots)
            hidden = self._gate_hidden(lora_h, gates)
        if self.capture_selections:
            self._capture(selected, slots)
        if self.grouped:
            return self._add_slot_b_products(base, hidden, always_h)
        if dense_slots:
            hidden = spread_to_slots(hidden, slots, c)
        if layout.always_rank:  # the always-on hidden states follow the gated ones, ungated
            hidden = torch.cat([hidden, self._always_hidden(always_h, slots, hidden.dtype)], -1)
        return self._add_pool_outputs(base, hidden)

    def _narrow_products(
        self, x: torch.Tensor, gemm: Gemm
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base product [T, d_out], the pool's hidden states, the always-on LoRAs' and the
        router logits (before any reduce; every slot's, or each token's own when grouped)."""
        layout = self.layout
        if self.grouped:
            base, narrow = gemm(x), x.new_empty(x.shape[0], self.slot_narrow.shape[1])
            groups = self._slots[0]
            own_slot_products(x, groups.order, groups.counts, self.slot_narrow, narrow)
        else:
            y = gemm(x)
            base, narrow = y[:, : layout.out_features], y[:, layout.out_features :]
        slots_held = 1 if self.grouped else layout.num_slots  # the products' columns: each
        width = slots_held * layout.slot_width  # token's own slot's, or every slot's
        a_width = width + slots_held * layout.num_parts * layout.always_rank
        lora_h, always_h = narrow[:, :width], narrow[:, width:a_width]
        if self._shared:
            logits = self._shared_logits(x)
        elif self.fold_router:
            logits = narrow[:, a_width:]
        else:
            logits = F.linear(x.float(), self.router)
        return base, lora_h, always_h, logits

    def _add_slot_b_products(
        self,
        base: torch.Tensor,
        hidden: torch.Tensor,
        always_h: torch.Tensor,
    ) -> torch.Tensor:
        """Grouped: base + each token's own slot's B products, in place ([S, T, n*r] gated
        hidden states; always-on ones [T, S*r0], ungated)."""
        layout = self.layout
        if not self.count_b:  # as in _add_pool_outputs
            return base.contiguous()
        always = None
        if layout.always_rank:
            always = always_h.view(-1, layout.num_parts, layout.always_rank).transpose(0, 1)
        groups = self._slots[0]
        add_slot_b_products(
            base, groups.order, groups.counts, hidden, list(self.lora_b), always,
            list(self.always_b), self._b_bounds,
        )  # fmt: skip
        return base

    def token_slots(self, tokens: int) -> torch.Tensor | None:
        """This step's checkpoint slot of each token [T] (-1: base model), None without slots."""
        return self._slots[0].current(tokens) if self._slots else None

    def _capture(self, selected: torch.Tensor, slots: torch.Tensor | None) -> None:
        """Keep this forward's selections [T, S, k] (-1 for base-model tokens)."""
        selected = selected.detach().clone()
        if slots is not None:
            selected[slots < 0] = -1
        self.captured.append(selected)

    def _always_hidden(
        self, always_h: torch.Tensor, slots: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """The always-on LoRAs' hidden states [T, C*S*r0] -> part-major [S, T, C*r0]: each
        token's in its own slot's columns, zero elsewhere and for base-model tokens."""
        layout = self.layout
        c, s, r0 = layout.num_slots, layout.num_parts, layout.always_rank
        tokens = always_h.shape[0]
        by_part = always_h.reshape(tokens, c, s, r0).permute(2, 0, 1, 3)  # [S, T, C, r0]
        if slots is not None:
            owner = F.one_hot(slots.clamp(min=0), c) * (slots >= 0)[:, None]
            by_part = by_part * owner.to(by_part.dtype)[None, :, :, None]
        return by_part.reshape(s, tokens, c * r0).to(dtype)

    def _shared_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The shared router's logits of this step, [T, S*n]: the same for every part (run
        here first if this pool reads the first layer's input)."""
        shared = self._shared[0]
        if self.routes_shared:
            shared.route(x)
        return shared.logits(x.shape[0]).repeat(1, self.layout.num_parts)

    def _route_numba(
        self, logits: torch.Tensor, lora_h: torch.Tensor, slots: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated hidden states [S, T, n*r] and top-k [T, S, k] from ONE compiled call."""
        from remix_infer.ops.cpu_route import route_cpu

        layout = self.layout
        tokens, s = logits.shape[0], layout.num_parts
        hidden = lora_h.new_empty(s, tokens, layout.num_loras * layout.rank)
        selected = torch.empty(tokens, s, layout.top_k, dtype=torch.long)
        route_cpu(
            logits, lora_h, hidden, selected, self.stats, self.step_selected, layout.top_k,
            layout.omega, layout.weighting == "softmax_topk", slots,
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

    def _forward_triton_grouped(
        self, x: torch.Tensor, gemm: Gemm, reduce: Callable | None
    ) -> torch.Tensor:
        """Several slots, grouped (triton_grouped.py): the base GEMM alone, each slot's A,
        router and always-on products and routing on its own tokens, then each slot's B
        products added into its tokens' rows."""
        from remix_infer.ops.triton_grouped import expand

        order, counts = self._slots[0].order, self._slots[0].counts  # grouped once per step
        hidden, always_h = self._grouped_hidden(x, order, counts, reduce)
        out = gemm(x)
        if self.count_b:
            expand(
                out, order, counts, hidden, list(self.lora_b), always_h,
                list(self.always_b), self._b_bounds,
            )  # fmt: skip
        return out

    def _grouped_hidden(
        self,
        x: torch.Tensor,
        order: torch.Tensor,
        counts: torch.Tensor,
        reduce: Callable | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each token's own slot's gated hidden states [T, S*n*r] and always-on ones [T, S*r0]
        (None without), routed. A row-parallel shard computes its partial products first,
        `reduce` sums them over the ranks, and the kernel routes the sums."""
        from remix_infer.ops.triton_grouped import shrink, shrink_route

        layout = self.layout
        tokens, s, n, r0 = x.shape[0], layout.num_parts, layout.num_loras, layout.always_rank
        hidden = x.new_empty(tokens, layout.slot_width)
        always_h = x.new_empty(tokens, s * r0) if r0 else None
        route_args = (
            self.stats, self.step_selected, self.semaphore, n, layout.rank, layout.top_k,
            layout.omega, layout.weighting == "softmax_topk",
        )  # fmt: skip
        if reduce is None:
            shrink_route(
                x, order, counts, self.lora_a, self.router, self.router_bias, self.always_a,
                hidden, always_h, *route_args,
            )  # fmt: skip
            return hidden, always_h
        lora_h = x.new_empty(tokens, layout.slot_width, dtype=torch.float32)
        logits = x.new_empty(tokens, s * n, dtype=torch.float32)
        partial_always = torch.empty_like(always_h, dtype=torch.float32) if r0 else None
        shrink(
            x, order, counts, self.lora_a, self.router, self.always_a, lora_h, logits,
            partial_always, self.semaphore, n, layout.rank,
        )  # fmt: skip
        lora_h, logits = reduce(lora_h), reduce(logits)
        shrink_route(
            x, order, counts, self.lora_a, self.router, self.router_bias, None, hidden, None,
            *route_args, lora_h=lora_h, logits=logits,
        )  # fmt: skip
        return hidden, reduce(partial_always).to(x.dtype) if r0 else None

    def _route_triton(self, x: torch.Tensor, reduce: Callable | None) -> torch.Tensor:
        """[x | gated h] for the column-stacked GEMM, written by the routing kernel. With
        several slots the products run here (every slot's), each token keeps its own slot's, and
        the kernel writes its gated hidden states into its slot's columns of a zeroed x_cat."""
        layout = self.layout
        c, s, n = layout.num_slots, layout.num_parts, layout.num_loras
        slots = self.token_slots(x.shape[0])
        lora_h = logits = None
        bias = self.router_bias
        if reduce is not None or self._shared or c > 1:  # the kernel routes given products
            lora_h = F.linear(x, self.lora_a).float()
            lora_h = lora_h if reduce is None else reduce(lora_h)  # a shard's partial products
            if self._shared:
                logits = self._shared_logits(x)
            else:
                logits = F.linear(x.float(), self.router)
                logits = logits if reduce is None else reduce(logits)
        if c > 1:
            lora_h, logits = pick_slot(lora_h, slots, c), pick_slot(logits, slots, c)
            if bias is not None:  # each token's own slot's bias, added here
                picked = bias.view(c, s * n)[slots.clamp(min=0)]
                logits, bias = logits + picked, None
        from remix_infer.ops.triton_route import route

        width = layout.in_features + layout.pool_width + layout.always_width
        x_cat = x.new_zeros(x.shape[0], width) if c > 1 else x.new_empty(x.shape[0], width)
        if layout.always_rank:  # the always-on hidden states, in the columns after the pool's
            always_h = F.linear(x, self.always_a)
            always_h = always_h if reduce is None else reduce(always_h.float()).to(x.dtype)
            if slots is not None:
                always_h = self._always_hidden(always_h, slots, x.dtype)
                always_h = always_h.view(s, -1, c, layout.always_rank).permute(1, 2, 0, 3)
                always_h = always_h.reshape(x.shape[0], -1)  # back to slot-major, part-major
            x_cat[:, layout.in_features + layout.pool_width :] = always_h
        route(
            x, self.lora_a, self.router, bias, x_cat, self.stats,
            self.step_selected, self.semaphore, lora_h, logits,
            layout.num_loras, layout.rank, layout.top_k, layout.omega,
            layout.weighting == "softmax_topk", slots, c,
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
        """Rebuild the one GEMM's weight after the pool's tensors and the base weight changed."""
        self.folded = self.pool.fold_base_weight(weight)
        self.pool.prepare()

    def refresh(self, slot: int | None = None) -> None:
        """After the pool's tensors changed in place (a slot loaded or cleared; None: any): rewrite
        the pool's part of the one GEMM's weight in place, so compiled graphs see it."""
        self.pool.refresh_fold(self.folded, slot)
        self.pool.refresh_products()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x, lambda z: F.linear(z, self.folded))
