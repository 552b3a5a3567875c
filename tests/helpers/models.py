"""Models for tests and benchmarks, all built locally (no hub): tiny random causal LMs and
ReMix checkpoints over them (tests), realistic-width random Llamas with a word-level tokenizer,
their random ReMix checkpoints and PEFT LoRAs (benchmarks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from remix_infer.checkpoint import save_checkpoint
from remix_infer.config import ALL_TARGET_MODULES, RemixConfig

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


def save_random_lm(
    path: str | os.PathLike, model_type: str = "llama", seed: int = 0, **config: object
) -> Path:
    """Save a randomly initialised causal LM of `model_type` with this config into `path`. The
    weights depend only on `seed`; the global torch RNG state is left as it was."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_config_class(model_type)(**config))
    model.save_pretrained(path)
    return path


def make_tiny_base(
    path: str | os.PathLike, model_type: str = "llama", seed: int = 0, **overrides: object
) -> Path:
    """Save a tiny randomly initialised causal LM (TINY_BASE, with `overrides`) into `path`."""
    return save_random_lm(path, model_type, seed, **{**TINY_BASE, **overrides})


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


def save_word_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer for a random model: token i is the word `w{i}` (ids 0-2 are
    <unk>, <s>, </s>), so any token-id prompt decodes to text and back, one word per token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(out)


def build_random_llama(
    out: Path, hidden: int = 1024, layers: int = 8, vocab: int = 32000, seed: int = 0
) -> Path:
    """A random Llama (head_dim 64, 4 KV heads, SwiGLU 2.75x) with a word-level tokenizer."""
    if not (out / "tokenizer.json").exists():
        save_word_tokenizer(out, vocab)
    if (out / "config.json").exists():
        return out
    return save_random_lm(
        out,
        "llama",
        seed,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
    )


def build_random_remix(
    out: Path, base: Path, n: int = 8, k: int = 4, r: int = 8, seed: int = 0
) -> Path:
    """A ReMix checkpoint with random adapters over `base` (all seven projections)."""
    from remix_infer.checkpoint import BaseModelShape, expected_tensor_shapes

    if (out / "remix_config.json").exists():
        return out
    hf = json.loads((base / "config.json").read_text())
    config = RemixConfig(
        base_model=str(base.resolve()),
        architecture="llama",
        num_layers=hf["num_hidden_layers"],
        target_modules=list(ALL_TARGET_MODULES),
        num_loras=n,
        top_k=k,
        rank=r,
        omega=2.0 / (k * r),
    )
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_tensor_shapes(config, BaseModelShape.from_hf_config(hf))
    tensors = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes.items()}
    return save_checkpoint(out, config, tensors)


def build_peft_lora(out: Path, base: Path, rank: int = 32, seed: int = 0) -> Path:
    """One ordinary LoRA of `rank` on all seven projections of `base`, in PEFT's format (what
    vLLM's --lora-modules loads), with random weights."""
    from safetensors.torch import save_file

    from remix_infer.checkpoint import BaseModelShape
    from remix_infer.config import module_path

    if (out / "adapter_config.json").exists():
        return out
    hf = json.loads((base / "config.json").read_text())
    shape = BaseModelShape.from_hf_config(hf)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf["num_hidden_layers"]):
        for module in ALL_TARGET_MODULES:
            d_in, d_out = shape.linear_shape(module)
            prefix = f"base_model.model.{module_path(layer, module)}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base.resolve()),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(ALL_TARGET_MODULES),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def save_chat_tokenizer(out: Path) -> None:
    """A word-level tokenizer whose words are the roles, ':', and w0..w9, with a chat template
    that renders each turn as `<s> ROLE : CONTENT </s>` and the generation prompt as
    `<s> assistant :`: one token per word, so a test can check labels token by token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "system", "user", "assistant", ":"]
    words += [f"w{i}" for i in range(10)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant : {% endif %}"
    )
    fast.save_pretrained(out)


def router_variant(
    source: Path, out: Path, seed: int | None = None, lora_b_noise: float = 0.0
) -> Path:
    """A cheap distinct checkpoint: the one at `source` with other routers (negated when seed
    is None, else fresh random ones of the same scale), so tokens pick other LoRAs of the same
    pools; over the same base model directory (an absolute path). lora_b_noise: add Gaussian
    noise of this standard deviation to every LoRA B matrix too, so the LoRAs
    themselves differ: other routers alone over a barely trained pool answer alike."""
    from remix_infer.checkpoint import load_checkpoint
    from remix_infer.config import (
        LORA_B,
        ROUTER_BIAS,
        ROUTER_WEIGHT,
        SHARED_ROUTER_BIAS,
        SHARED_ROUTER_WEIGHT,
    )

    routers = (ROUTER_WEIGHT, ROUTER_BIAS, SHARED_ROUTER_WEIGHT, SHARED_ROUTER_BIAS)
    ckpt = load_checkpoint(source)
    gen = torch.Generator().manual_seed(seed or 0)

    def other(k: str, t: torch.Tensor) -> torch.Tensor:
        if k.endswith(routers):
            if seed is None:
                return -t
            return (torch.randn(t.shape, generator=gen) * t.float().std()).to(t.dtype)
        if k.endswith(LORA_B) and lora_b_noise:
            return (t.float() + torch.randn(t.shape, generator=gen) * lora_b_noise).to(t.dtype)
        return t

    tensors = {k: other(k, t) for k, t in ckpt.tensors.items()}
    config = ckpt.config.model_copy(update={"base_model": ckpt.base_model_path})
    return save_checkpoint(out, config, tensors)
