"""Checkpoint slots: several checkpoints over one base model in one set of pools.

A pool sized for C slots holds C checkpoints' LoRAs and routers side by side (slot-major, see
pool.py). Each token of a step belongs to one slot, the checkpoint its request asked for, or to
BASE_MODEL_SLOT (-1): the base model, no adapter (its gates are zero and it is not counted in the
routing statistics). The engine writes every token's slot into one `TokenSlots` buffer before each
forward; every pool reads it in place, so compiled graphs and CUDA graphs see each step's values.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from remix_infer.ops.custom_op import remix_op

Gemm = Callable[[torch.Tensor], torch.Tensor]

BASE_MODEL_SLOT = -1


class TokenSlots(nn.Module):
    """index [max_step_tokens] int64: the slot of each token of the running step (-1: base);
    order and counts: the same tokens grouped by slot (stable; base-model tokens first) and
    how many each slot has (counts[0]: the base model's), which the grouped products read."""

    def __init__(
        self, max_step_tokens: int, num_slots: int = 1, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        for name, size in (("index", max_step_tokens), ("order", max_step_tokens)):
            self.register_buffer(
                name, torch.zeros(size, dtype=torch.int64, device=device), persistent=False
            )
        self.register_buffer(
            "counts", torch.zeros(num_slots + 1, dtype=torch.int64, device=device), persistent=False
        )

    def fill(self, slots: torch.Tensor) -> None:
        """This step's slots [T] (on any device); rows past T (padding) become the base model.
        Groups the tokens once here, for every pool of the step (no host read: CUDA graphs)."""
        tokens = slots.shape[0]
        self.index[:tokens].copy_(slots, non_blocking=True)
        self.index[tokens:].fill_(BASE_MODEL_SLOT)
        filled = self.index[:tokens]
        self.counts.zero_().index_add_(0, filled + 1, torch.ones_like(filled))
        self.order[:tokens].copy_(torch.argsort(filled, stable=True))

    def current(self, tokens: int) -> torch.Tensor:
        return self.index[:tokens]


def pick_slot(values: torch.Tensor, slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """values [T, C*w] (slot-major columns, rows may be strided) -> each token's own slot's
    columns [T, w]; base-model tokens get slot 0's (their gates are zeroed later)."""
    tokens = values.shape[0]
    by_slot = values.unflatten(-1, (num_slots, -1))
    index = slots.clamp(min=0).view(tokens, 1, 1).expand(tokens, 1, by_slot.shape[-1])
    return by_slot.gather(1, index).squeeze(1)


def spread_to_slots(values: torch.Tensor, slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """values [P, T, w] (each token's own slot) -> [P, T, C*w], zero in the other slots' columns
    and everywhere for base-model tokens: the input of one product with every slot's B."""
    owner = F.one_hot(slots.clamp(min=0), num_slots).to(values.dtype)
    owner = owner * (slots >= 0).to(values.dtype)[:, None]
    return (values[:, :, None, :] * owner[None, :, :, None]).flatten(2)


# --- grouped products (CPU): each slot's products on its own tokens only ------------------------
# The dense path above runs every slot's A and B for every token (C times the adapter FLOPs, paid
# by base-model tokens too). These two ops gather each slot's tokens and run that slot's products
# on them alone: the adapter FLOPs of one checkpoint, and none for base-model tokens. The groups'
# sizes change every step, so they are custom ops (opaque to torch.compile). The products are the
# binding's GEMM kernel (oneDNN with prepacked weights in vLLM, as the base GEMM): callables, which
# a custom op's schema cannot carry, so the ops find them by an index (`register_products`).


class SlotProducts(Protocol):
    """A grouped path's prepared products: narrow[c] (x -> x [A ; A0 ; P]_c^T) and b[c][j]
    (each part j's [B | B0] of slot c, h -> h [B | B0]_cj^T), each x' -> a new tensor; and
    slot_b[j] (each part's [B | B0] of every slot, [C, d_out_j, n*r + r0]) as they are."""

    narrow: list[Gemm]
    b: list[list[Gemm]]
    slot_b: list[torch.Tensor]


_PRODUCTS: list[weakref.ref] = []  # index -> a path's SlotProducts (weak: pools come and go)


def register_products(products: SlotProducts) -> int:
    """The index by which the grouped ops find `products` (kept alive by their owner)."""
    _PRODUCTS.append(weakref.ref(products))
    return len(_PRODUCTS) - 1


def registered(index: int) -> SlotProducts:
    """The products registered under `index` (their owner alive: it is running them)."""
    return _PRODUCTS[index]()


def slot_groups(order: torch.Tensor, counts: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, its tokens' rows) for every slot with tokens this step, from TokenSlots' order and
    counts; base-model tokens left out; rows None: the slot has every token (no gather). Found
    once per step, not once per projection: kept on the counts tensor with its version, which
    TokenSlots.fill bumps."""
    cached = getattr(counts, "_remix_groups", None)
    if cached is not None and cached[0] == counts._version:
        return cached[1]
    counts_of = counts.tolist()  # [0]: base-model tokens
    tokens = sum(counts_of)
    groups, start = [], counts_of[0]
    for slot, count in enumerate(counts_of[1:]):
        if count == tokens:
            groups = [(slot, None)]
            break
        if count:
            groups.append((slot, order[start : start + count]))
        start += count
    counts._remix_groups = (counts._version, groups)
    return groups


@remix_op("own_slot_products", mutates_args=("out",))
def own_slot_products(
    x: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, products: int, out: torch.Tensor
) -> None:
    """x [T, d_in] -> out [T, w]: each token's product with its own slot's narrow rows
    ([A ; A0 ; P] of that slot: the registered products' `narrow`); zero for base-model
    tokens. order, counts: the step's tokens grouped by slot (TokenSlots)."""
    narrow = registered(products).narrow
    groups = slot_groups(order, counts)
    if len(groups) == 1 and groups[0][1] is None:  # one slot has every token: no gather
        product = narrow[groups[0][0]]
        if hasattr(product, "into"):
            product.into(x, out)
        else:
            out.copy_(product(x))
        return
    out.zero_()  # base-model tokens' rows
    for slot, rows in groups:
        out.index_copy_(0, rows, narrow[slot](x.index_select(0, rows)))


@remix_op("add_slot_b_products", mutates_args=("out",))
def add_slot_b_products(
    out: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    hidden: torch.Tensor,
    products: int,
    part_columns: list[int],
) -> None:
    """out [T, d_out] += each token's hidden states hidden [S, T, n*r + r0] (gated, then the
    always-on ones) times its own slot's [B | B0] of each part (the registered products' `b`);
    base-model tokens untouched. part_columns: the first and past-the-last output column of
    each part, flattened."""
    products = registered(products)
    for slot, rows in slot_groups(order, counts):
        for j, product in enumerate(products.b[slot]):
            columns = out[:, part_columns[2 * j] : part_columns[2 * j + 1]]
            if rows is None:  # added by the GEMM itself: no product in memory to add after
                columns.addmm_(hidden[j], products.slot_b[j][slot].t())
            else:
                columns.index_add_(0, rows, product(hidden[j].index_select(0, rows)))
