"""`remix-train analyze`: per-module routing figures of a checkpoint over prompts, with the
server's definitions, checked against the trainer's independent routing statistics and on
checkpoints whose routers are forced onto fixed LoRAs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.models import make_checkpoint, make_remix_model, save_word_tokenizer, tiny_remix_config

from remix_infer.checkpoint import save_checkpoint
from remix_infer.modeling import adapter_tensors, load_remix_model, remix_modules
from remix_infer.train.cli import main
from remix_infer.train.trainer import RoutingStats

VOCAB = 64
PROMPTS = [
    " ".join(f"w{(7 * i + 3 * j) % (VOCAB - 3) + 3}" for j in range(3 + i % 5)) for i in range(20)
]


def write_prompts(path, with_completion: bool = True):  # noqa: ANN001, ANN201
    with open(path, "w") as f:
        for i, p in enumerate(PROMPTS):
            record = {"prompt": p} | ({"completion": " w5 w6"} if with_completion and i % 2 else {})
            f.write(json.dumps(record) + "\n")
    return path


def analyze(tmp_path, ckpt, capsys=None) -> dict:  # noqa: ANN001
    data = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "analysis"
    assert main(["analyze", str(ckpt), "--data", str(data), "--out", str(out)]) == 0
    assert (out / "analysis.png").stat().st_size > 5_000
    return json.loads((out / "analysis.json").read_text())


def forced_checkpoint(directory, weighting: str):  # noqa: ANN001, ANN201
    """A tiny checkpoint whose routers ignore the input (zero weights) and rank the LoRAs by a
    fixed bias, 8 > 0 > -8 = -8: every token of every module selects LoRAs 0 and 1."""
    base = make_checkpoint(directory / "template") / "base"
    config = tiny_remix_config(
        base_model=str(base), weighting=weighting, router_bias=True, omega=1.0
    )
    model = make_remix_model(base, config)
    with torch.no_grad():
        for m in remix_modules(model).values():
            m.router.weight.zero_()
            m.router.bias.copy_(torch.tensor([8.0, 0.0, -8.0, -8.0]))
    save_word_tokenizer(base, VOCAB)
    return save_checkpoint(directory / "ckpt", config, adapter_tensors(model))


def test_figures_match_the_trainers_routing_statistics(tmp_path, checkpoint_dir):
    """On a random checkpoint: shares sum to 1, ESS is k (constant weights), and selections,
    effective LoRAs and entropy equal the trainer's own count of the same forward."""
    save_word_tokenizer(checkpoint_dir / "base", VOCAB)
    report = analyze(tmp_path, checkpoint_dir)
    assert (report["top_k"], report["num_loras"], report["sequences"]) == (2, 4, 20)
    assert len(report["modules"]) == 2 * 7 and report["collapsed_modules"] == []

    from transformers import AutoTokenizer

    model, _ = load_remix_model(checkpoint_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir / "base")
    stats = RoutingStats()
    texts = [p + (" w5 w6" if i % 2 else "") for i, p in enumerate(PROMPTS)]
    with torch.no_grad():
        for text in texts:  # one sequence at a time: no padding at all
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            model(input_ids=ids)
            stats.add(model, torch.ones_like(ids))
    expected = stats.summary()
    for name, fig in report["modules"].items():
        assert fig["tokens"] == stats.tokens
        assert sum(fig["shares"]) == pytest.approx(1.0)
        counts = expected[name]["counts"]
        assert fig["shares"] == pytest.approx([c / sum(counts) for c in counts])
        assert fig["effective_loras"] == pytest.approx(expected[name]["effective_loras"], rel=1e-5)
        assert fig["router_entropy"] == pytest.approx(
            expected[name]["mean_router_entropy"], rel=1e-5
        )
        assert fig["ess"] == pytest.approx(2.0) and not fig["collapsed"]
        assert 1.0 < fig["effective_loras"] <= 4.0


