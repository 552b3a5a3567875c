"""vLLM plugin: registers the ReMix model classes in every vLLM process.

Installed as a `vllm.general_plugins` entry point, so vLLM's engine and worker processes
(which are spawned, not forked) know the architectures too. Paths are lazy strings: nothing
heavy is imported until vLLM builds a model.
"""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    from remix_infer.config import FAMILIES

    supported = set(ModelRegistry.get_supported_archs())
    for arch in (family.vllm_architecture for family in FAMILIES.values()):
        if arch not in supported:
            ModelRegistry.register_model(arch, f"remix_infer.vllm_plugin.model:{arch}")
