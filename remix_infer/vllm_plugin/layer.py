"""Binding of remix_infer.ops to vLLM's parallel linears.

The pool's math lives in remix_infer.ops (no vLLM there). Here a linear's own method (its GEMM
kernel: oneDNN on CPU, cuBLAS on GPU) is wrapped, PEFT-style: the layer, its weights, its
loaders and its tensor-parallel forward are vLLM's, untouched. After loading, the base weight is
replaced by the pool's folded weight, so the linear's one GEMM carries the pool too; `apply`
hands that GEMM to the pool. Row-parallel shards sum their partial pool products with one
all-reduce, and only rank 0 adds B's term (vLLM's all-reduce of the output then counts it once).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.linear import LinearMethodBase

from remix_infer.ops import RemixPool, set_padding_provider


def _current_padding() -> torch.Tensor | None:
    """vLLM's padding mask of the running forward (CUDA-graph padding rows are not tokens)."""
    return get_forward_context().is_padding if is_forward_context_available() else None


set_padding_provider(_current_padding)


def linear_kernel(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x @ weight.T with the kernel vLLM would use for a linear layer of this weight
    (on CPU oneDNN with prepacked weights, about 1.4x torch's on the LoRA-B shapes here)."""
    if weight.device.type == "cpu":
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        holder = SimpleNamespace(weight=weight, bias=None)
        dispatch_cpu_unquantized_gemm(holder, remove_weight=False)
        return lambda x: holder.cpu_linear(x, weight, None)
    return lambda x: F.linear(x, weight)


class RemixLinearMethod(LinearMethodBase):
    """A linear's own method, running its GEMM on the pool's folded weight."""

    def __init__(self, base_method: LinearMethodBase, pool: RemixPool, reduce_input: bool) -> None:
        self.base_method, self.pool = base_method, pool
        self.reduce = tensor_model_parallel_all_reduce if reduce_input else None

    def create_weights(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.base_method.create_weights(*args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.weight.data = self.pool.fold_base_weight(layer.weight.data)
        self.base_method.process_weights_after_loading(layer)  # CPU: prepacks the folded weight
        self.pool.prepare(linear_kernel)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.pool(x, lambda z: self.base_method.apply(layer, z), bias, self.reduce)
