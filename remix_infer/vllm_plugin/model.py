"""ReMix model classes for vLLM: the family's own vLLM model with every targeted projection
carrying a RemixPool (remix_infer.ops), bound to it by layer.RemixLinearMethod.

The engine is pointed at the base model directory (so base weights load as usual, uncopied) with
`hf_overrides={"architectures": [RemixXForCausalLM], "remix_checkpoint": DIR, ...}`; see engine.py.
Every pool has `remix_max_checkpoints` checkpoint slots (remix_infer/ops/slots.py), filled from
`remix_checkpoints` at load and by `remix_load_slot` while serving; the model owns the per-token
slot buffer, which worker.CheckpointSlotFiller writes before each forward.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

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

from remix_infer.checkpoint import RemixCheckpoint, load_checkpoint, read_config
from remix_infer.config import (
    ALWAYS_A,
    ALWAYS_B,
    LORA_A,
    LORA_B,
    ROUTER_BIAS,
    ROUTER_WEIGHT,
    SHARED_ROUTER_BIAS,
    SHARED_ROUTER_WEIGHT,
    RemixConfig,
    module_path,
    split_module_path,
    tensor_name,
)
from remix_infer.ops import PoolLayout, RemixPool, SharedRouter
from remix_infer.ops.slots import TokenSlots
from remix_infer.vllm_plugin.engine import check_slot_compatible
from remix_infer.vllm_plugin.kernel_check import check_served_kernels
from remix_infer.vllm_plugin.layer import NOT_RELOADABLE, RemixLinearMethod

# vLLM projection -> (parent module, HF projections stacked in its output, in order)
PROJECTIONS = {
    "qkv_proj": ("self_attn", ["q_proj", "k_proj", "v_proj"]),
    "o_proj": ("self_attn", ["o_proj"]),
    "gate_up_proj": ("mlp", ["gate_proj", "up_proj"]),
    "down_proj": ("mlp", ["down_proj"]),
}


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
        hf_config = vllm_config.model_config.hf_config
        self.remix_checkpoint = hf_config.remix_checkpoint
        config = read_config(self.remix_checkpoint)
        self.remix_config: RemixConfig = config
        paths = list(getattr(hf_config, "remix_checkpoints", None) or [self.remix_checkpoint])
        num_slots = int(getattr(hf_config, "remix_max_checkpoints", None) or len(paths))
        # the checkpoint in each slot (None: empty); the first one sized the slots
        self.remix_slot_paths: list[str | None] = paths + [None] * (num_slots - len(paths))
        self.remix_adapters: dict[str, RemixPool] = {}
        self._remix_shards: dict[str, list] = {}
        self._remix_linears: list[nn.Module] = []
        dtype = vllm_config.model_config.dtype
        max_step_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        shared = self._attach_shared_router(config, max_step_tokens)
        device = next(self.parameters()).device
        kernel = _pool_kernel(getattr(hf_config, "remix_kernel", "auto"), device)
        self.remix_token_slots = TokenSlots(max_step_tokens, num_slots, device=device)
        reloadable = num_slots > 1 or device.type != "cpu"  # or grouped: see layer.py
        for index, layer in enumerate(self.model.layers):
            if isinstance(layer, PPMissingLayer):
                continue
            for proj, (parent_name, parts) in PROJECTIONS.items():
                adapted = [i for i, p in enumerate(parts) if p in config.target_modules]
                if not adapted:
                    continue
                linear = getattr(getattr(layer, parent_name), proj)
                width, out_sizes, reduce_input, shards = _shard_layout(linear, parts)
                name = module_path(index, proj, parent_name)
                always_on = any(config.carries_always_on(parts[i]) for i in adapted)
                pool = RemixPool(
                    PoolLayout.from_config(
                        config, width, out_sizes, adapted, num_slots, always_on=always_on
                    ),
                    dtype,
                    max_step_tokens,
                    router_bias=config.router_bias and shared is None,
                    count_b=not (reduce_input and linear.tp_rank > 0),
                    device=linear.weight.device,
                    name=name,
                    part_names=[module_path(index, parts[i]) for i in adapted],
                    shared=shared,
                    # the first pool is layer 0's qkv_proj (config validation), on the first layer's input
                    routes_shared=shared is not None and not self.remix_adapters,
                    slots=self.remix_token_slots,
                    kernel=kernel,
                )
                linear.remix = pool
                linear.quant_method = RemixLinearMethod(
                    linear.quant_method, pool, reduce_input, reloadable or pool.grouped
                )
                self.remix_adapters[name] = pool
                self._remix_shards[name] = [shards[i] for i in adapted]
                self._remix_linears.append(linear)

    def _attach_shared_router(
        self, config: RemixConfig, max_step_tokens: int
    ) -> SharedRouter | None:
        """The shared routing scope's one router, on the device of the first layer (which must
        be this rank's: the first layer's input is routed here)."""
        if config.routing_scope != "shared":
            self.remix_shared_router = None
            return None
        first = self.model.layers[0]
        if isinstance(first, PPMissingLayer):
            raise ValueError(
                f"{self.remix_checkpoint}: routing_scope 'shared' is not served with pipeline "
                "parallelism (the router reads the first layer's input on the first stage only)"
            )
        self.remix_shared_router = SharedRouter(
            config.num_loras,
            self.config.hidden_size,
            max_step_tokens,
            bias=config.router_bias,
            device=first.self_attn.qkv_proj.weight.device,
        )
        return self.remix_shared_router

    def _load_remix_weights(self) -> set[str]:
        """Load the (validated) checkpoints into their slots; returns the parameter names."""
        from remix_infer.vllm_plugin.worker import CheckpointSlotFiller

        template = None
        for slot, path in enumerate(self.remix_slot_paths):
            if path is not None:
                ckpt = load_checkpoint(path)
                template = template or ckpt
                check_slot_compatible(template, ckpt)
                self._load_slot_tensors(slot, ckpt)
        self._remix_template = template  # tensors consumed: its config and paths remain
        CheckpointSlotFiller.install(self)
        return {
            n for n, _ in self.named_parameters() if ".remix." in n or "remix_shared_router" in n
        }

    def _load_slot_tensors(self, slot: int, ckpt: RemixCheckpoint) -> None:
        """Copy a validated checkpoint's adapter tensors into `slot` of every pool (its tensors
        are consumed)."""
        tensors = ckpt.tensors
        if self.remix_shared_router is not None:  # one slot only (engine.py)
            with torch.no_grad():
                self.remix_shared_router.weight.copy_(tensors.pop(SHARED_ROUTER_WEIGHT))
                if self.remix_shared_router.bias is not None:
                    self.remix_shared_router.bias.copy_(tensors.pop(SHARED_ROUTER_BIAS))
        for name, pool in self.remix_adapters.items():
            for part, module, (cols, rows) in zip(
                pool.layout.adapted, pool.part_names, self._remix_shards[name], strict=True
            ):
                bias = tensors.pop(tensor_name(module, ROUTER_BIAS), None)
                router = tensors.pop(tensor_name(module, ROUTER_WEIGHT), None)
                lora_a = tensors.pop(tensor_name(module, LORA_A))
                lora_b = tensors.pop(tensor_name(module, LORA_B))
                always_a, always_b = _always_on_tensors(tensors, module, pool, lora_a, lora_b)
                pool.load_part(
                    part,
                    lora_a[:, :, cols],
                    lora_b[:, rows, :],
                    None if router is None else router[:, cols],
                    bias,
                    None if always_a is None else always_a[:, cols],
                    None if always_b is None else always_b[rows, :],
                    slot=slot,
                )
        held = {
            i for i, layer in enumerate(self.model.layers) if not isinstance(layer, PPMissingLayer)
        }
        tensors = {k: v for k, v in tensors.items() if split_module_path(k)[0] in held}
        if tensors:  # every checkpoint tensor of this rank's layers must have found its module
            raise ValueError(f"{ckpt.path}: adapter tensors not used: {sorted(tensors)[:3]}")

    def remix_read_checkpoint(self, path: str) -> RemixCheckpoint:
        """Read checkpoint `path` and validate it against the engine's slots (ValueError if it
        cannot be loaded); touches no slot, so it may run beside the engine's steps."""
        if not all(linear.quant_method.reloadable for linear in self._remix_linears):
            raise ValueError(NOT_RELOADABLE)
        ckpt = load_checkpoint(path)
        check_slot_compatible(self._remix_template, ckpt)
        return ckpt

    def remix_load_slot(self, slot: int, path: str, ckpt: RemixCheckpoint | None = None) -> None:
        """Copy checkpoint `path` (`ckpt`: already read by remix_read_checkpoint) into `slot` in
        place (no reallocation: compiled graphs and CUDA graphs stay valid). Nothing of what the
        slot held stays: clear_slot zeroes its tensors and routing statistics, as an unload
        would, so a slot is loaded again without being emptied first."""
        self._check_slot(slot)
        ckpt = ckpt or self.remix_read_checkpoint(path)
        self.remix_slot_paths[slot] = None  # its tokens are base-model tokens while it changes
        for pool in self.remix_adapters.values():
            pool.clear_slot(slot)
        self._load_slot_tensors(slot, ckpt)
        for linear in self._remix_linears:
            linear.quant_method.refresh(linear, slot)
        self.remix_slot_paths[slot] = str(Path(path).resolve())

    def remix_unload_slot(self, slot: int) -> None:
        """Empty `slot`: its tokens get no adapter; its routing statistics are zeroed. The
        weights stay where they are (nothing reads them) until the slot is loaded again."""
        self._check_slot(slot)
        self.remix_slot_paths[slot] = None
        for pool in self.remix_adapters.values():
            pool.stats.view(len(self.remix_slot_paths), -1)[slot].zero_()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < len(self.remix_slot_paths):
            raise ValueError(
                f"checkpoint slot {slot} is out of range: this engine has "
                f"{len(self.remix_slot_paths)} (0 to {len(self.remix_slot_paths) - 1})"
            )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights) | self._load_remix_weights()
        check_served_kernels(self.remix_adapters.values())  # before CUDA-graph capture
        return loaded


