"""Shared pieces of the benchmarks: a realistic-width random model and its ReMix checkpoint."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (out / "tokenizer.json").exists():
        save_word_tokenizer(out, vocab)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def build_random_remix(
    out: Path, base: Path, n: int = 8, k: int = 4, r: int = 8, seed: int = 0
) -> Path:
    """A ReMix checkpoint with random adapters over `base` (all seven projections)."""
    from remix_infer.checkpoint import BaseModelShape, expected_tensor_shapes, save_checkpoint
    from remix_infer.config import ALL_TARGET_MODULES, RemixConfig

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
    from remix_infer.config import ALL_TARGET_MODULES, module_path

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


def machine() -> str:
    """A short description of where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def machine_tag() -> str:
    """Short name for result files: the GPU's name, else the CPU architecture and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-").lower()
    return f"{platform.machine()}-{os.cpu_count()}cpu"


def save_results(name: str, results: dict, directory: Path = RESULTS) -> Path:
    """<directory, default benchmarks/results>/<date>-<machine>-<name>.json"""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{date.today().isoformat()}-{machine_tag()}-{name}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path
