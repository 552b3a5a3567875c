"""Prometheus metrics of remix-serve: serving figures and routing diversity.

Serving metrics are observed by the HTTP layer (requests, latencies, tokens: labelled with the
request's `model`) and by a vLLM stat logger (time to first token, inter-token latency, running /
waiting requests, KV-cache usage: all models together, see `stat_logger_factory`). Routing
metrics are computed at scrape time from the engine's device counters (see
remix_infer/ops/stats.py), accumulated since the engine finished starting up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from remix_infer.config import split_module_path
from remix_infer.ops.stats import StatsRow, is_collapsed, routing_figures

if TYPE_CHECKING:
    from server.engine_client import RemixEngine
    from server.models import ServedModel


@dataclass
class RequestRecord:
    """What observers (metrics) learn about one finished /v1 request."""

    endpoint: str
    status: int
    # The served model name the request resolved to: only names this server serves get here, so
    # the metrics' `model` label stays bounded; "" until then (an unknown model, a bad body).
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    e2e_s: float | None = None


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5)


# The `model` label's meaning, said in each labelled metric's help text.
BY_MODEL = (
    "; model: the served model name the request asked for "
    '("" when it named none this server serves, or its body was refused)'
)


class ServingMetrics:
    """The usual serving figures, each defined once here."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "remix_requests",
            "HTTP requests by endpoint, model and status code" + BY_MODEL,
            ["endpoint", "model", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "remix_request_duration_seconds",
            "End-to-end request latency, from arrival to the last byte" + BY_MODEL,
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "remix_time_to_first_token_seconds",
            "Time from the engine receiving a request to its first generated token (all models)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "remix_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a sequence (all models)",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "remix_prompt_tokens",
            "Prompt tokens processed" + BY_MODEL,
            ["model"],
            registry=registry,
        )
        self.generation_tokens = Counter(
            "remix_generation_tokens", "Tokens generated" + BY_MODEL, ["model"], registry=registry
        )
        self.requests_running = Gauge(
            "remix_requests_running",
            "Requests the engine is running (last scheduler step)",
            registry=registry,
        )
        self.requests_waiting = Gauge(
            "remix_requests_waiting",
            "Requests waiting for the engine's scheduler",
            registry=registry,
        )
        self.kv_cache_usage = Gauge(
            "remix_kv_cache_usage_ratio",
            "Fraction of KV-cache blocks in use (0 to 1)",
            registry=registry,
        )

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request (an observer of the HTTP layer)."""
        self.requests.labels(record.endpoint, record.model, str(record.status)).inc()
        if record.e2e_s is not None:
            self.request_duration.labels(record.endpoint, record.model).observe(record.e2e_s)
        if record.prompt_tokens:  # none before tokenizing: refusals make no token series
            self.prompt_tokens.labels(record.model).inc(record.prompt_tokens)
        if record.completion_tokens:
            self.generation_tokens.labels(record.model).inc(record.completion_tokens)


LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class StoreMetrics:
    """The checkpoint store's figures (server/store.py). `model` label values are checkpoint
    folders and names this server serves, never a client's string."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.loads = Counter(
            "remix_checkpoint_loads",
            "Checkpoints loaded into a slot; source: disk, or host (the host tier's copy)",
            ["model", "source"],
            registry=registry,
        )
        self.evictions = Counter(
            "remix_checkpoint_evictions",
            "Checkpoints evicted from their slot (least recently used, idle)",
            ["model"],
            registry=registry,
        )
        self.load_seconds = Histogram(
            "remix_checkpoint_load_seconds",
            "Time to load a checkpoint into a slot (staged read and the engine's pause)",
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.waiting = Gauge(
            "remix_checkpoint_requests_waiting_for_load",
            "Requests waiting for their checkpoint to be loaded",
            registry=registry,
        )
        self.hits = Counter(
            "remix_checkpoint_hits",
            "Requests for a checkpoint that was in a slot when they arrived",
            registry=registry,
        )
        self.misses = Counter(
            "remix_checkpoint_misses",
            "Requests for a checkpoint that had to be loaded (or waited for a load) first",
            registry=registry,
        )

    def in_slot(self, model: str) -> None:
        """A checkpoint in a slot has its load and eviction series from then on, at zero until
        counted (a checkpoint loaded at start has no load of the store's to count)."""
        for source in ("disk", "host"):
            self.loads.labels(model, source)
        self.evictions.labels(model)

    def loaded(self, model: str, source: str, seconds: float) -> None:
        self.loads.labels(model, source).inc()
        self.load_seconds.observe(seconds)


def stat_logger_factory(metrics: ServingMetrics) -> type:
    """A vLLM stat logger class (a StatLoggerFactory) that feeds `metrics` with the engine's
    per-step figures: time to first token, inter-token latency, running / waiting, KV cache.

    These carry no `model` label: vLLM's IterationStats keeps a step's first-token and
    inter-token times as bare lists of floats, with no request id or adapter beside them
    (vllm/v1/metrics/stats.py), so they cannot be told apart by model here."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerGauges(StatLoggerBase):
        def __init__(self, vllm_config: object, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: object,
            iteration_stats: object,
            mm_cache_stats: object = None,
            engine_idx: int = 0,
        ) -> None:
            if iteration_stats is not None:  # the engine's own timings, streamed or not
                for seconds in iteration_stats.time_to_first_tokens_iter:
                    metrics.time_to_first_token.observe(seconds)
                for seconds in iteration_stats.inter_token_latencies_iter:
                    metrics.inter_token_latency.observe(seconds)
            if scheduler_stats is not None:
                metrics.requests_running.set(scheduler_stats.num_running_reqs)
                metrics.requests_waiting.set(scheduler_stats.num_waiting_reqs)
                metrics.kv_cache_usage.set(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerGauges


class RoutingCollector(Collector):
    """Routing-diversity metrics from the latest snapshot of the engine's counters, one series
    per checkpoint (label `checkpoint`: its model name), layer and module."""

    def __init__(self) -> None:
        self.snapshot: list[tuple[ServedModel, dict[str, list[float]]]] = []

    def update(self, stats: list[tuple[ServedModel, dict[str, list[float]]]]) -> None:
        self.snapshot = stats

    def collect(self):  # noqa: ANN201 - prometheus_client's Collector protocol
        labels = ["checkpoint", "layer", "module"]
        selections = CounterMetricFamily(
            "remix_lora_selections",
            "Times each LoRA of a module's pool was selected",
            labels=[*labels, "lora"],
        )
        tokens = CounterMetricFamily(
            "remix_routed_tokens", "Tokens routed through the module", labels=labels
        )
        effective = GaugeMetricFamily(
            "remix_routing_effective_loras",
            "Effective number of LoRAs in use: exp of the entropy of the selection shares (n = all used equally)",
            labels=labels,
        )
        entropy = GaugeMetricFamily(
            "remix_router_entropy_nats",
            "Mean entropy of the router distribution per token, nats",
            labels=labels,
        )
        ess = GaugeMetricFamily(
            "remix_routing_weight_ess",
            "Mean effective support size of the routing weights per token (k for ReMix; toward 1 when weights collapse)",
            labels=labels,
        )
        collapsed = GaugeMetricFamily(
            "remix_routing_collapsed_modules",
            "Adapted modules whose routing has collapsed (effective LoRAs in use < k, or ESS < (k+1)/2)",
            labels=["checkpoint"],
        )
        for model, stats in self.snapshot:
            count = 0
            for name, raw in sorted(stats.items()):
                index, module = split_module_path(name)
                key = [model.name, str(index), module]
                row = StatsRow.parse(raw)
                fig = routing_figures(row)
                for lora, selected in enumerate(row.selections):
                    selections.add_metric([*key, str(lora)], selected)
                tokens.add_metric(key, fig["tokens"])
                effective.add_metric(key, fig["effective_loras"])
                entropy.add_metric(key, fig["router_entropy"])
                ess.add_metric(key, fig["ess"])
                count += is_collapsed(fig, model.config.top_k)
            collapsed.add_metric([model.name], count)
        yield from (selections, tokens, effective, entropy, ess, collapsed)


class Metrics:
    """GET /metrics of one engine: the serving figures (fed by the HTTP layer's observations
    and a vLLM stat logger) and, with ReMix adapters, routing diversity read at scrape time."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: RemixEngine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.serving = ServingMetrics(self.registry)
        self.store = StoreMetrics(self.registry)
        self.routing = RoutingCollector() if engine.remix_config is not None else None
        if self.routing is not None:
            self.registry.register(self.routing)
        engine.stat_loggers.append(stat_logger_factory(self.serving))

    async def render(self) -> bytes:
        for model in self.engine.models.models.values():
            if not model.is_base:
                self.store.in_slot(model.name)
        if self.engine.ready and self.routing is not None:
            self.routing.update(await self.engine.routing_stats())
        return generate_latest(self.registry)
