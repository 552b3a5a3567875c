"""The ReMix checkpoint schema: the one definition used by trainer, loader, engine and server.

A checkpoint is a directory holding `remix_config.json` (validated by `RemixConfig`) and
`remix_adapters.safetensors` (tensors named by `tensor_name`). See docs/checkpoint-format.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

FORMAT_VERSION = 1
CONFIG_FILE = "remix_config.json"
ADAPTERS_FILE = "remix_adapters.safetensors"

# The seven projections of a Llama-family decoder layer, and where each lives in the HF module tree.
MODULE_PARENTS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
ALL_TARGET_MODULES = tuple(MODULE_PARENTS)

# Tensors stored per adapted module (suffixes after the module path), with their shapes.
LORA_A = "remix_lora_a"  # [n, r, d_in]
LORA_B = "remix_lora_b"  # [n, d_out, r]
ROUTER_WEIGHT = "remix_router_weight"  # [n, d_in]
ROUTER_BIAS = "remix_router_bias"  # [n], only when config.router_bias
ALWAYS_A = "remix_always_a"  # [r0, d_in], only when config.always_on_rank > 0
ALWAYS_B = "remix_always_b"  # [d_out, r0], its scale folded in: applied with weight 1
# The one router of the shared routing scope (full tensor names, not per module).
SHARED_ROUTER_WEIGHT = "model.remix_shared_router_weight"  # [n, hidden_size]
SHARED_ROUTER_BIAS = "model.remix_shared_router_bias"  # [n], only when config.router_bias
# The projections that read the first layer's input, where the shared router reads it too.
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")
# The attention projections: where MoR-LoRA puts its always-on LoRA.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

Architecture = Literal["llama", "mistral", "qwen2"]


@dataclass(frozen=True)
class Family:
    """A supported base-model family: what a checkpoint's `architecture` names."""

    hf_model_type: str  # `model_type` in the base model's config.json
    vllm_architecture: str  # the vLLM model class that serves it (remix_infer.vllm_plugin.model)


# The supported families, the one table: checkpoint validation, trainer, vLLM plugin.
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "RemixLlamaForCausalLM"),
    "mistral": Family("mistral", "RemixMistralForCausalLM"),
    "qwen2": Family("qwen2", "RemixQwen2ForCausalLM"),
}
assert set(FAMILIES) == set(get_args(Architecture)), "FAMILIES and Architecture disagree"
Weighting = Literal["constant", "softmax_topk"]
RoutingScope = Literal["module", "shared"]
DType = Literal["float32", "bfloat16", "float16"]


