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
