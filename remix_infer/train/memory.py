"""Memory per device of a training run, estimated from the base model's config.json before
anything loads, so a run that cannot fit is refused with the numbers.

What it counts (per device, bytes):
- base weights in --dtype (divided by the processes under --fsdp);
- adapters (pools, routers, always-on LoRAs; float32), their gradients and AdamW's two
  moments (all float32; divided by the processes under --fsdp);
- activations kept for the backward of one micro-batch: batch x M (remix repeats every
  sequence M times) x --max-length tokens. Per token and decoder layer the base keeps about
  10 h + 4 kv + 4 i values in --dtype (the norms' inputs and outputs, q/k/v after RoPE, the
  attention output, the MLP's gate, up, activation and product) and every adapter keeps its
  input in float32, its gated n*r hidden and n gates; with --gradient-checkpointing only each
  layer's input (h values) is kept, plus one layer's full set while it is recomputed. The
  logits add V values in --dtype and two float32 copies (the cross-entropy's input and
  gradient) per token.
Allocator slack and the CUDA context are not modelled: a run is refused above 90% of the
device's memory. These are estimates from the tensor shapes, not measurements.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from remix_infer.checkpoint import BaseModelShape, expected_tensor_shapes
from remix_infer.config import ALL_TARGET_MODULES, RemixConfig

GIB = 2**30
FLOAT32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
USABLE = 0.9  # of a device's memory, the rest for the allocator's slack and the context


@dataclass
class MemoryEstimate:
    base_weights: float
    adapters: float  # parameters, float32
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return (
            self.base_weights + self.adapters + self.gradients + self.optimizer + self.activations
        )

    def describe(self) -> str:
        parts = ", ".join(
            f"{name.replace('_', ' ')} {value / GIB:.2f}" for name, value in vars(self).items()
        )
        return f"{self.total / GIB:.2f} GiB per device ({parts})"


def base_parameters(hf: dict, shape: BaseModelShape) -> int:
    """Parameters of a Llama/Mistral/Qwen2 decoder from its config.json."""
    linears = sum(i * o for i, o in map(shape.linear_shape, ALL_TARGET_MODULES))
    biases = 0
    if hf.get("attention_bias") or shape.model_type == "qwen2":  # q/k/v biases
        biases = sum(shape.linear_shape(m)[1] for m in ("q_proj", "k_proj", "v_proj"))
    per_layer = linears + biases + 2 * shape.hidden_size  # + the two norms
    embeddings = hf["vocab_size"] * shape.hidden_size
    head = 0 if hf.get("tie_word_embeddings") else embeddings
    return shape.num_layers * per_layer + embeddings + head + shape.hidden_size


def estimate_memory(
    hf: dict,
    remix: RemixConfig,
    tokens: int,
    dtype: str,
    shards: int = 1,
    checkpointing: bool = False,
) -> MemoryEstimate:
    """Per-device memory for micro-batches of `tokens` tokens (batch x M x length), the base in
    `dtype`, weights and optimizer state divided over `shards` devices (FSDP; 1: replicated)."""
    shape = BaseModelShape.from_hf_config(hf)
    adapter_shapes = expected_tensor_shapes(remix, shape).values()
    adapter_params = sum(torch.Size(s).numel() for s in adapter_shapes)
    size = DTYPE_BYTES[dtype]
    h, i = shape.hidden_size, shape.intermediate_size
    kv = shape.num_kv_heads * shape.head_dim
    base_per_token = (10 * h + 4 * kv + 4 * i) * size
    adapter_inputs = sum(
        shape.linear_shape(m)[0] + remix.num_loras * (remix.rank + 1) for m in remix.target_modules
    )
    layer_per_token = base_per_token + adapter_inputs * FLOAT32
    if checkpointing:
        kept = shape.num_layers * h * size + layer_per_token
    else:
        kept = shape.num_layers * layer_per_token
    logits = hf["vocab_size"] * (size + 2 * FLOAT32)
    trainable = adapter_params * FLOAT32 / shards
    return MemoryEstimate(
        base_weights=base_parameters(hf, shape) * size / shards,
        adapters=trainable,
        gradients=trainable,
        optimizer=2 * trainable,
        activations=tokens * (kept + logits),
    )


def read_hf_config(base_model: str) -> dict | None:
    """The base model's config.json: a local folder's, or a hub id's from the local cache
    (None when neither has it: transformers then fetches or refuses the model)."""
    path = Path(base_model) / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(base_model, "config.json")
        except ValueError:  # not a repo id
            cached = None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    return json.loads(path.read_text())


def device_memory(device: torch.device) -> float | None:
    """Bytes a GPU holds; None on the CPU (the host's memory is not checked)."""
    if device.type != "cuda":
        return None
    return float(torch.cuda.get_device_properties(device).total_memory)


def check_fits(estimate: MemoryEstimate, capacity: float | None) -> None:
    """Refuse a run whose estimate is over USABLE of the device's memory, with the numbers."""
    if capacity is not None and estimate.total > USABLE * capacity:
        raise ValueError(
            f"this run needs about {estimate.describe()}, over {USABLE:.0%} of the device's "
            f"{capacity / GIB:.1f} GiB: lower --batch-size or --max-length, use "
            "--gradient-checkpointing, or shard over more GPUs with --fsdp"
        )