class RemixConfig(BaseModel):
    """Everything needed to rebuild a ReMix model from a base model and the adapter file."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    base_model: str = Field(
        description="Local path (relative paths resolve against the checkpoint dir) or hub id"
    )
    base_model_revision: str | None = None
    architecture: Architecture
    num_layers: int = Field(ge=1, description="Decoder layers of the base model, all adapted")
    target_modules: list[str] = Field(min_length=1)
    num_loras: int = Field(ge=1, description="n: LoRAs in each module's pool")
    top_k: int = Field(description="k: LoRAs selected per token")
    rank: int = Field(ge=1, description="r: rank of each LoRA")
    omega: float = Field(
        description="Scale of each selected LoRA's output (constant mode), or the scale "
        "multiplied by its softmax weight (softmax_topk mode)"
    )
    weighting: Weighting = "constant"
    router_bias: bool = False
    routing_scope: RoutingScope = Field(
        default="module",
        description="module: a router per adapted module (ReMix); shared: one router for the "
        "model, reading the first layer's input, its choice applied in every module (MoR-LoRA)",
    )
    always_on_rank: int = Field(
        default=0,
        ge=0,
        description="r0: rank of one LoRA per module applied to every token with weight 1, "
        "beside the routed pool (MoR-LoRA's always-on LoRA); 0: none",
    )
    always_on_modules: list[str] | None = Field(
        default=None,
        description="the target_modules that carry the always-on LoRA (MoR-LoRA: the attention "
        "projections); null: every one of target_modules",
    )
    dtype: DType = "float32"
    method: str = Field(default="remix", description="How it was trained: remix, mixlora, lora")

    # A field validator, so an unsupported version is reported even when the other fields
    # (e.g. ones a newer format added) fail too; a model validator would not run then.
    @field_validator("format_version")
    @classmethod
    def _check_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"format_version {v} is not supported (expected {FORMAT_VERSION})")
        return v

    @model_validator(mode="after")
    def _check(self) -> RemixConfig:
        if not 1 <= self.top_k <= self.num_loras:
            raise ValueError(
                f"top_k must be between 1 and num_loras={self.num_loras}, got {self.top_k}"
            )
        unknown = sorted(set(self.target_modules) - set(ALL_TARGET_MODULES))
        if unknown:
            raise ValueError(
                f"unknown target_modules {unknown}; allowed: {list(ALL_TARGET_MODULES)}"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("target_modules has duplicates")
        if self.routing_scope == "shared" and not set(ATTENTION_INPUTS) & set(self.target_modules):
            raise ValueError(
                "routing_scope 'shared' routes from the first layer's input, which q_proj, "
                "k_proj and v_proj read: target_modules must include one of them"
            )
        self._check_always_on_modules()
        if not math.isfinite(self.omega) or self.omega <= 0:
            raise ValueError(f"omega must be a finite positive number, got {self.omega}")
        return self

    def _check_always_on_modules(self) -> None:
        listed = self.always_on_modules
        if listed is None:
            return
        if not self.always_on_rank:
            raise ValueError(
                "field 'always_on_modules' is set but always_on_rank is 0 (no always-on LoRA)"
            )
        if not listed or len(set(listed)) != len(listed):
            raise ValueError("field 'always_on_modules' must be a non-empty list, no duplicates")
        outside = sorted(set(listed) - set(self.target_modules))
        if outside:
            raise ValueError(f"field 'always_on_modules': {outside} are not in target_modules")

    def carries_always_on(self, module: str) -> bool:
        """Whether projection `module` (q_proj, ...) has an always-on LoRA beside its pool."""
        listed = self.always_on_modules
        return self.always_on_rank > 0 and (listed is None or module in listed)

    def module_names(self) -> list[str]:
        """HF module paths of every adapted linear, e.g. model.layers.0.self_attn.q_proj."""
        return [
            module_path(layer, name)
            for layer in range(self.num_layers)
            for name in ALL_TARGET_MODULES
            if name in self.target_modules
        ]


def validation_problems(error: ValidationError) -> str:
    """A RemixConfig's validation error in one line: each problem, with its field when pydantic
    knows it (the model-wide checks name theirs in the message)."""
    return "; ".join(
        (f"field '{'.'.join(map(str, err['loc']))}': " if err["loc"] else "") + err["msg"]
        for err in error.errors()
    )


def module_path(layer: int, name: str, parent: str | None = None) -> str:
    """HF module path of projection `name` in decoder layer `layer`; `parent` for names that
    are not in MODULE_PARENTS (vLLM's merged qkv_proj, gate_up_proj)."""
    return f"model.layers.{layer}.{parent or MODULE_PARENTS[name]}.{name}"


def split_module_path(path: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'q_proj'); the inverse of module_path."""
    parts = path.split(".")
    return int(parts[2]), parts[-1]


def tensor_name(module: str, suffix: str) -> str:
    return f"{module}.{suffix}"


def resolve_omega(rule: Literal["lora", "rslora"], alpha: float, k: int, r: int) -> float:
    """The paper's two rules: LoRA-style alpha/(k r) and rsLoRA-style alpha/sqrt(k r)."""
    return alpha / (k * r) if rule == "lora" else alpha / math.sqrt(k * r)
