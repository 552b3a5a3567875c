"""The models one server serves: its ReMix checkpoints, each in an engine slot, and optionally
the base model alone (no adapters). One table of what is in a slot, so that the routing metrics'
`checkpoint` label and the admin load/unload endpoints agree; server/store.py decides what is
servable and what a request's `model` names.

Each entry counts its requests in flight (an unload waits for them) and carries a load
number: its prefix-cache salt is its name plus that number, so the KV cached under one
checkpoint (whose adapters change K and V) is never reused under another, nor under a later
load of the same name.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

from remix_infer.config import RemixConfig
from remix_infer.vllm_plugin.engine import BASE_MODEL_SLOT


@dataclass(eq=False)
class ServedModel:
    """One name clients can send as `model`."""

    name: str
    slot: int  # the engine's checkpoint slot; BASE_MODEL_SLOT for the base model
    path: Path  # the checkpoint directory (the base model's directory for the base model)
    config: RemixConfig | None  # None: no ReMix adapters, so no routing to report
    load_number: int
    created: int = field(default_factory=lambda: int(time.time()))
    pinned: bool = True  # never evicted by the store (--checkpoint, admin loads, base model)
    in_flight: int = 0
    # loaded for requests that have not taken it yet (server/store.py): not evictable meanwhile
    pending: int = 0
    last_used: float = field(default_factory=time.monotonic)  # the store evicts the oldest
    unloading: bool = False  # new requests are refused while an unload waits for in-flight ones
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def is_base(self) -> bool:
        return self.slot == BASE_MODEL_SLOT

    @property
    def cache_salt(self) -> str:
        """vLLM's per-request prefix-cache salt: KV is shared only between requests to the same
        load of the same model."""
        return f"{self.name}#{self.load_number}"


class ModelTable:
    """Checkpoints by name and slot (at most `max_slots`), plus the base model if served."""

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self.models: dict[str, ServedModel] = {}  # in the order they were added
        self._load_numbers = itertools.count()

    def add(
        self, name: str, slot: int, path: Path, config: RemixConfig | None, pinned: bool = True
    ) -> ServedModel:
        """Register `name` (in `slot`, or BASE_MODEL_SLOT); the caller checked it is free."""
        assert name not in self.models and (slot == BASE_MODEL_SLOT or slot not in self.by_slot())
        model = ServedModel(name, slot, path, config, next(self._load_numbers), pinned=pinned)
        self.models[name] = model
        return model

    def remove(self, name: str) -> ServedModel:
        return self.models.pop(name)

    def listed(self) -> list[ServedModel]:
        """What /v1/models shows: the checkpoints in slot order, then the base model."""
        return sorted(self.models.values(), key=lambda m: (m.is_base, m.slot))

    def by_slot(self) -> dict[int, ServedModel]:
        return {m.slot: m for m in self.models.values() if not m.is_base}

    def free_slot(self) -> int | None:
        used = self.by_slot()
        return next((s for s in range(self.max_slots) if s not in used), None)

    @staticmethod
    def acquire(model: ServedModel) -> None:
        """Count one request in flight for `model` (released by `release`)."""
        model.in_flight += 1
        model.last_used = time.monotonic()
        model.idle.clear()

    @staticmethod
    def release(model: ServedModel) -> None:
        model.in_flight -= 1
        model.last_used = time.monotonic()
        if model.in_flight == 0:
            model.idle.set()
