"""Shared fixtures: a tiny local Llama base model and ReMix checkpoints built on it (the
builders live in helpers/models.py, which test files import directly).

Everything here is local: no network, no hub downloads.
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


def _pin_xdist_worker() -> None:
    """Under `pytest -n N` (make test), worker gwI's engines run their OpenMP threads on core
    I mod (cores): vLLM's automatic binding would put every worker's engine on the same core.
    Its own torch work gets an equal share of the cores."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return
    import torch

    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(cores[int(worker[2:]) % len(cores)]))
    torch.set_num_threads(max(1, len(cores) // workers))


_pin_xdist_worker()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers.models import make_checkpoint  # noqa: E402

# `make test` hands whole files to its workers in collection order (--dist loadfile
# --no-loadscope-reorder): the longest files go first, so that none of them is left running
# alone at the end.
LONGEST_FILES = (
    "test_readme.py",
    "test_server.py",
    "test_engine_parity.py",
    "test_distributed.py",
    "test_store_server.py",
    "test_multi_checkpoint_server.py",
    "test_study.py",
    "test_ops_check.py",
    "test_api.py",
    "test_train_parallel.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable


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
