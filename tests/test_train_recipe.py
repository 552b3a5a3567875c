"""`--preset remix-paper` and the memory estimate a run prints at start (and refuses by)."""

from __future__ import annotations

import math

import pytest

from remix_infer.train.cli import PRESETS, parse_args
from remix_infer.train.memory import (
    GIB,
    MemoryEstimate,
    base_parameters,
    check_fits,
    estimate_memory,
)
from remix_infer.train.trainer import TrainConfig

# Meta-Llama-3-8B's config.json (the fields the estimate reads).
LLAMA3_8B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    tie_word_embeddings=False,
)


def paper_config(*flags: str) -> TrainConfig:
    args = parse_args(["train", "--base-model", "b", "--data", "d", "--out", "o", *flags])
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__annotations__})


def test_the_paper_preset_sets_the_recipe_and_flags_still_win():
    config = paper_config("--preset", "remix-paper")
    remix = config.remix_config("base", "llama", 32)
    assert (remix.num_loras, remix.top_k, remix.rank, config.num_samples) == (8, 4, 8, 4)
    assert len(remix.target_modules) == 7
    assert remix.omega == pytest.approx(2 / math.sqrt(4 * 8))  # rsLoRA's rule, alpha 2
    assert config.resolved_warmup() == config.max_steps // 10
    assert paper_config("--preset", "remix-paper", "--top-k", "2").top_k == 2
    assert paper_config("--top-k", "2").num_loras == TrainConfig().num_loras  # no preset
    assert set(PRESETS["remix-paper"]) <= set(TrainConfig.__annotations__)


def test_llama3_8b_estimate_counts_its_parameters():
    from remix_infer.checkpoint import BaseModelShape

    assert base_parameters(LLAMA3_8B, BaseModelShape.from_hf_config(LLAMA3_8B)) == 8_030_261_248
    remix = paper_config("--preset", "remix-paper").remix_config("b", "llama", 32)
    tokens = 1 * 4 * 2048  # batch 1, M = 4 copies, 2048 tokens
    estimate = estimate_memory(LLAMA3_8B, remix, tokens, "bfloat16", checkpointing=True)
    assert estimate.base_weights == 8_030_261_248 * 2
    # n r (d_in + d_out) + n d_in per projection, 32 layers: 177,733,632 float32 parameters
    assert estimate.adapters == 177_733_632 * 4
    assert estimate.optimizer == 2 * estimate.gradients == 2 * estimate.adapters
    sharded = estimate_memory(LLAMA3_8B, remix, tokens, "bfloat16", shards=8, checkpointing=True)
    assert sharded.base_weights == estimate.base_weights / 8
    assert sharded.activations == estimate.activations
    full = estimate_memory(LLAMA3_8B, remix, tokens, "bfloat16", checkpointing=False)
    assert full.activations > 5 * estimate.activations  # every layer's activations kept


def test_a_run_that_cannot_fit_is_refused_with_the_numbers():
    estimate = MemoryEstimate(16 * GIB, GIB, GIB, 2 * GIB, 60 * GIB)
    check_fits(estimate, 100 * GIB)  # 80 GiB of 100: fits
    check_fits(estimate, None)  # the CPU: not checked
    with pytest.raises(ValueError, match=r"needs about 80.00 GiB per device \(base weights 16.00"):
        check_fits(estimate, 80 * GIB)
