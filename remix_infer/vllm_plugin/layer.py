"""Binding of remix_infer.ops to vLLM's parallel linears.

The pool's math lives in remix_infer.ops (no vLLM there). Here a linear's own method (its GEMM
kernel: oneDNN on CPU, cuBLAS on GPU) is wrapped, PEFT-style: the layer, its weights, its
loaders and its tensor-parallel forward are vLLM's, untouched. After loading, the base weight is
replaced by the pool's folded weight, so the linear's one GEMM carries the pool too; `apply`
hands that GEMM to the pool. Row-parallel shards sum their partial pool products with one
all-reduce, and only rank 0 adds B's term (vLLM's all-reduce of the output then counts it once).

Loading a checkpoint slot while serving rewrites the pool's part of the folded weight in place
(`refresh`), so compiled graphs and CUDA graphs keep their tensors. On CPU vLLM prepacks the
folded weight for oneDNN and drops it. In float32 (the numba kernel) the pool is grouped, with
one slot or several (its GEMM weight is the base weight alone, which a load leaves as it is;
its slots' A, router and B products run on oneDNN too, prepacked by PrepackedCpuGemm);
otherwise an engine with several slots keeps the folded weight and prepacks it itself
(PrepackedCpuGemm), so that it can prepack it again after a load.
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


NOT_RELOADABLE = (
    "this engine cannot load checkpoints while serving: on CPU, outside float32 or in the shared "
    "routing scope, its one checkpoint slot is prepacked with the base weights; start it with "
    "max_checkpoints of 2 or more"
)


class PrepackedCpuGemm:
    """x -> x @ weight.T with oneDNN's prepacked copy of `weight` (vLLM's CPU kernel), which
    `refresh` rebuilds after the weight changed in place. The handle's address lives in a tensor
    that compiled graphs read by reference: refresh swaps the new handle's address into it."""

    def __init__(self, weight: torch.Tensor) -> None:
        from vllm import _custom_ops as ops

        self.weight, self._ops = weight, ops
        self.handler = ops.create_onednn_mm(weight.t(), 32) if ops._supports_onednn else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.handler is None:
            return F.linear(x, self.weight)
        return self._ops.onednn_mm(self.handler, x, None)

    def into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (contiguous, [T, rows of weight]) = x @ weight.T, without a new tensor."""
        if self.handler is None:
            torch.mm(x, self.weight.t(), out=out)
        else:
            torch.ops._C.onednn_mm(out, x, None, self.handler.handler_tensor)

    def refresh(self) -> None:
        if self.handler is None:  # F.linear reads the weight itself
            return
        fresh = self._ops.create_onednn_mm(self.weight.t(), 32)
        old = self.handler.handler_tensor.clone()
        self.handler.handler_tensor.copy_(fresh.handler_tensor)
        fresh.handler_tensor.copy_(old)  # so that `fresh`, when collected, frees the old handle


class RemixLinearMethod(LinearMethodBase):
    """A linear's own method, running its GEMM on the pool's folded weight.

    reloadable: checkpoint slots may be loaded while serving (see the module docstring)."""

    def __init__(
        self,
        base_method: LinearMethodBase,
        pool: RemixPool,
        reduce_input: bool,
        reloadable: bool = False,
    ) -> None:
        self.base_method, self.pool, self.reloadable = base_method, pool, reloadable
        self.reduce = tensor_model_parallel_all_reduce if reduce_input else None
        self.cpu_gemm: PrepackedCpuGemm | None = None

    def create_weights(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.base_method.create_weights(*args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.weight.data = self.pool.fold_base_weight(layer.weight.data)
        if self.reloadable and layer.weight.device.type == "cpu" and not self.pool.grouped:
            self.cpu_gemm = PrepackedCpuGemm(layer.weight.data)
            self.pool.prepare(PrepackedCpuGemm)
            return
        self.base_method.process_weights_after_loading(layer)  # CPU: prepacks the folded weight
        if self.pool.grouped and layer.weight.device.type == "cpu":
            # the slots' own products on oneDNN too, prepacked again after a load (refresh)
            self.pool.prepare(PrepackedCpuGemm)
            return
        self.pool.prepare(linear_kernel)

    def refresh(self, layer: torch.nn.Module, slot: int | None = None) -> None:
        """After the pool's tensors changed in place (a slot loaded or emptied; None: any)."""
        if not self.reloadable:
            raise ValueError(NOT_RELOADABLE)
        if self.cpu_gemm is not None:
            self.pool.refresh_fold(self.cpu_gemm.weight, slot)
            self.cpu_gemm.refresh()
        else:
            self.pool.refresh_fold(layer.weight.data, slot)
        self.pool.refresh_products(slot)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        gemm = self.cpu_gemm or (lambda z: self.base_method.apply(layer, z))
        return self.pool.forward(x, gemm, bias, self.reduce)  # no module-call overhead
