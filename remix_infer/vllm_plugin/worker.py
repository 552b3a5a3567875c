"""Worker extension: lets the serving process read and reset routing statistics over RPC."""

from __future__ import annotations


class RemixWorkerExtension:
    """Mixed into vLLM's worker (worker_extension_cls); call via engine.collective_rpc(name)."""

    def remix_routing_stats(self) -> dict[str, list[list[float]]]:
        """Per HF module (model.layers.{i}.self_attn.q_proj ...): its stats row [n + 3]
        (see stats.py for the columns). Copies a few KB from the device."""
        out = {}
        for adapter in getattr(self.model_runner.model, "remix_adapters", {}).values():
            stats = adapter.counters.stats.cpu()
            for row, part in enumerate(p for p in adapter.part_names if p is not None):
                out[part] = stats[row].tolist()
        return out

    def remix_reset_routing_stats(self) -> None:
        for adapter in getattr(self.model_runner.model, "remix_adapters", {}).values():
            adapter.counters.reset()