def test_router_forced_onto_fixed_loras_with_learned_weights_is_flagged(tmp_path, capsys):
    """softmax_topk weights over logits 8 and 0: ESS ~ 1 < (k+1)/2, so every module collapses."""
    ckpt = forced_checkpoint(tmp_path, "softmax_topk")
    report = analyze(tmp_path, ckpt)
    assert len(report["collapsed_modules"]) == len(report["modules"]) == 14
    weight = 1 / (1 + math.exp(-8.0))  # softmax of 8 against 0
    expected_ess = 1 / (weight**2 + (1 - weight) ** 2)
    for fig in report["modules"].values():
        assert fig["shares"] == pytest.approx([0.5, 0.5, 0.0, 0.0])
        assert fig["effective_loras"] == pytest.approx(2.0, rel=1e-5)
        assert fig["ess"] == pytest.approx(expected_ess, rel=1e-4) and fig["collapsed"]
    assert "14 collapsed" in capsys.readouterr().out


def test_router_forced_onto_fixed_loras_with_constant_weights(tmp_path):
    """The same fixed pair under ReMix's constant weights: shares and effective LoRAs show the
    two-LoRA pool and ESS stays k. /metrics' rule flags fewer than k LoRAs in use, and exactly k
    is not fewer: this module is not flagged, there or here."""
    report = analyze(tmp_path, forced_checkpoint(tmp_path, "constant"))
    for fig in report["modules"].values():
        assert fig["shares"] == pytest.approx([0.5, 0.5, 0.0, 0.0])
        assert fig["effective_loras"] == pytest.approx(2.0, rel=1e-5)
        assert fig["ess"] == 2.0 and not fig["collapsed"]
        assert fig["router_entropy"] == pytest.approx(
            float(torch.special.entr(torch.softmax(torch.tensor([8.0, 0, -8, -8]), 0)).sum()),
            rel=1e-4,
        )


def test_bad_prompt_file_names_file_line_and_field(tmp_path, checkpoint_dir, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "w3 w4"}\n{"text": "w3"}\n')
    code = main(["analyze", str(checkpoint_dir), "--data", str(data), "--out", str(tmp_path)])
    assert code == 2
    assert f"{data}:2: field 'prompt' must be a string" in capsys.readouterr().err
    good = write_prompts(tmp_path / "good.jsonl")
    code = main(["analyze", str(tmp_path / "nope"), "--data", str(good)])
    assert code == 2 and "checkpoint directory not found" in capsys.readouterr().err


def test_a_run_saved_along_the_way_is_analyzed_step_by_step(tmp_path, tiny_base, capsys):
    """--save-every 2 over 4 steps keeps steps/step-000002 and step-000004 beside the final
    checkpoint; analyze of the run's folder reports each, and the last is the final checkpoint."""
    from remix_infer.checkpoint import load_checkpoint

    save_word_tokenizer(tiny_base, VOCAB)
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "completion": " w5 w6"}) + "\n" for p in PROMPTS)
    )
    run = tmp_path / "run"
    steps = ["--max-steps", "4", "--save-every", "2", "--batch-size", "4", "--eval-every", "0"]
    small = ["--num-loras", "4", "--top-k", "2", "--rank", "4", "--learning-rate", "0.05"]
    train = ["train", "--base-model", str(tiny_base), "--data", str(data), "--out", str(run)]
    assert main([*train, *steps, *small]) == 0
    saved = sorted(p.name for p in (run / "steps").iterdir())
    assert saved == ["step-000002", "step-000004"]
    final, last, first = (
        load_checkpoint(p).tensors for p in (run, *(run / "steps" / s for s in saved[::-1]))
    )
    assert all(torch.equal(final[name], last[name]) for name in final)
    assert any(not torch.equal(first[name], last[name]) for name in final)  # it trained between

    capsys.readouterr()
    out = tmp_path / "analysis"
    assert main(["analyze", str(run), "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "analysis_steps.json").read_text())
    assert [s["step"] for s in report["steps"]] == [2, 4]
    whole = json.loads((out / "analysis.json").read_text())["modules"]
    for name, fig in report["steps"][1]["modules"].items():
        assert fig["effective_loras"] == whole[name]["effective_loras"]
    assert (out / "analysis_steps.png").stat().st_size > 5_000
    assert "step 2: effective LoRAs" in capsys.readouterr().out
