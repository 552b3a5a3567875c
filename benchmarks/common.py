"""Shared pieces of the benchmarks: where results go and what machine made them. The models
and server helpers are shared with the tests (tests/helpers), re-exported here."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.models import (  # noqa: E402, F401 - re-exported for the benchmarks
    build_peft_lora,
    build_random_llama,
    build_random_remix,
    save_word_tokenizer,
)
from helpers.servers import free_port, server_env  # noqa: E402, F401

RESULTS = Path(__file__).resolve().parent / "results"


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
