"""`make bench-gpu` without a GPU: its small CPU run, which CI can afford, ends with its JSON line
after checking the Triton kernel (in the interpreter) against the float32 torch path."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.blocked import blocked_command

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU host `make bench-gpu` runs the real one"
)
def test_bench_gpu_cpu_smoke(tmp_path):
    """From the checkout root, with pydantic, vLLM and transformers unimportable (the GPU
    machine has torch and Triton alone)."""
    proc = subprocess.run(
        blocked_command("benchmarks/bench_gpu.py", "--tokens", "1", "16", "--repeats", "1",
                        "--slot-tokens", "8", "--results", str(tmp_path)),
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no GPU here" in proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("remix_over_base_decode", "remix_over_base_prefill", "remix_over_lora32"):
        assert math.isfinite(line[key]) and line[key] > 0, (key, line)
    assert line["bf16_topk_disagreement"] == 0.0
    assert line["bf16_topk_disagreement_grouped_slots"] == 0.0  # the grouped 8-slot check ran
    results = json.loads(next(tmp_path.glob("*-gpu.json")).read_text())
    assert {r["tokens"] for r in results["rows"] if "case" not in r} == {1, 16}
    slot_rows = [r for r in results["rows"] if "case" in r]  # checkpoint slots, every case
    assert len(slot_rows) == 7 and all(r["tokens"] == 8 and r["ms"] > 0 for r in slot_rows)
    assert line["slots 8 checkpoints of 8 / one checkpoint"] > 0
    assert set(results["check"]) == {"qkv", "o", "gate_up", "down"}
    assert set(results["check_grouped_slots"]) == {"qkv"}  # here: one, in the interpreter
    assert next(tmp_path.glob("*-gpu.png")).stat().st_size > 0
