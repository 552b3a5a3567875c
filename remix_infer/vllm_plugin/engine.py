"""How a vLLM engine is pointed at a ReMix checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from remix_infer.checkpoint import RemixCheckpoint, load_checkpoint
from remix_infer.config import FAMILIES

WORKER_EXTENSION = "remix_infer.vllm_plugin.worker.RemixWorkerExtension"


def remix_engine_kwargs(checkpoint: str | os.PathLike | RemixCheckpoint) -> dict[str, Any]:
    """Engine arguments (for vllm.LLM / AsyncEngineArgs) that serve a ReMix checkpoint.

    Validates the checkpoint first, so a bad one is refused before any engine process starts.
    The engine loads the base model from its own directory (weights are not copied); the
    plugin's model class reads the adapters from the checkpoint named in hf_overrides.
    """
    ckpt = checkpoint if isinstance(checkpoint, RemixCheckpoint) else load_checkpoint(checkpoint)
    return {
        "model": ckpt.base_model_path,
        "tokenizer": ckpt.base_model_path,
        "revision": ckpt.config.base_model_revision,
        "hf_overrides": {
            "architectures": [FAMILIES[ckpt.config.architecture].vllm_architecture],
            "remix_checkpoint": str(Path(ckpt.path).resolve()),
        },
        "worker_extension_cls": WORKER_EXTENSION,
    }
