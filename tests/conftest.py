"""Shared test helpers: a tiny local Llama base model and ReMix checkpoints built on it.

Everything here is local: no network, no hub downloads. Other test files import these helpers
(`from conftest import make_checkpoint`) or use the fixtures below.
"""

from __future__ import annotations

import os
import shutil

# Tests never touch the network. Without this, a base model that is missing locally makes
# transformers retry the hub for ~20 s before giving up. Must be set before huggingface_hub
# is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels (remix_infer.ops) run in Triton's interpreter where there is no GPU; it is
# chosen when a kernel is defined, so before remix_infer.ops.triton_route is imported.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from remix_infer.checkpoint import save_checkpoint  # noqa: E402
from remix_infer.config import ALL_TARGET_MODULES, RemixConfig  # noqa: E402

# hidden 128 = 2 heads x head_dim 64; one kv head, so k_proj/v_proj have d_out 64.
TINY_BASE = dict(
    hidden_size=128,
    num_attention_heads=2,
    head_dim=64,
    num_key_value_heads=1,
    intermediate_size=256,
    num_hidden_layers=2,
    vocab_size=64,
    max_position_embeddings=128,
)

# n=4 LoRAs of rank 4 on every projection, top-2, omega = 2 / (k r).
TINY_REMIX = dict(
    architecture="llama",
    num_layers=2,
    target_modules=list(ALL_TARGET_MODULES),
    num_loras=4,
    top_k=2,
    rank=4,
    omega=0.25,
)


def _config_class(model_type: str) -> type:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]


def make_tiny_base(
    path: str | os.PathLike, model_type: str = "llama", seed: int = 0, **overrides
) -> Path:
    """Save a tiny randomly initialised causal LM (TINY_BASE, with `overrides`) into `path`.

    The weights depend only on `seed`; the global torch RNG state is left as it was.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = _config_class(model_type)(**{**TINY_BASE, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path


def tiny_remix_config(base_model: str = "base", **overrides) -> RemixConfig:
    """A RemixConfig matching a TINY_BASE model, with `overrides` applied."""
    return RemixConfig(base_model=base_model, **{**TINY_REMIX, **overrides})


def make_remix_model(base_path: str | os.PathLike, config: RemixConfig, seed: int = 0):
    """Load the base model, inject ReMix and give every adapter tensor random non-zero values
    (so the LoRAs change the output and the router ranking is not all ties). Eval mode, float32."""
    from transformers import AutoModelForCausalLM

    from remix_infer.modeling import adapter_tensors, inject_remix

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    inject_remix(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_tensors(model).values():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return model.eval()


def make_checkpoint(
    directory: str | os.PathLike, base_rel: str = "base", seed: int = 0, **config_overrides
) -> Path:
    """Write a complete ReMix checkpoint into `directory`.

    The base model is `base_rel`, a path relative to the checkpoint directory (so the folder can
    be moved as a whole); a tiny base is created there unless it already exists.
    Returns the checkpoint directory.
    """
    from remix_infer.modeling import adapter_tensors

    directory = Path(directory)
    base = directory / base_rel
    if not (base / "config.json").is_file():
        make_tiny_base(base)
    config = tiny_remix_config(base_model=base_rel, **config_overrides)
    model = make_remix_model(base, config, seed=seed)
    return save_checkpoint(directory, config, adapter_tensors(model))


@pytest.fixture(scope="session")
def _checkpoint_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("template") / "ckpt")


@pytest.fixture
def tiny_base(tmp_path: Path, _checkpoint_template: Path) -> Path:
    """A tiny Llama base model directory (TINY_BASE) at tmp_path/base, a private copy."""
    return Path(shutil.copytree(_checkpoint_template / "base", tmp_path / "base"))


@pytest.fixture
def checkpoint_dir(tmp_path: Path, _checkpoint_template: Path) -> Path:
    """A valid ReMix checkpoint (TINY_REMIX, seed 0) at tmp_path/ckpt, its base model at
    tmp_path/ckpt/base (base_model "base"). A private copy: tests may edit or break it."""
    return Path(shutil.copytree(_checkpoint_template, tmp_path / "ckpt"))


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo pipeline's checkpoint at its quick settings (about a minute), built once for the
    session and shared by the tests that start a real server: do not modify it."""
    from remix_infer.train.demo import DemoSettings, run_demo

    out = tmp_path_factory.mktemp("demo") / "ckpt"
    run_demo(out, DemoSettings.quick())
    return out
