"""How a vLLM engine is pointed at one or several ReMix checkpoints over one base model.

Several checkpoints share one engine through checkpoint slots (remix_infer/ops/slots.py): every
pool holds max_checkpoints checkpoints side by side, sized from the first checkpoint's config,
and a request picks its slot with SamplingParams.extra_args[CHECKPOINT_SLOT_KEY] (absent: slot
0; BASE_MODEL_SLOT: the base model, no adapter). Slots can be loaded and emptied while serving
(worker RPCs remix_load_checkpoint / remix_unload_checkpoint, worker.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remix_infer.checkpoint import RemixCheckpoint, load_checkpoint
from remix_infer.config import CONFIG_FILE, FAMILIES
from remix_infer.ops.slots import BASE_MODEL_SLOT

WORKER_EXTENSION = "remix_infer.vllm_plugin.worker.RemixWorkerExtension"
CHECKPOINT_SLOT_KEY = "remix_checkpoint_slot"  # SamplingParams.extra_args[...] = slot (int)
__all__ = [
    "BASE_MODEL_SLOT",
    "CHECKPOINT_SLOT_KEY",
    "check_slot_compatible",
    "remix_engine_kwargs",
]

# Config fields every checkpoint of an engine must share: the slot kernels run one n, k, omega,
# weighting, scope and always-on rank for all slots, over one set of adapted modules.
SHARED_FIELDS = (
    "architecture",
    "num_layers",
    "num_loras",
    "top_k",
    "omega",
    "weighting",
    "routing_scope",
    "always_on_rank",
    "dtype",
)

CheckpointLike = str | os.PathLike | RemixCheckpoint


def _loaded(checkpoint: CheckpointLike) -> RemixCheckpoint:
    return checkpoint if isinstance(checkpoint, RemixCheckpoint) else load_checkpoint(checkpoint)


def check_slot_compatible(template: RemixCheckpoint, candidate: RemixCheckpoint) -> None:
    """Raise ValueError (naming candidate.path and the field) if `candidate` cannot go into a
    slot of an engine whose slots were sized from `template` (the engine's first checkpoint):
    another base model, or geometry the slot kernels do not support. Supported at no cost: a
    lower rank (zero-padded) and no router bias where the template has one (zero bias).
    Pure host-side: the server calls it before any RPC, the worker again before a slot."""
    where = f"{Path(candidate.path) / CONFIG_FILE}"
    sized_from = f"the engine's slots were sized from {template.path}"
    if Path(candidate.base_model_path) != Path(template.base_model_path) or (
        candidate.config.base_model_revision != template.config.base_model_revision
    ):
        raise ValueError(
            f"{where}: field 'base_model': base model {candidate.base_model_path} "
            f"(revision {candidate.config.base_model_revision}) is not the engine's "
            f"{template.base_model_path} (revision {template.config.base_model_revision}); "
            f"{sized_from}"
        )
    want, got = template.config, candidate.config
    for field in SHARED_FIELDS:
        if getattr(got, field) != getattr(want, field):
            raise ValueError(
                f"{where}: field '{field}' is {getattr(got, field)!r}, but {sized_from}, "
                f"whose {field} is {getattr(want, field)!r}"
            )
    if sorted(got.target_modules) != sorted(want.target_modules):
        raise ValueError(
            f"{where}: field 'target_modules' is {got.target_modules}, but {sized_from}, which "
            f"adapts {want.target_modules}"
        )
    always_on = [m for m in got.target_modules if got.carries_always_on(m)]
    if always_on != [m for m in want.target_modules if want.carries_always_on(m)]:
        raise ValueError(
            f"{where}: field 'always_on_modules' gives {always_on} an always-on LoRA, but "
            f"{sized_from}, which gives it to {want.always_on_modules or want.target_modules}"
        )
    if got.rank > want.rank:
        raise ValueError(
            f"{where}: field 'rank' is {got.rank}, above the slots' rank {want.rank} ({sized_from})"
        )
    if got.router_bias and not want.router_bias:
        raise ValueError(
            f"{where}: field 'router_bias' is true, but {sized_from}, which has no router bias"
        )


def remix_engine_kwargs(
    checkpoint: CheckpointLike | Mapping[str, CheckpointLike],
    max_checkpoints: int | None = None,
    kernel: str = "auto",
) -> dict[str, Any]:
    """Engine arguments (for vllm.LLM / AsyncEngineArgs) that serve ReMix checkpoints: one (slot
    0), or name -> checkpoint (slot i = the i-th of the mapping).

    Every checkpoint is validated and checked against the first (check_slot_compatible) before
    any engine process starts; ValueError names the checkpoint and the field. max_checkpoints
    (default: the number given) slots are sized at start; those not filled are empty (their
    tokens get no adapter) until loaded. The engine loads the base model from its own directory
    (weights are not copied); the plugin's model class reads the adapters from the checkpoints
    named in hf_overrides. kernel: the pools' kernel, auto (the device's default), triton or
    torch.
    """
    given = list(checkpoint.values()) if isinstance(checkpoint, Mapping) else [checkpoint]
    if not given:
        raise ValueError("no checkpoint given")
    checkpoints = [_loaded(c) for c in given]
    slots = len(checkpoints) if max_checkpoints is None else max_checkpoints
    if slots < len(checkpoints):
        raise ValueError(f"max_checkpoints is {slots}, fewer than the {len(checkpoints)} given")
    first = checkpoints[0]
    for other in checkpoints[1:]:
        check_slot_compatible(first, other)
    if slots > 1 and first.config.routing_scope == "shared":
        raise ValueError(
            f"{Path(first.path) / CONFIG_FILE}: field 'routing_scope' is 'shared', which is "
            f"served with one checkpoint slot only (max_checkpoints is {slots})"
        )
    return {
        "model": first.base_model_path,
        "tokenizer": first.base_model_path,
        "revision": first.config.base_model_revision,
        "hf_overrides": {
            "architectures": [FAMILIES[first.config.architecture].vllm_architecture],
            "remix_checkpoint": str(Path(first.path).resolve()),
            "remix_checkpoints": [str(Path(c.path).resolve()) for c in checkpoints],
            "remix_max_checkpoints": slots,
            "remix_kernel": kernel,
        },
        "worker_extension_cls": WORKER_EXTENSION,
    }
