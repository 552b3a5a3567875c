"""A small wrapper around vLLM's AsyncLLM serving one ReMix checkpoint (or, for comparisons, a
plain base model with no adapters).

The checkpoint is validated (`remix_engine_kwargs`) when the wrapper is built, so a bad
checkpoint is refused before any engine process is spawned. `start()` builds the engine in a
worker thread, so the HTTP server answers /health and /ready (503) while the engine loads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remix_infer.checkpoint import RemixCheckpoint, load_checkpoint
from remix_infer.config import RemixConfig
from remix_infer.vllm_plugin.engine import remix_engine_kwargs

log = logging.getLogger("remix_serve.engine")


@dataclass
class EngineSettings:
    """Serving settings for the engine (everything except what the checkpoint decides)."""

    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    kv_cache_gib: int | None = None  # CPU: VLLM_CPU_KVCACHE_SPACE (whole GiB); GPU: ignored
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # any further AsyncEngineArgs


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # pragma: no cover - platform detection never fails in practice
        return True


class RemixEngine:
    """One AsyncLLM over a ReMix checkpoint, with the routing statistics of its workers."""

    def __init__(
        self,
        checkpoint: str | os.PathLike | None,
        settings: EngineSettings | None = None,
        base_model: str | os.PathLike | None = None,
    ) -> None:
        """Serve `checkpoint`, or (checkpoint None) the plain Hugging Face model `base_model`
        with no adapters: the same server without ReMix, to compare against."""
        if (checkpoint is None) == (base_model is None):
            raise ValueError("give either a ReMix checkpoint or a base model")
        self.settings = settings or EngineSettings()
        self.checkpoint: RemixCheckpoint | None = None
        if checkpoint is not None:
            self.checkpoint = load_checkpoint(checkpoint)  # raises CheckpointError
            self.engine_kwargs = remix_engine_kwargs(self.checkpoint)
            self.path = Path(self.checkpoint.path)
        else:
            self.path = Path(base_model)
            self.engine_kwargs = {"model": str(self.path), "tokenizer": str(self.path)}
        self.engine: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self.tokenizer: Any = None
        self.max_model_len: int = 0
        self.vocab_size: int = 0
        self.error: BaseException | None = None
        self.started_at: float | None = None
        self.stat_loggers: list[Any] = []  # vLLM StatLoggerFactory's, given to the engine at start

    @property
    def remix_config(self) -> RemixConfig | None:
        """The served checkpoint's ReMix configuration; None for a plain base model."""
        return self.checkpoint.config if self.checkpoint is not None else None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.error is None and not self.engine.errored

    def describe(self) -> str:
        if self.checkpoint is None:
            return f"base model {self.path} (no ReMix adapters)"
        cfg = self.checkpoint.config
        return (
            f"ReMix checkpoint {self.path} ({cfg.architecture}, {cfg.num_layers} layers, "
            f"{cfg.num_loras} LoRAs of rank {cfg.rank}, top-{cfg.top_k}) over base model "
            f"{self.checkpoint.base_model_path}"
        )

    def _engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        s = self.settings
        kwargs: dict[str, Any] = dict(self.engine_kwargs)
        kwargs.update(
            # "auto": the checkpoint's own dtype (vLLM's auto picks bfloat16 on CPU)
            dtype=self.remix_config.dtype if s.dtype == "auto" and self.remix_config else s.dtype,
            tensor_parallel_size=s.tensor_parallel_size,
            enforce_eager=s.enforce_eager,
            seed=s.seed,
            disable_log_stats=False,
        )
        if s.max_model_len is not None:
            kwargs["max_model_len"] = s.max_model_len
        if s.max_num_seqs is not None:
            kwargs["max_num_seqs"] = s.max_num_seqs
        if s.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = s.max_num_batched_tokens
        if _on_cpu():
            # The CPU backend checks against one NUMA node's free memory: stay well below it.
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization or 0.5
            if s.tensor_parallel_size > 1:
                kwargs.setdefault("distributed_executor_backend", "mp")
        elif s.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        kwargs.update(s.extra)
        return AsyncEngineArgs(**kwargs)

    def _build(self) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        if _on_cpu():
            if s.kv_cache_gib is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(s.kv_cache_gib)
            else:
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
            if s.tensor_parallel_size > 1:
                os.environ.setdefault(
                    "VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, range(s.tensor_parallel_size)))
                )
        return AsyncLLM.from_engine_args(
            self._engine_args(), stat_loggers=self.stat_loggers or None
        )

    async def start(self) -> None:
        """Build the engine (in a thread: it blocks for tens of seconds) and clear the routing
        counters that its warm-up's dummy tokens moved."""
        t0 = time.perf_counter()
        try:
            engine = await asyncio.to_thread(self._build)
            self.tokenizer = engine.get_tokenizer()
            self.max_model_len = engine.model_config.max_model_len
            self.vocab_size = engine.model_config.get_vocab_size()
            self.engine = engine
            if self.checkpoint is not None:
                await self.reset_routing_stats()
                await engine.collective_rpc("remix_track_request_routing")
        except BaseException as e:
            self.error = e
            raise
        self.started_at = time.time()
        log.info(
            "engine ready in %.1f s (max_model_len %d)",
            time.perf_counter() - t0,
            self.max_model_len,
        )

    async def generate(
        self, prompt_token_ids: list[int], params: Any, request_id: str
    ) -> AsyncIterator[Any]:
        """RequestOutputs of one prompt. Cancelling the consumer (a client that went away)
        aborts the request in the engine (AsyncLLM.generate does so on cancel/close)."""
        async for out in self.engine.generate(
            {"prompt_token_ids": prompt_token_ids}, params, request_id
        ):
            yield out

    async def abort(self, request_id: str) -> None:
        if self.engine is not None:
            await self.engine.abort(request_id)

    async def routing_stats(self) -> dict[str, list[float]]:
        """{hf module name: [count per LoRA..., tokens, entropy sum, ess sum]} summed over
        workers (TP ranks route identically, so rank 0's figures are taken); {} without
        adapters."""
        if self.checkpoint is None:
            return {}
        results = await self.engine.collective_rpc("remix_routing_stats")
        first = results[0] if results else {}
        return {name: [float(x) for x in row] for name, row in first.items()}

    async def take_request_routing(self, key: str) -> dict[str, Any] | None:
        """The routing summary of the requests sent with extra_args[ROUTING_KEY] = key, once they
        have finished: {"tokens": n, "modules": {hf module: selections per LoRA}}."""
        merged: dict[str, Any] | None = None
        for part in await self.engine.collective_rpc("remix_take_request_routing", args=(key,)):
            if part is None:
                continue
            if merged is None:
                merged = {"tokens": part["tokens"], "modules": {}}
            merged["modules"].update(part["modules"])  # TP ranks agree; PP stages add layers
        return merged

    async def reset_routing_stats(self) -> None:
        await self.engine.collective_rpc("remix_reset_routing_stats")

    def num_unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests() if self.engine is not None else 0

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
