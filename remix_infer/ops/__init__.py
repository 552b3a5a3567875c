"""The serving layer's math without vLLM, pydantic or transformers: torch alone (plus Triton).

pool.py          RemixPool: pool tensors, layout, statistics, the folded GEMM weight; PoolLayout;
                 FusedRemixLinear: a base linear and its pool as one module
paths/           the execution paths, one class each behind PoolPath (torch: the oracle; numba:
                 CPU, stacked or grouped; triton: GPU, dense or grouped)
check.py         `make gpu-check`: the Triton kernels against the float32 torch path
shared.py        SharedRouter: the shared routing scope's one router per model
slots.py         checkpoint slots: several checkpoints in one pool, each token's slot (TokenSlots),
                 the grouped products of several slots on CPU
stats.py         routing statistics: the stats row layout, per-token figures, the accumulate op
cpu_route.py     the CPU routing kernel (numba), one call per projection
triton_route.py  the GPU routing kernel (Triton), one launch per projection
custom_op.py     registering the kernels as torch custom ops (torch.ops.remix.*)
"""

from remix_infer.ops.pool import FusedRemixLinear, PoolLayout, RemixPool, default_kernel
from remix_infer.ops.shared import SharedRouter
from remix_infer.ops.slots import BASE_MODEL_SLOT, TokenSlots
from remix_infer.ops.stats import StatsRow, set_padding_provider

__all__ = [
    "BASE_MODEL_SLOT",
    "FusedRemixLinear",
    "PoolLayout",
    "RemixPool",
    "SharedRouter",
    "StatsRow",
    "TokenSlots",
    "default_kernel",
    "set_padding_provider",
]
