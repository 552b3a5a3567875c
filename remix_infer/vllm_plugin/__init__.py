"""vLLM plugin: registers the ReMix model classes in every vLLM process.

Installed as a `vllm.general_plugins` entry point, so vLLM's engine and worker processes
(which are spawned, not forked) know the architectures too. Paths are lazy strings: nothing
heavy is imported until vLLM builds a model.
"""

from __future__ import annotations

import sys
from typing import Any

FOREIGN_MODULE = "llvmlite.binding.ffi"  # numba's (the CPU routing kernel's) LLVM binding


def _rebind_kernels_past_llvmlite() -> None:
    """vLLM 0.32's Triton-kernel override scan (triton_utils/dispatcher.py `_rebind_kernels`)
    calls `vars(x).get` on every module attribute; llvmlite's `ffi.lib` has a `__dict__` that
    is not a dict, so an engine built in a process that has already imported numba fails with
    AttributeError. The scan has nothing to rebind there: it runs with that module hidden."""
    from vllm.triton_utils import dispatcher

    rebind = dispatcher._rebind_kernels
    if getattr(rebind, "remix_wrapped", False):
        return

    def rebind_past_llvmlite(overrides: Any) -> None:
        hidden = sys.modules.pop(FOREIGN_MODULE, None)
        try:
            rebind(overrides)
        finally:
            if hidden is not None:
                sys.modules[FOREIGN_MODULE] = hidden

    rebind_past_llvmlite.remix_wrapped = True
    dispatcher._rebind_kernels = rebind_past_llvmlite


def register() -> None:
    from vllm import ModelRegistry

    from remix_infer.config import FAMILIES

    supported = set(ModelRegistry.get_supported_archs())
    for arch in (family.vllm_architecture for family in FAMILIES.values()):
        if arch not in supported:
            ModelRegistry.register_model(arch, f"remix_infer.vllm_plugin.model:{arch}")
    _rebind_kernels_past_llvmlite()
