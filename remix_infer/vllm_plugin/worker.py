"""Worker extension: lets the serving process read routing statistics over RPC, overall and
per request, and load or empty checkpoint slots while serving.

Checkpoint slots: before each forward, CheckpointSlotFiller writes every token's slot (its
request's SamplingParams.extra_args[CHECKPOINT_SLOT_KEY], default 0; BASE_MODEL_SLOT, an empty
slot or an unknown one: the base model) into the model's per-token slot buffer.

Per-request routing: a request whose SamplingParams.extra_args carry ROUTING_KEY has the
selections of every token the engine runs for it (prompt tokens not served from the prefix cache,
and each generated token fed back) summed under that key, after each forward step. Requests with
the same key (the choices and prompts of one HTTP request) share one summary. Steps in which no
request asked cost nothing extra.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from remix_infer.ops.slots import BASE_MODEL_SLOT
from remix_infer.vllm_plugin.engine import CHECKPOINT_SLOT_KEY

logger = logging.getLogger(__name__)
ROUTING_KEY = "remix_routing_key"
MAX_PENDING_SUMMARIES = 4096  # summaries nobody took (client gone) are dropped, oldest first


class RequestRoutingTracker:
    """Sums each keyed request's per-token selections ([parts, n] counts) after every step."""

    def __init__(self, adapters: list) -> None:
        self.adapters = adapters
        # the HF module of each row of the [P, n] totals, in adapter and part order
        self.part_names = [p for adapter in adapters for p in adapter.part_names]
        self.keys: dict[str, str] = {}  # engine request id -> routing key, while it runs
        self.totals: dict[str, torch.Tensor] = {}  # key -> selections, all parts, [P, n]
        self.tokens: dict[str, int] = {}

    def after_step(self, runner: Any, scheduler_output: Any) -> None:
        for new in scheduler_output.scheduled_new_reqs:
            extra = new.sampling_params.extra_args if new.sampling_params is not None else None
            if extra and ROUTING_KEY in extra:
                self.keys[new.req_id] = str(extra[ROUTING_KEY])
        if self.keys and scheduler_output.total_num_scheduled_tokens > 0:
            self._attribute(runner.input_batch.req_ids, scheduler_output.num_scheduled_tokens)
        for req_id in scheduler_output.finished_req_ids:
            self.keys.pop(req_id, None)

    def _attribute(self, req_ids: list[str], num_scheduled: dict[str, int]) -> None:
        """Tokens sit in the step's batch in input-batch order, each request's contiguously."""
        spans: dict[str, list[tuple[int, int]]] = {}
        start = 0
        for req_id in req_ids:
            count = num_scheduled.get(req_id, 0)
            key = self.keys.get(req_id)
            if key is not None and count:
                spans.setdefault(key, []).append((start, start + count))
            start += count
        if not spans:
            return
        device = self.adapters[0].step_selected.device
        membership = torch.zeros(len(spans), start, device=device)  # [keys, tokens]
        for row, key_spans in enumerate(spans.values()):
            for a, b in key_spans:
                membership[row, a:b] = 1
        counts = torch.cat(
            [
                membership @ adapter.step_selected[:start].flatten(1).float()
                for adapter in self.adapters
            ],
            dim=1,
        ).cpu()  # [keys, P * n]
        for row, (key, key_spans) in enumerate(spans.items()):
            step = counts[row].view(-1, self.adapters[0].layout.num_loras)
            if key in self.totals:
                self.totals[key] += step
            else:
                self.totals[key] = step.clone()
                while len(self.totals) > MAX_PENDING_SUMMARIES:
                    dropped = next(iter(self.totals))
                    del self.totals[dropped], self.tokens[dropped]
            self.tokens[key] = self.tokens.get(key, 0) + sum(b - a for a, b in key_spans)

    def take(self, key: str) -> dict[str, Any] | None:
        """{"tokens": routed tokens, "modules": {hf module: selections per LoRA}}; forgets it."""
        totals = self.totals.pop(key, None)
        if totals is None:
            return None
        rows = totals.round().long().tolist()
        return {
            "tokens": self.tokens.pop(key),
            "modules": dict(zip(self.part_names, rows, strict=True)),
        }


