"""Worker extension: lets the serving process read routing statistics over RPC, overall and
per request.

Per-request routing: a request whose SamplingParams.extra_args carry ROUTING_KEY has the
selections of every token the engine runs for it (prompt tokens not served from the prefix cache,
and each generated token fed back) summed under that key, after each forward step. Requests with
the same key (the choices and prompts of one HTTP request) share one summary. Steps in which no
request asked cost nothing extra.
"""

from __future__ import annotations

from typing import Any

import torch

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


class RemixWorkerExtension:
    """Mixed into vLLM's worker (worker_extension_cls); call via engine.collective_rpc(name)."""

    def _remix_adapters(self) -> list:
        return list(getattr(self.model_runner.model, "remix_adapters", {}).values())

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

    def remix_routing_stats(self) -> dict[str, list[list[float]]]:
        """Per HF module (model.layers.{i}.self_attn.q_proj ...): its stats row [n + 3]
        (remix_infer.ops.stats.StatsRow reads it). Copies a few KB from the device."""
        out = {}
        for adapter in self._remix_adapters():
            stats = adapter.stats.cpu()
            for row, part in enumerate(adapter.part_names):
                out[part] = stats[row].tolist()
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
        """Per HF module: the top-k indices [tokens, k] of the forwards since capture was switched
        on, in the order the engine computed the tokens."""
        out = {}
        for adapter in self._remix_adapters():
            if not adapter.captured:
                continue
            selected = torch.cat(adapter.captured)
            for row, part in enumerate(adapter.part_names):
                out[part] = selected[:, row].tolist()
        return out
