"""Worker extension: lets the serving process read and reset routing statistics over RPC."""

from __future__ import annotations

import torch


class RemixWorkerExtension:
    """Mixed into vLLM's worker (worker_extension_cls); call via engine.collective_rpc(name)."""

    def _remix_adapters(self) -> list:
        return list(getattr(self.model_runner.model, "remix_adapters", {}).values())

    def remix_routing_stats(self) -> dict[str, list[list[float]]]:
        """Per HF module (model.layers.{i}.self_attn.q_proj ...): its stats row [n + 3]
        (see stats.py for the columns). Copies a few KB from the device."""
        out = {}
        for adapter in self._remix_adapters():
            stats = adapter.counters.stats.cpu()
            for row, part in enumerate(p for p in adapter.part_names if p is not None):
                out[part] = stats[row].tolist()
        return out

    def remix_reset_routing_stats(self) -> None:
        for adapter in self._remix_adapters():
            adapter.counters.reset()

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
            for row, part in enumerate(p for p in adapter.part_names if p is not None):
                out[part] = selected[:, row].tolist()
        return out
