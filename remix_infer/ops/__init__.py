"""The serving layer's math without vLLM: importable with torch alone (plus Triton on a GPU).

pool.py     RemixPool: pool tensors, the folded GEMM weight, the torch (CPU, oracle) and Triton
            (GPU) forwards; FusedRemixLinear: a base linear and its pool as one module
stats.py    routing statistics: the stats row layout, per-token figures, the accumulate op
triton_route.py   the routing kernel (one launch per projection), registered as remix::route
"""

from remix_infer.ops.pool import FusedRemixLinear, PoolLayout, RemixPool, default_kernel
from remix_infer.ops.stats import StatsRow, set_padding_provider

__all__ = [
    "FusedRemixLinear",
    "PoolLayout",
    "RemixPool",
    "StatsRow",
    "default_kernel",
    "set_padding_provider",
]
