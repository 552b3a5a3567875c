"""Reading LoRA adapters in PEFT's folder format: the one place that knows that format.

A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors
are named `base_model.model.<module path>.lora_A.weight` [r, d_in] and `...lora_B.weight`
[d_out, r]. PEFT adds `scaling * B A x` to the base linear's output, with scaling = alpha / r
(alpha / sqrt(r) with use_rslora) and r, alpha per module from rank_pattern / alpha_pattern.
Here the scaling is folded into B, so `B' A x` with weight 1 is the adapter's exact term.

Only what a ReMix pool can express is accepted: plain LoRAs on the seven projections of a
Llama-family decoder layer. Anything else (DoRA, trained biases, modules_to_save, embedding or
lm_head LoRAs, another base model, tensors or settings this reader does not know) is refused
with `PeftAdapterError` naming the folder, and the field or tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from remix_infer.checkpoint import BaseModelShape, read_json_file
from remix_infer.config import MODULE_PARENTS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# A LoRA tensor of one adapted linear: <module path>.lora_A.weight / .lora_B.weight
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])\.weight")
PROJECTION = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<name>\w+)")

# Fields that would change the adapter's output and must be off; the value that means "off".
MUST_BE_OFF: dict[str, tuple[object, ...]] = {
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "bias": ("none",),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "megatron_config": (None, {}),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
    "use_bdlora": (None, False),
    "velora_config": (None,),
}
# Fields read here, and fields that do not change a saved adapter's output (metadata, which
# modules were targeted (the tensors say that), and initialisation or training settings).
READ = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
        "target_modules", "base_model_name_or_path"}  # fmt: skip
HARMLESS = {
    "auto_mapping", "revision", "task_type", "inference_mode", "peft_version", "lora_dropout",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "exclude_modules", "layers_to_transform", "layers_pattern", "megatron_core",
    "qalora_group_size", "ensure_weight_tying",
}  # fmt: skip
# Modules a LoRA may target that a ReMix pool cannot adapt (named in target_modules).
NOT_ADAPTABLE = ("lm_head", "embed_tokens")


class PeftAdapterError(ValueError):
    """A PEFT adapter folder that cannot be imported, with the folder and the reason."""


@dataclass
class PeftLora:
    """One PEFT LoRA, read and checked against a base model.

    modules: HF module path (model.layers.0.self_attn.q_proj) -> (A [r, d_in], B [d_out, r]),
    float32, B already multiplied by the module's scaling; r may differ between modules.
    """

    path: Path
    base_model: str | None  # base_model_name_or_path as written by PEFT
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())

    def projections(self) -> set[str]:
        """The projection names (q_proj, ...) this LoRA adapts in at least one layer."""
        return {module.rsplit(".", 1)[1] for module in self.modules}


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first rank_pattern / alpha_pattern key matching `module`, as PEFT matches them: the
    key as a regex on the module path's last dotted components (peft.utils.other.get_pattern_key)."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json, checked for settings a ReMix pool cannot reproduce."""
    file = folder / CONFIG_FILE
    cfg = read_json_file(folder, CONFIG_FILE, "PEFT adapter folder", PeftAdapterError)
    if not isinstance(cfg, dict):
        raise PeftAdapterError(f"{file}: expected a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise PeftAdapterError(
            f"{file}: field 'peft_type' is {cfg.get('peft_type')!r}; only LORA adapters import"
        )
    for field, off in MUST_BE_OFF.items():
        if field in cfg and cfg[field] not in off:
            raise PeftAdapterError(
                f"{file}: field '{field}' is {cfg[field]!r}; only plain LoRAs import "
                f"(expected {off[0]!r})"
            )
    for field, value in cfg.items():
        known = field in READ or field in HARMLESS or field in MUST_BE_OFF
        if not known and value not in (None, False, [], {}, ""):
            raise PeftAdapterError(
                f"{file}: field '{field}' is unknown to this reader (PEFT 0.21's LoRA fields) and "
                f"set ({value!r}); it may change the adapter's output"
            )
    _check_numbers(file, cfg)
    targets = cfg.get("target_modules")
    named = [targets] if isinstance(targets, str) else list(targets or [])
    for bad in NOT_ADAPTABLE:
        if any(t == bad or t.endswith("." + bad) for t in named):
            raise PeftAdapterError(
                f"{file}: field 'target_modules' names {bad}; ReMix adapts only the projections "
                f"{list(MODULE_PARENTS)} (embedding and lm_head LoRAs do not import)"
            )
    return cfg


def _check_numbers(file: Path, cfg: dict) -> None:
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), int | float) or not cfg[field] > 0:
            raise PeftAdapterError(f"{file}: field '{field}' must be a positive number")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(field) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, int | float) and v > 0 for v in pattern.values()
        ):
            raise PeftAdapterError(f"{file}: field '{field}' must map patterns to positive numbers")


