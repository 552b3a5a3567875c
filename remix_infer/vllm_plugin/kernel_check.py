"""The engine's start-up check of its Triton kernels (remix_infer.ops.check's quick subset).

A worker whose pools run the Triton kernel checks it once per distinct served geometry (this
rank's d_in, parts, n, k, r, dtype, slots, path) after loading and before vLLM captures CUDA
graphs, against the float32 torch path on random weights of that geometry; a failure stops the
start with a message naming the device, the Triton version and the failing check, and how to
serve without the kernel (--remix-kernel torch).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from remix_infer.ops import RemixPool

KERNEL_FLAG = "--remix-kernel torch (env REMIX_REMIX_KERNEL=torch)"


class KernelCheckError(RuntimeError):
    """The Triton kernel failed its start-up check on this device."""


def check_served_kernels(pools: Iterable[RemixPool]) -> int:
    """Run the quick check for each distinct geometry of the pools that run Triton; raises
    KernelCheckError on the first geometry that fails. Returns the geometries checked."""
    from remix_infer.ops.check import device_name, failures, quick_check, triton_version

    seen = set()
    for pool in pools:
        if pool.kernel != "triton":
            continue
        device, dtype = pool.lora_a.device, pool.lora_a.dtype
        key = (pool.layout, dtype, pool.grouped, device)
        if key in seen:
            continue
        seen.add(key)
        with float32_default():  # vLLM loads weights under the serving dtype as the default
            bad = failures(quick_check(pool.layout, dtype, str(device), pool.grouped))
        if bad:
            first = bad[0]
            raise KernelCheckError(
                f"ReMix's Triton kernel failed its start-up check on "
                f"{device_name(device.type)} with Triton {triton_version()}: {first.check} "
                f"at {first.geometry}, {first.tokens} tokens: {first.detail}. Serve on the "
                f"plain-torch path instead with {KERNEL_FLAG}"
            )
    return len(seen)


class float32_default:  # noqa: N801 (a context manager, used like a function)
    """Run with torch's default dtype float32, restored after."""

    def __enter__(self) -> None:
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.saved)
