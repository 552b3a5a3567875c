"""Every Triton kernel specialisation that the engine and `make bench-gpu` launch at the
Llama-3-8B and Llama-3.2-1B geometries, compiled for sm_80 (A100) and sm_90 (H100) by Triton's
own compiler without a GPU (remix_infer/ops/aot_compile.py): each compiles, its shared memory
fits the target, and the decode configurations (blocks of 16 tokens) do not spill; spills
elsewhere are printed. One process per target, side by side (the interpreter off there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from remix_infer.ops.aot_compile import TARGETS

ROOT = Path(__file__).resolve().parents[1]


def test_every_launched_specialisation_compiles_for_ampere_and_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "remix_infer.ops.aot_compile", "--json", "--target", t.name],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for t in TARGETS
    ]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-3000:]
        rows += json.loads(out)
    assert {r["target"] for r in rows} == {t.name for t in TARGETS}
    assert {r["kernel"] for r in rows} == {
        "remix_route_kernel",
        "grouped_shrink_route_kernel",
        "grouped_expand_kernel",
    }
    assert {"engine, 1 checkpoint", "bench-gpu stack"} <= {u for r in rows for u in r["uses"]}
    assert [r for r in rows if not r["fits"]] == []
    spilling = [r for r in rows if r["stack_bytes"]]
    print("specialisations that spill:", spilling or "none")
    assert [r for r in spilling if r["decode"]] == []