def read_lora_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": tensor, "B": tensor}} from adapter_model.safetensors; every tensor
    must be one of the two LoRA factors of a decoder projection."""
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        raise PeftAdapterError(
            f"{file}: missing (a PEFT adapter folder holds {WEIGHTS_FILE}; "
            "adapter_model.bin is not read, re-save with safe_serialization=True)"
        )
    modules: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, side = _parse_key(file, key)
                modules.setdefault(module, {})[side] = f.get_tensor(key).float()
    except (SafetensorError, OSError) as e:
        raise PeftAdapterError(f"{file}: not a readable safetensors file ({e})") from None
    for module, sides in modules.items():
        if set(sides) != {"A", "B"}:
            missing = ({"A", "B"} - set(sides)).pop()
            raise PeftAdapterError(f"{file}: tensor '{KEY_PREFIX}{module}.lora_{missing}.weight' "
                                   "is missing")  # fmt: skip
    if not modules:
        raise PeftAdapterError(f"{file}: no LoRA tensors")
    return modules


def _parse_key(file: Path, key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight' -> (module path, 'A')."""
    name = key.removeprefix(KEY_PREFIX)
    if "lora_embedding_" in key or "embed_tokens" in key or "lm_head" in key:
        raise PeftAdapterError(
            f"{file}: tensor '{key}' adapts the embedding or lm_head; only the decoder "
            f"projections {list(MODULE_PARENTS)} import"
        )
    if "lora_magnitude_vector" in key:
        raise PeftAdapterError(f"{file}: tensor '{key}' is a DoRA magnitude; DoRA does not import")
    if key.endswith(".bias"):
        raise PeftAdapterError(f"{file}: tensor '{key}' is a trained bias; biases do not import")
    match = LORA_KEY.fullmatch(name) if key.startswith(KEY_PREFIX) else None
    projection = match and PROJECTION.fullmatch(match["module"])
    if not projection or MODULE_PARENTS.get(projection["name"]) != projection["parent"]:
        raise PeftAdapterError(
            f"{file}: tensor '{key}' is not a LoRA factor of a decoder projection "
            f"({KEY_PREFIX}model.layers.N.<self_attn|mlp>.<projection>.lora_<A|B>.weight)"
        )
    return match["module"], match["side"]


def check_base_model(folder: Path, cfg: dict, shape: BaseModelShape) -> None:
    """Refuse an adapter whose recorded base model, where it can be read, is another model."""
    recorded = cfg.get("base_model_name_or_path")
    config_json = Path(recorded) / "config.json" if recorded else None
    if config_json is None or not config_json.is_file():
        return  # a hub id or a moved folder: the tensor shapes are checked below
    try:
        theirs = BaseModelShape.from_hf_config(json.loads(config_json.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return
    if theirs != shape:
        raise PeftAdapterError(
            f"{folder / CONFIG_FILE}: field 'base_model_name_or_path' is {recorded}, a "
            f"{theirs.model_type} model of other dimensions or architecture than the base model "
            f"({shape.model_type}, {shape.num_layers} layers, hidden {shape.hidden_size})"
        )


def read_peft_lora(folder: str | os.PathLike, shape: BaseModelShape) -> PeftLora:
    """Read one PEFT LoRA folder, check it against the base model's shape and fold scaling
    into B. Raises PeftAdapterError naming the folder and the field or tensor."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    check_base_model(folder, cfg, shape)
    file = folder / WEIGHTS_FILE
    modules = {}
    for module, sides in sorted(read_lora_tensors(folder).items()):
        a, b = sides["A"], sides["B"]
        layer, name = int(module.split(".")[2]), module.rsplit(".", 1)[1]
        d_in, d_out = shape.linear_shape(name)
        rank = a.shape[0]
        if layer >= shape.num_layers or a.shape != (rank, d_in) or b.shape != (d_out, rank):
            raise PeftAdapterError(
                f"{file}: tensors of '{module}' have shapes A {list(a.shape)}, B {list(b.shape)}; "
                f"the base model ({shape.num_layers} layers) expects [r, {d_in}] and [{d_out}, r]: "
                "the adapter was trained on another base model"
            )
        modules[module] = (a, b * module_scaling(folder, cfg, module, rank))
    return PeftLora(folder, cfg.get("base_model_name_or_path"), modules)


def module_scaling(folder: Path, cfg: dict, module: str, rank: int) -> float:
    """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) with use_rslora."""
    rank_key = pattern_key(cfg.get("rank_pattern") or {}, module)
    expected = (cfg.get("rank_pattern") or {})[rank_key] if rank_key else cfg["r"]
    if rank != expected:
        field = f"rank_pattern['{rank_key}']" if rank_key else "r"
        raise PeftAdapterError(
            f"{folder / CONFIG_FILE}: field '{field}' is {expected} but the tensors of "
            f"'{module}' have rank {rank}"
        )
    alpha_key = pattern_key(cfg.get("alpha_pattern") or {}, module)
    alpha = (cfg.get("alpha_pattern") or {})[alpha_key] if alpha_key else cfg["lora_alpha"]
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