class CheckpointSlotFiller:
    """Fills the model's per-token slot buffer from the step's token layout, before each forward.

    It wraps the model runner's `_prepare_inputs` (vLLM 0.32's CPU and GPU runners): called by
    `execute_model` after the persistent input batch was updated and before the forward, with the
    scheduled token counts in input-batch order, each request's tokens contiguous."""

    def __init__(self, runner: Any, model: Any) -> None:
        self.runner, self.model = runner, model
        self.prepare_inputs = runner._prepare_inputs

    @classmethod
    def install(cls, model: Any) -> None:
        """Hook the runner that is loading `model` (found on the call stack: vLLM has no hook
        for a model to see its requests, and the worker extension cannot override methods)."""
        frame = inspect.currentframe()
        while frame is not None:
            owner = frame.f_locals.get("self")
            if hasattr(owner, "_prepare_inputs") and hasattr(owner, "requests"):
                if isinstance(owner._prepare_inputs, cls):  # weights loaded again: re-aim it
                    owner._prepare_inputs.model = model
                    return
                filler = cls(owner, model)
                owner._prepare_inputs = filler
                owner.remix_slot_filler = filler
                return
            frame = frame.f_back
        if len(model.remix_slot_paths) > 1:
            raise RuntimeError("no vLLM model runner found: checkpoint slots cannot be routed")
        logger.warning("no vLLM model runner found: base-model requests will get the adapter")

    def slot_of(self, req_id: str) -> int:
        params = self.runner.requests[req_id].sampling_params
        extra = params.extra_args if params is not None else None
        slot = int(extra.get(CHECKPOINT_SLOT_KEY, 0)) if extra else 0
        paths = self.model.remix_slot_paths
        return slot if 0 <= slot < len(paths) and paths[slot] is not None else BASE_MODEL_SLOT

    def __call__(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray, *args: Any) -> Any:
        req_ids = self.runner.input_batch.req_ids[: len(num_scheduled_tokens)]
        slots = np.repeat([self.slot_of(r) for r in req_ids], num_scheduled_tokens)
        self.model.remix_token_slots.fill(torch.from_numpy(slots.astype(np.int64)))
        return self.prepare_inputs(scheduler_output, num_scheduled_tokens, *args)


