"""Checkpoint slots: several checkpoints over one base model in one set of pools.

A pool sized for C slots holds C checkpoints' LoRAs and routers side by side (slot-major, see
pool.py). Each token of a step belongs to one slot, the checkpoint its request asked for, or to
BASE_MODEL_SLOT (-1): the base model, no adapter (its gates are zero and it is not counted in the
routing statistics). The engine writes every token's slot into one `TokenSlots` buffer before each
forward; every pool reads it in place, so compiled graphs and CUDA graphs see each step's values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remix_infer.ops.custom_op import remix_op

BASE_MODEL_SLOT = -1


class TokenSlots(nn.Module):
    """index [max_step_tokens] int64: the slot of each token of the running step (-1: base)."""

    def __init__(self, max_step_tokens: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer(
            "index",
            torch.zeros(max_step_tokens, dtype=torch.int64, device=device),
            persistent=False,
        )

    def fill(self, slots: torch.Tensor) -> None:
        """This step's slots [T] (on any device); rows past T (padding) become the base model."""
        tokens = slots.shape[0]
        self.index[:tokens].copy_(slots, non_blocking=True)
        self.index[tokens:].fill_(BASE_MODEL_SLOT)

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


# --- grouped products (CPU, several slots): each slot's products on its own tokens only --------
# The dense path above runs every slot's A and B for every token (C times the adapter FLOPs, paid
# by base-model tokens too). These two ops gather each slot's tokens and run that slot's products
# on them alone: the adapter FLOPs of one checkpoint, and none for base-model tokens. The groups'
# sizes change every step, so they are custom ops (opaque to torch.compile).


def slot_groups(slots: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, its tokens' rows) for every slot with tokens this step, base-model tokens left out;
    rows None: the slot has every token (no gather needed)."""
    tokens = slots.shape[0]
    counts = torch.bincount(slots + 1).tolist()  # counts[0]: base-model tokens
    if counts[0] == tokens:
        return []
    if counts[-1] == tokens:
        return [(len(counts) - 2, None)]
    order = torch.argsort(slots, stable=True)
    groups, start = [], counts[0]
    for slot, count in enumerate(counts[1:]):
        if count:
            groups.append((slot, order[start : start + count]))
        start += count
    return groups


def _rows(values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return values if rows is None else values.index_select(0, rows)


def _write_rows(out: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor) -> None:
    if rows is None:
        out.copy_(values)
    else:
        out.index_copy_(0, rows, values)


@remix_op("own_slot_products", mutates_args=("lora_h", "logits", "always_h"))
def own_slot_products(
    x: torch.Tensor,
    slots: torch.Tensor,
    lora_a: torch.Tensor,
    router: torch.Tensor,
    always_a: torch.Tensor | None,
    lora_h: torch.Tensor,
    logits: torch.Tensor,
    always_h: torch.Tensor | None,
) -> None:
    """x [T, d_in] -> each token's own slot's pool hidden states lora_h [T, S*n*r], router
    logits [T, S*n] (float32, no bias) and always-on hidden states always_h [T, S*r0]; zero for
    base-model tokens. lora_a, router, always_a: every slot's rows, slot-major."""
    lora_h.zero_()
    logits.zero_()
    if always_h is not None:
        always_h.zero_()
    width, n_logits = lora_h.shape[1], logits.shape[1]
    for slot, rows in slot_groups(slots):
        xs = _rows(x, rows)
        _write_rows(lora_h, rows, F.linear(xs, lora_a[slot * width : (slot + 1) * width]))
        own_router = router[slot * n_logits : (slot + 1) * n_logits]
        _write_rows(logits, rows, F.linear(xs.float(), own_router))
        if always_h is not None:
            r0 = always_h.shape[1]
            _write_rows(always_h, rows, F.linear(xs, always_a[slot * r0 : (slot + 1) * r0]))


@remix_op("add_slot_b_products", mutates_args=("out",))
def add_slot_b_products(
    out: torch.Tensor,
    slots: torch.Tensor,
    hidden: torch.Tensor,
    lora_b: list[torch.Tensor],
    always_h: torch.Tensor | None,
    always_b: list[torch.Tensor],
    part_columns: list[int],
) -> None:
    """out [T, d_out] += each token's gated hidden states hidden [S, T, n*r] (and always-on
    ones always_h [S, T, r0]) times its own slot's B of each part; base-model tokens untouched.
    lora_b[j] [d_out_j, C*n*r], always_b[j] [d_out_j, C*r0]: every slot's columns, slot-major;
    part_columns: the first and past-the-last output column of each part, flattened."""
    width = hidden.shape[2]
    for slot, rows in slot_groups(slots):
        for j, b in enumerate(lora_b):
            product = F.linear(_rows(hidden[j], rows), b[:, slot * width : (slot + 1) * width])
            if always_h is not None:
                r0 = always_h.shape[2]
                b0 = always_b[j][:, slot * r0 : (slot + 1) * r0]
                product += F.linear(_rows(always_h[j], rows), b0)
            columns = out[:, part_columns[2 * j] : part_columns[2 * j + 1]]
            if rows is None:
                columns.add_(product)
            else:
                columns.index_add_(0, rows, product)
