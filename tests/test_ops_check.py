"""`make gpu-check` (python -m remix_infer.ops.check) and the engine's start-up kernel check.

Without a GPU the check runs in Triton's interpreter at its small shape; on a GPU host (no
TRITON_INTERPRET) it is the real GPU check. Its module runs with pydantic, vLLM and transformers
blocked (torch and Triton alone). The engine test breaks the Triton kernel on purpose (a
sitecustomize that doubles omega in every worker) and forces Triton on CPU with
--remix-kernel triton: the start must fail naming the check; --remix-kernel torch serves.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch
from helpers.blocked import blocked_command
from helpers.models import save_word_tokenizer
from helpers.servers import ROOT, SMALL_ENGINE, free_port, running_server, server_env

from remix_infer.ops import PoolLayout, check, set_padding_provider, triton_route
from remix_infer.ops.stats import padding_mask

# Imported at start by every Python process of the server: the routing kernel with omega doubled.
BROKEN_KERNEL = """
from remix_infer.ops import triton_route

_real_route = triton_route.route


def _broken_route(*args, **kwargs):
    args = list(args)
    args[13] = 2 * args[13]  # omega
    _real_route(*args, **kwargs)


triton_route.route = _broken_route
"""


def test_gpu_check_runs_with_torch_and_triton_only():
    """The whole check from the checkout root, with pydantic, vLLM and transformers blocked:
    a table, then one JSON verdict line that passes."""
    proc = subprocess.run(
        blocked_command("remix_infer.ops.check"),
        cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.loads(proc.stdout.strip().splitlines()[-1])
    assert verdict["verdict"] == "pass" and not verdict["failed"], verdict
    assert verdict["triton"] and "tie_margin" in verdict
    for name in ("selections", "outputs", "counters", "splits"):
        assert f"\n{name} " in proc.stderr, name
    assert "FAIL" not in proc.stderr
    assert "slots=8 grouped" in proc.stderr  # the grouped kernels ran
    for name in triton_route.CONFIGURATIONS:  # and each configuration of the routing kernel
        assert name == "default" or f"dense [{name}]" in proc.stderr, name


def broken_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routing kernel with omega doubled, in this process."""
    real = triton_route.route

    def route(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        args = list(args)
        args[13] = 2 * args[13]
        real(*args, **kwargs)

    monkeypatch.setattr(triton_route, "route", route)


def test_check_fails_on_a_broken_kernel(monkeypatch, capsys):
    """A wrong kernel fails the outputs check (selections are right), and the command exits
    non-zero with a failing verdict; the engine's padding provider survives the check."""
    layout = PoolLayout(64, (48, 16), (0, 1), 6, 4, 2, 0.7, "constant")
    engine_padding = torch.tensor([False, True])
    set_padding_provider(lambda: engine_padding)
    try:
        assert not check.failures(check.quick_check(layout, torch.bfloat16, "cpu"))
        assert padding_mask(2) is engine_padding
    finally:
        set_padding_provider(lambda: None)
    broken_route(monkeypatch)
    bad = check.failures(check.quick_check(layout, torch.bfloat16, "cpu"))
    assert {o.check for o in bad} == {"outputs"}, bad
    monkeypatch.setattr(
        check, "full_check", lambda device: check.quick_check(layout, torch.bfloat16, device)
    )
    assert check.main([]) == 1
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert verdict["verdict"] == "fail" and verdict["failed"][0].startswith("outputs ")


def test_remix_kernel_flag_and_variable(monkeypatch):
    """--remix-kernel and REMIX_REMIX_KERNEL reach the engine's arguments; a bad value in the
    variable is refused naming both."""
    from server.cli import build_parser
    from server.settings import EngineSettings, SettingsError, from_args

    def settings(*args: str) -> EngineSettings:
        return from_args(EngineSettings, build_parser().parse_args(list(args)))

    assert settings().remix_kernel == "auto"
    assert settings("--remix-kernel", "torch").remix_kernel == "torch"
    monkeypatch.setenv("REMIX_REMIX_KERNEL", "triton")
    assert settings().remix_kernel == "triton"
    monkeypatch.setenv("REMIX_REMIX_KERNEL", "cuda")
    with pytest.raises(SettingsError, match="--remix-kernel cuda .or REMIX_REMIX_KERNEL."):
        settings().check()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="forces Triton's interpreter on CPU")
def test_engine_refuses_a_broken_kernel_and_serves_on_torch(checkpoint_dir, tmp_path):
    """--remix-kernel triton with the broken kernel: the engine does not start, and says which
    check failed on which device and Triton; --remix-kernel torch serves a completion."""
    save_word_tokenizer(checkpoint_dir / "base", 64)  # the tiny base's vocabulary
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BROKEN_KERNEL)
    env = server_env(TRITON_INTERPRET="1")
    env["PYTHONPATH"] = f"{site}:{ROOT}"
    args = [sys.executable, "-m", "server.cli", "--checkpoint", str(checkpoint_dir), "--port",
            str(free_port()), *SMALL_ENGINE, "--max-model-len", "64", "--remix-kernel", "triton"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "ReMix's Triton kernel failed its start-up check on cpu" in log, log[-3000:]
    assert f"with Triton {check.triton_version()}: outputs at served" in log
    assert "--remix-kernel torch" in log
    served = [*SMALL_ENGINE, "--max-model-len", "64", "--remix-kernel", "torch"]
    with running_server(checkpoint_dir, tmp_path / "torch.log", served, env=env) as server:
        body = {"prompt": "w5 w6", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
        resp = httpx.post(server["base"] + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 2