def _pool_kernel(asked: str, device: torch.device) -> str | None:
    """The pools' kernel for --remix-kernel: auto (None: the device's default), triton or
    torch; Triton on CPU runs only in its interpreter (tests)."""
    if asked not in ("auto", "triton", "torch"):
        raise ValueError(f"--remix-kernel {asked}: expected auto, triton or torch")
    if asked == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "--remix-kernel triton on a CPU runs in Triton's interpreter only (slow; for "
            "tests): set TRITON_INTERPRET=1, or use --remix-kernel auto"
        )
    return None if asked == "auto" else asked


def _always_on_tensors(
    tensors: dict[str, torch.Tensor],
    module: str,
    pool: RemixPool,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The always-on LoRA (A [r0, d_in], B [d_out, r0]) of `module` in full, taken from
    `tensors`; zeros for a part of a merged projection whose pool has one but that the
    config's always_on_modules leaves out; None when the pool has none."""
    r0 = pool.layout.always_rank
    if not r0:
        return None, None
    zeros_a = torch.zeros(r0, lora_a.shape[-1], dtype=lora_a.dtype)
    zeros_b = torch.zeros(lora_b.shape[1], r0, dtype=lora_b.dtype)
    return (
        tensors.pop(tensor_name(module, ALWAYS_A), zeros_a),
        tensors.pop(tensor_name(module, ALWAYS_B), zeros_b),
    )


class RemixLlamaForCausalLM(RemixForCausalLMMixin, LlamaForCausalLM):
    pass


class RemixMistralForCausalLM(RemixForCausalLMMixin, MistralForCausalLM):
    pass


class RemixQwen2ForCausalLM(RemixForCausalLMMixin, Qwen2ForCausalLM):
    pass