class RemixWorkerExtension:
    """Mixed into vLLM's worker (worker_extension_cls); call via engine.collective_rpc(name)."""

    def _remix_adapters(self) -> list:
        return list(getattr(self.model_runner.model, "remix_adapters", {}).values())

    def _remix_model(self) -> Any:
        model = self.model_runner.model
        if not hasattr(model, "remix_slot_paths"):
            raise ValueError("this engine serves no ReMix checkpoint")
        return model

    def remix_stage_checkpoint(
        self, slot: int, path: str, host_key: str | None = None, drop: Sequence[str] = ()
    ) -> float | None:
        """Start reading and validating checkpoint `path` for `slot` in a thread of this worker,
        beside the engine's steps (reading is most of a load's time; the engine runs no step
        while an RPC runs); remix_load_staged_checkpoint loads it once read. host_key: the name
        of its copy in this worker's host tier: taken from there if present, and then loaded in
        this call (nothing to wait for); kept there by the load otherwise. drop: host-tier
        copies to free first (the server decides what the tier holds). Returns as
        remix_load_staged_checkpoint: the read's seconds once loaded, None while it reads."""
        model = self._remix_model()
        host = self._remix_host()
        for key in drop:
            host.pop(key, None)
        if not hasattr(self, "_remix_staging"):
            self._remix_staging: dict[int, tuple[str, str | None, Future]] = {}
            self._remix_reader = ThreadPoolExecutor(1, thread_name_prefix="remix-stage")
        kept = host.get(host_key) if host_key is not None else None
        if kept is not None:
            read: Future = Future()
            read.set_result((kept, 0.0))
        else:
            read = self._remix_reader.submit(self._remix_read, model, path, host_key is not None)
        self._remix_staging[slot] = (path, host_key, read)
        return self.remix_load_staged_checkpoint(slot) if kept is not None else None

    @staticmethod
    def _remix_read(model: Any, path: str, keep: bool) -> tuple[Any, float]:
        """The checkpoint, read and validated, and the seconds that took."""
        t0 = time.perf_counter()
        ckpt = model.remix_read_checkpoint(path)
        if keep and torch.cuda.is_available():  # pinned: the copy to the device runs at full speed
            ckpt.tensors = {name: t.pin_memory() for name, t in ckpt.tensors.items()}
        return ckpt, time.perf_counter() - t0

    def _remix_host(self) -> dict[str, Any]:
        """The host tier: staged checkpoints (tensors in host memory) by the server's key."""
        if not hasattr(self, "_remix_host_tier"):
            self._remix_host_tier: dict[str, Any] = {}
        return self._remix_host_tier

    def remix_staged_checkpoint(self, slot: int) -> bool:
        """Whether the checkpoint staged for `slot` is read (or failed: the load will say)."""
        staged = getattr(self, "_remix_staging", {}).get(slot)
        return staged is None or staged[2].done()

    def remix_load_staged_checkpoint(self, slot: int) -> float | None:
        """Load the checkpoint staged for `slot` if its read has ended, never waiting for it
        (the engine's steps would wait for the disk): the read's seconds (0: from the host
        tier), or None while it reads (ask again). Nothing staged: 0 (an earlier call loaded
        it). ValueError: as remix_load_checkpoint."""
        staged = getattr(self, "_remix_staging", {}).get(slot)
        if staged is None:
            return 0.0
        if not staged[2].done():
            return None
        self.remix_load_checkpoint(slot, staged[0])
        return staged[2].result()[1]

    def remix_load_checkpoint(self, slot: int, path: str) -> None:
        """Copy checkpoint `path` into `slot` in place: the one staged for it (waiting for the
        read to end), or read and validated here. It replaces whatever the slot held, routing
        statistics included (no unload needed first). ValueError: incompatible, unreadable,
        slot out of range. The caller guarantees no request for this slot is in flight."""
        staged = getattr(self, "_remix_staging", {}).pop(slot, None)
        if staged is None or staged[0] != path:
            self._remix_model().remix_load_slot(slot, path, None)
            return
        _, host_key, read = staged
        ckpt, _ = read.result()
        if host_key is not None:  # the slot consumes the tensors it is given: give it a copy
            self._remix_host()[host_key] = ckpt
            ckpt = dataclasses.replace(ckpt, tensors=dict(ckpt.tensors))
        self._remix_model().remix_load_slot(slot, path, ckpt)

    def remix_host_checkpoints(self) -> list[str]:
        """The keys of the host tier's checkpoints."""
        return list(self._remix_host())

    def remix_unload_checkpoint(self, slot: int) -> None:
        """Empty `slot` (its tokens get no adapter) and zero its routing statistics."""
        self._remix_model().remix_unload_slot(slot)

    def remix_checkpoint_slots(self) -> list[str | None]:
        """The checkpoint directory in each slot (None: empty)."""
        return list(self._remix_model().remix_slot_paths)

    def remix_prepare_pipeline_stage(self) -> None:
        """Give a later pipeline stage its buffer for the activations it receives, before the
        first request. vLLM allocates it in a dummy forward that its GPU runner always makes but
        its CPU runner makes only to warm up compiled mode: in eager mode on CPU, stage 1's
        first step fails on `assert self.intermediate_tensors is not None` without this.
        Idempotent; a no-op on the first stage and wherever vLLM has allocated it."""
        from vllm.distributed import get_pp_group

        runner = self.model_runner
        if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
            return
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
        )

    def remix_routing_stats(self) -> list[dict[str, list[float]]]:
        """Per checkpoint slot (index = slot), per HF module (model.layers.{i}.self_attn.q_proj
        ...): its stats row [n + 3] (remix_infer.ops.stats.StatsRow reads it). Copies a few KB
        from the device."""
        adapters = self._remix_adapters()
        if not adapters:
            return []
        out: list[dict[str, list[float]]] = [{} for _ in range(adapters[0].layout.num_slots)]
        for adapter in adapters:
            stats = adapter.stats.view(len(out), len(adapter.part_names), -1).cpu()
            for slot, rows in enumerate(out):
                for row, part in enumerate(adapter.part_names):
                    rows[part] = stats[slot, row].tolist()
        return out

    def remix_reset_routing_stats(self) -> None:
        for adapter in self._remix_adapters():
            adapter.stats.zero_()

    def remix_track_request_routing(self) -> None:
        """Start attributing selections to requests that ask (ROUTING_KEY); idempotent."""
        runner = self.model_runner
        if getattr(runner, "remix_request_routing", None) is not None or not self._remix_adapters():
            return
        tracker = RequestRoutingTracker(self._remix_adapters())
        execute_model = runner.execute_model

        def execute_and_attribute(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            out = execute_model(scheduler_output, *args, **kwargs)
            tracker.after_step(runner, scheduler_output)
            return out

        runner.execute_model = execute_and_attribute
        runner.remix_request_routing = tracker

    def remix_take_request_routing(self, key: str) -> dict[str, Any] | None:
        """The routing summary of requests with this key (see RequestRoutingTracker.take)."""
        tracker = getattr(self.model_runner, "remix_request_routing", None)
        return tracker.take(key) if tracker is not None else None

    def remix_capture_selections(self, enable: bool) -> None:
        """Keep each forward's top-k choices (eager mode only; for parity tests and debugging)."""
        for adapter in self._remix_adapters():
            adapter.capture_selections, adapter.captured = enable, []

    def remix_captured_selections(self) -> dict[str, list[list[int]]]:
        """Per HF module: the top-k indices [tokens, k] (of each token's own slot's pool; -1 for
        base-model tokens) of the forwards since capture was switched on, in the order the
        engine computed the tokens."""
        out = {}
        for adapter in self._remix_adapters():
            if not adapter.captured:
                continue
            selected = torch.cat(adapter.captured)
            for row, part in enumerate(adapter.part_names):
                out[part] = selected[:, row].tolist()
        return out
