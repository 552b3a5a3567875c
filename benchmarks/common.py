"""Shared pieces of the benchmarks: where results go and what machine made them. The models
and server helpers are shared with the tests (tests/helpers), re-exported here on first use, so
that bench_gpu.py, which needs none of them, runs with torch alone (no pydantic, no vLLM)."""

from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
from datetime import date
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
