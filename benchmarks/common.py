"""Shared pieces of the benchmarks: where results go and what machine made them. The models
and server helpers are shared with the tests (tests/helpers), re-exported here on first use, so
that bench_gpu.py, which needs none of them, runs with torch alone (no pydantic, no vLLM)."""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the checkout's remix_infer, tests/helpers
RESULTS = Path(__file__).resolve().parent / "results"
# name -> the tests/helpers module that defines it
HELPERS = {
    "build_peft_lora": "helpers.models",
    "build_random_llama": "helpers.models",
    "build_random_remix": "helpers.models",
    "save_word_tokenizer": "helpers.models",
    "free_port": "helpers.servers",
    "server_env": "helpers.servers",
}


def __getattr__(name: str) -> object:
    """`from common import build_random_llama` and the like: imported from tests/helpers here."""
    if name not in HELPERS:
        raise AttributeError(f"module 'common' has no attribute {name!r}")
    return getattr(importlib.import_module(HELPERS[name]), name)


def cpu_info() -> dict:
    """The processor as /proc/cpuinfo names it, and the vector units its GEMM kernels can use
    (oneDNN picks AVX2, AVX-512 or AMX code at run time, so timings differ by family)."""
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["model"] = value.strip()
        elif key.strip() == "flags":
            present = set(value.split())
            info["flags"] = [
                f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in present
            ]
            break
    return info


def vector_isa() -> str:
    """The widest of the GEMM kernels' vector units here: amx, avx512, avx2 or base."""
    flags = cpu_info()["flags"]
    for isa, flag in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return isa
    return "base"


def machine() -> str:
    """A short description of where the numbers came from: the processor, its vector units
    (avx2 / avx512f / amx), threads and torch."""
    cpu = cpu_info()
    flags = ", ".join(cpu["flags"]) or "no avx2"
    return f"{cpu['model']} ({flags}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def paired_ratio(runs: list[float], reference_runs: list[float]) -> float:
    """The median of each repeat's own ratio runs[i] / reference_runs[i]: the cases of one
    repeat run back to back, so the machine's drift between repeats (up to 20% on a shared
    machine) cancels out."""
    return statistics.median(a / b for a, b in zip(runs, reference_runs, strict=True))


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def machine_tag() -> str:
    """Short name for result files: the GPU's name, else the CPU architecture, core count and
    widest vector unit (x86_64-2cpu-avx512), so runs on different CPU families stay apart."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-").lower()
    return f"{platform.machine()}-{os.cpu_count()}cpu-{vector_isa()}"


def save_results(name: str, results: dict, directory: Path = RESULTS) -> Path:
    """<directory, default benchmarks/results>/<UTC date and time>-<machine>-<name>.json, never
    over an earlier run's file (a suffix -2, -3, ... if one was written the same second)."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    stem = f"{stamp}-{machine_tag()}-{name}"
    path, again = directory / f"{stem}.json", 2
    while path.exists():
        path, again = directory / f"{stem}-{again}.json", again + 1
    path.write_text(json.dumps({"cpu": cpu_info(), **results}, indent=1) + "\n")
    return path
