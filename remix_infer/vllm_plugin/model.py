"""ReMix model classes for vLLM: the family's own vLLM model with every targeted projection
carrying a RemixAdapter.

The engine is pointed at the base model directory (so base weights load as usual, uncopied) with
`hf_overrides={"architectures": [RemixXForCausalLM], "remix_checkpoint": DIR}`; see engine.py.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

from remix_infer.checkpoint import load_checkpoint, read_config
from remix_infer.config import (
    LORA_A,
    LORA_B,
    ROUTER_BIAS,
    ROUTER_WEIGHT,
    RemixConfig,
    module_path,
    split_module_path,
    tensor_name,
)
from remix_infer.vllm_plugin.layer import RemixAdapter

# vLLM projection -> (parent module, HF projections stacked in its output, in order)
PROJECTIONS = {
    "qkv_proj": ("self_attn", ["q_proj", "k_proj", "v_proj"]),
    "o_proj": ("self_attn", ["o_proj"]),
    "gate_up_proj": ("mlp", ["gate_proj", "up_proj"]),
    "down_proj": ("mlp", ["down_proj"]),
}


class RemixLinearMixin:
    """Mixed into a vLLM parallel linear instance: its output plus the ReMix term.

    The instance keeps its class's weights, names and weight loaders, so vLLM loads the base
    weights exactly as for the plain model.
    """

    remix: RemixAdapter

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - same return as the base layer
        out = super().forward(x)
        if isinstance(out, tuple):
            return self.remix(x, out[0]), out[1]
        return self.remix(x, out)


@functools.cache
def _remix_linear_class(base_cls: type) -> type:
    return type(f"Remix{base_cls.__name__}", (RemixLinearMixin, base_cls), {})


def _shard_layout(
    linear: nn.Module, parts: list[str]
) -> tuple[int, list[int], bool, list[tuple[slice, torch.Tensor]]]:
    """This rank's input width, per-part output widths, whether the input is a row-parallel
    slice, and per part the (input columns, output rows) of the full checkpoint tensors it keeps."""
    rank, size = linear.tp_rank, linear.tp_size
    if isinstance(linear, RowParallelLinear):
        if size > 1 and not (linear.input_is_parallel and linear.reduce_results):
            raise ValueError(f"{linear}: ReMix needs input_is_parallel and reduce_results under TP")
        width = linear.input_size_per_partition
        cols = slice(rank * width, (rank + 1) * width)
        return width, [linear.output_size], size > 1, [(cols, torch.arange(linear.output_size))]
    everything = slice(None)
    if isinstance(linear, QKVParallelLinear):
        q = linear.num_heads * linear.head_size
        kv = linear.num_kv_heads * linear.head_size
        v = linear.num_kv_heads * linear.v_head_size
        kv_rank = rank // linear.num_kv_head_replicas
        rows = [
            torch.arange(rank * q, (rank + 1) * q),
            torch.arange(kv_rank * kv, (kv_rank + 1) * kv),
            torch.arange(kv_rank * v, (kv_rank + 1) * v),
        ]
        return linear.input_size, [q, kv, v], False, [(everything, r) for r in rows]
    if isinstance(linear, MergedColumnParallelLinear):
        widths = [s // size for s in linear.output_sizes]
        return (
            linear.input_size,
            widths,
            False,
            [(everything, torch.arange(rank * w, (rank + 1) * w)) for w in widths],
        )
    raise TypeError(f"cannot adapt {type(linear).__name__} ({parts})")


class RemixForCausalLMMixin:
    """Adds ReMix adapters to a vLLM Llama-family model and loads them with the base weights."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._attach_remix(vllm_config)

    def _attach_remix(self, vllm_config: VllmConfig) -> None:
        self.remix_checkpoint = vllm_config.model_config.hf_config.remix_checkpoint
        config = read_config(self.remix_checkpoint)
        self.remix_config: RemixConfig = config
        self.remix_adapters: dict[str, RemixAdapter] = {}
        self._remix_shards: dict[str, list] = {}
        dtype = vllm_config.model_config.dtype
        max_step_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        for index, layer in enumerate(self.model.layers):
            if isinstance(layer, PPMissingLayer):
                continue
            for proj, (parent_name, parts) in PROJECTIONS.items():
                names = [
                    module_path(index, p) if p in config.target_modules else None for p in parts
                ]
                if not any(names):
                    continue
                linear = getattr(getattr(layer, parent_name), proj)
                width, out_sizes, reduce_input, shards = _shard_layout(linear, parts)
                name = module_path(index, proj, parent_name)
                adapter = RemixAdapter(
                    config, names, width, out_sizes, reduce_input, dtype, name, max_step_tokens
                )
                linear.remix = adapter
                linear.__class__ = _remix_linear_class(type(linear))
                self.remix_adapters[name] = adapter
                self._remix_shards[name] = shards

    def _load_remix_weights(self) -> set[str]:
        """Load the (validated) adapter file into every adapter; returns the parameter names."""
        ckpt = load_checkpoint(self.remix_checkpoint)
        tensors = ckpt.tensors
        for name, adapter in self.remix_adapters.items():
            for part, module in enumerate(adapter.part_names):
                if module is None:
                    continue
                cols, rows = self._remix_shards[name][part]
                adapter.load_part(
                    part,
                    tensors.pop(tensor_name(module, LORA_A)),
                    tensors.pop(tensor_name(module, LORA_B)),
                    tensors.pop(tensor_name(module, ROUTER_WEIGHT)),
                    tensors.pop(tensor_name(module, ROUTER_BIAS), None),
                    cols,
                    rows,
                )
        for adapter in self.remix_adapters.values():
            adapter.prepare_kernels()  # kernels may prepack the weights just loaded
        held = {
            i for i, layer in enumerate(self.model.layers) if not isinstance(layer, PPMissingLayer)
        }
        tensors = {k: v for k, v in tensors.items() if split_module_path(k)[0] in held}
        if tensors:  # every checkpoint tensor of this rank's layers must have found its module
            raise ValueError(
                f"{self.remix_checkpoint}: adapter tensors not used: {sorted(tensors)[:3]}"
            )
        return {n for n, _ in self.named_parameters() if ".remix." in n}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(weights) | self._load_remix_weights()


class RemixLlamaForCausalLM(RemixForCausalLMMixin, LlamaForCausalLM):
    pass


class RemixMistralForCausalLM(RemixForCausalLMMixin, MistralForCausalLM):
    pass


class RemixQwen2ForCausalLM(RemixForCausalLMMixin, Qwen2ForCausalLM):
    pass
