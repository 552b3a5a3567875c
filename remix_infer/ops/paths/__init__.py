"""A pool's execution paths, one class each behind PoolPath (base.py):

stacked.py        TorchPath (the oracle) and NumbaPath (CPU): rows stacked on the base GEMM
numba_grouped.py  NumbaGroupedPath (CPU engine): each slot's products on its own tokens
triton_dense.py   TritonDensePath (GPU default): columns stacked, one routing kernel
triton_grouped.py TritonGroupedPath (GPU, several slots, opt-in): shrink and expand kernels
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from remix_infer.ops.paths.base import PoolPath
from remix_infer.ops.paths.numba_grouped import NumbaGroupedPath
from remix_infer.ops.paths.stacked import NumbaPath, TorchPath
from remix_infer.ops.paths.triton_dense import TritonDensePath
from remix_infer.ops.paths.triton_grouped import TritonGroupedPath

if TYPE_CHECKING:
    from remix_infer.ops.pool import RemixPool

__all__ = [
    "NumbaGroupedPath",
    "NumbaPath",
    "PoolPath",
    "TorchPath",
    "TritonDensePath",
    "TritonGroupedPath",
    "make_path",
]


def make_path(pool: RemixPool, grouped: bool, max_step_tokens: int) -> PoolPath:
    """The path of the pool's kernel; grouped: as RemixPool decided (numba, or triton with
    several slots). The stacked GEMM carries the router rows only when it runs in float32."""
    if pool.kernel == "triton":
        path = TritonGroupedPath if grouped else TritonDensePath
        return path(pool, max_step_tokens)
    if grouped:
        return NumbaGroupedPath(pool, max_step_tokens)
    fold_router = pool.lora_a.dtype == torch.float32 and pool.shared is None
    return (NumbaPath if pool.kernel == "numba" else TorchPath)(pool, fold_router)
