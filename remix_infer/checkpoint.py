"""Save, load and validate ReMix checkpoints.

Loading checks everything against the base model's config before anything is built, and
raises `CheckpointError` naming the file, the tensor or field, and what was expected.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from remix_infer.config import (
    ADAPTERS_FILE,
    ALWAYS_A,
    ALWAYS_B,
    CONFIG_FILE,
    FAMILIES,
    LORA_A,
    LORA_B,
    ROUTER_BIAS,
    ROUTER_WEIGHT,
    SHARED_ROUTER_BIAS,
    SHARED_ROUTER_WEIGHT,
    RemixConfig,
    tensor_name,
    validation_problems,
)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# "org/name": the only form tried on the model hub; anything else must be a local directory.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class CheckpointError(ValueError):
    """A checkpoint that cannot be served or trained from, with the reason in the message."""


@dataclass(frozen=True)
class BaseModelShape:
    """The dimensions of the base model that decide every adapter tensor's shape."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, cfg: dict) -> BaseModelShape:
        heads = cfg["num_attention_heads"]
        return cls(
            model_type=cfg.get("model_type", ""),
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        )

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(d_in, d_out) of a projection."""
        h, q, kv = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, self.intermediate_size),
            "up_proj": (h, self.intermediate_size),
            "down_proj": (self.intermediate_size, h),
        }[name]


@dataclass
class RemixCheckpoint:
    """A validated checkpoint: config, where its base model is, and the adapter tensors."""

    path: Path
    config: RemixConfig
    base_model_path: str
    base_shape: BaseModelShape
    tensors: dict[str, torch.Tensor]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_tensor_shapes(self.config, self.base_shape)


def expected_tensor_shapes(
    config: RemixConfig, shape: BaseModelShape
) -> dict[str, tuple[int, ...]]:
    n, r = config.num_loras, config.rank
    shared = config.routing_scope == "shared"
    out: dict[str, tuple[int, ...]] = {}
    if shared:  # one router for the model instead of one per module
        out[SHARED_ROUTER_WEIGHT] = (n, shape.hidden_size)
        if config.router_bias:
            out[SHARED_ROUTER_BIAS] = (n,)
    for module in config.module_names():
        d_in, d_out = shape.linear_shape(module.rsplit(".", 1)[1])
        out[tensor_name(module, LORA_A)] = (n, r, d_in)
        out[tensor_name(module, LORA_B)] = (n, d_out, r)
        if not shared:
            out[tensor_name(module, ROUTER_WEIGHT)] = (n, d_in)
        if config.router_bias and not shared:
            out[tensor_name(module, ROUTER_BIAS)] = (n,)
        if config.carries_always_on(module.rsplit(".", 1)[1]):
            out[tensor_name(module, ALWAYS_A)] = (config.always_on_rank, d_in)
            out[tensor_name(module, ALWAYS_B)] = (d_out, config.always_on_rank)
    return out


def save_checkpoint(
    path: str | os.PathLike, config: RemixConfig, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write config and adapter tensors (cast to config.dtype) into directory `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = TORCH_DTYPES[config.dtype]
    cpu = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}
    save_file(
        cpu, str(path / ADAPTERS_FILE), metadata={"format": "pt", "remix_format_version": "1"}
    )
    (path / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
    return path


def read_json_file(
    folder: Path, name: str, kind: str, error: type[ValueError] = CheckpointError
) -> object:
    """Parse the JSON file `name` of `folder` (a `kind`, e.g. "ReMix checkpoint directory");
    raises `error` naming the folder or file when either is missing or the JSON is broken."""
    file = folder / name
    if not folder.is_dir():
        raise error(f"{folder}: {kind} not found")
    if not file.is_file():
        raise error(f"{file}: missing (a {kind} holds {name})")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file}: not valid JSON ({e})") from None


def read_config(path: str | os.PathLike) -> RemixConfig:
    """Parse and validate remix_config.json of checkpoint directory `path`."""
    file = Path(path) / CONFIG_FILE
    raw = read_json_file(Path(path), CONFIG_FILE, "ReMix checkpoint directory")
    try:
        return RemixConfig.model_validate(raw)
    except ValidationError as e:
        raise CheckpointError(f"{file}: {validation_problems(e)}") from None


def resolve_base_model(checkpoint_dir: Path, config: RemixConfig) -> tuple[str, dict]:
    """Find the base model (a path relative to the checkpoint dir, an absolute path, or a hub id
    already in the local cache) and return its location and parsed config.json."""
    field = f"{checkpoint_dir / CONFIG_FILE}: field 'base_model'"
    local = Path(config.base_model)
    if not local.is_absolute():
        local = checkpoint_dir / local
    if local.is_dir():
        cfg_file = local / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{field}: {local} has no config.json")
        try:
            return str(local.resolve()), json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{field}: {cfg_file} is not valid JSON ({e})") from None
    if not HUB_ID.fullmatch(config.base_model):
        raise CheckpointError(f"{field}: base model directory {local} not found")
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(config.base_model, revision=config.base_model_revision)
    except Exception as e:  # noqa: BLE001 - any failure here means "not found"
        raise CheckpointError(
            f"{field}: base model '{config.base_model}' not found as {local} "
            f"nor as a cached hub model ({type(e).__name__})"
        ) from None
    return config.base_model, cfg.to_dict()


def check_against_base(file: Path, config: RemixConfig, shape: BaseModelShape) -> None:
    expected_type = FAMILIES[config.architecture].hf_model_type
    if shape.model_type != expected_type:
        raise CheckpointError(
            f"{file}: field 'architecture' is '{config.architecture}' but the base model's "
            f"model_type is '{shape.model_type}' (expected '{expected_type}')"
        )
    if config.num_layers != shape.num_layers:
        raise CheckpointError(
            f"{file}: field 'num_layers' is {config.num_layers} but the base model has "
            f"{shape.num_layers} layers"
        )


def _check_names(file: Path, names: set[str], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected))
    if missing:
        raise CheckpointError(
            f"{file}: missing tensor '{missing[0]}'"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if extra:
        raise CheckpointError(
            f"{file}: unexpected tensor '{extra[0]}'"
            + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
            + " (not in the config's target modules and layers)"
        )


def read_adapter_tensors(
    file: Path, dtype: torch.dtype, expected: dict[str, tuple[int, ...]]
) -> dict:
    """Read and check every adapter tensor; nothing is returned unless all of them are right."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the adapter tensors of the checkpoint)")
    try:
        with safe_open(str(file), framework="pt") as f:
            _check_names(file, set(f.keys()), expected)
            tensors = {name: f.get_tensor(name) for name in sorted(expected)}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    for name, t in tensors.items():
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(
                f"{file}: tensor '{name}' has shape {list(t.shape)}, expected {list(expected[name])}"
            )
        if t.dtype != dtype:
            raise CheckpointError(
                f"{file}: tensor '{name}' has dtype {t.dtype}, the config's dtype is {dtype}"
            )
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{file}: tensor '{name}' has non-finite values (nan or inf)")
    return tensors


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def check_tensor_header(
    file: Path, dtype: torch.dtype, expected: dict[str, tuple[int, ...]]
) -> None:
    """The adapter file's names, shapes and dtypes, from its safetensors header only (no tensor
    is read): CheckpointError naming the file and tensor, as read_adapter_tensors would."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the adapter tensors of the checkpoint)")
    try:
        with safe_open(str(file), framework="pt") as f:
            _check_names(file, set(f.keys()), expected)
            header = {n: (f.get_slice(n).get_shape(), f.get_slice(n).get_dtype()) for n in expected}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    for name, (shape, kind) in header.items():
        if tuple(shape) != expected[name]:
            raise CheckpointError(
                f"{file}: tensor '{name}' has shape {list(shape)}, expected {list(expected[name])}"
            )
        if SAFETENSORS_DTYPES.get(kind) != dtype:
            raise CheckpointError(
                f"{file}: tensor '{name}' has dtype {kind}, the config's dtype is {dtype}"
            )


def _read_layout(path: Path) -> tuple[RemixConfig, str, BaseModelShape]:
    """Config, base model location and shape of checkpoint `path`, checked against each other."""
    config = read_config(path)
    base_path, base_cfg = resolve_base_model(path, config)
    try:
        shape = BaseModelShape.from_hf_config(base_cfg)
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: field 'base_model': the config of base model {base_path} "
            f"lacks {e} (or is not a decoder-only model config)"
        ) from None
    check_against_base(path / CONFIG_FILE, config, shape)
    return config, base_path, shape


def read_checkpoint_header(path: str | os.PathLike) -> RemixCheckpoint:
    """A checkpoint validated without reading its tensors (config, base model, the adapter
    file's header): what a server checks before choosing to load a folder. `tensors` is empty;
    values (non-finite ones) are checked only by load_checkpoint."""
    path = Path(path)
    config, base_path, shape = _read_layout(path)
    expected = expected_tensor_shapes(config, shape)
    check_tensor_header(path / ADAPTERS_FILE, TORCH_DTYPES[config.dtype], expected)
    return RemixCheckpoint(path, config, base_path, shape, {})


def load_checkpoint(path: str | os.PathLike) -> RemixCheckpoint:
    """Load and fully validate a checkpoint directory (tensors on the CPU)."""
    path = Path(path)
    config, base_path, shape = _read_layout(path)
    expected = expected_tensor_shapes(config, shape)
    tensors = read_adapter_tensors(path / ADAPTERS_FILE, TORCH_DTYPES[config.dtype], expected)
    return RemixCheckpoint(path, config, base_path, shape, tensors)
