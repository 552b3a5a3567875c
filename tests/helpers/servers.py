"""Real server processes for tests and benchmarks: free loopback ports, the environment of a
server subprocess, `remix-serve` started and waited for, its /metrics scraped."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]  # the repository

# A small engine that starts fast on CPU; tests add --max-model-len and their own flags.
SMALL_ENGINE = (
    "--enforce-eager",
    "--dtype",
    "float32",
    "--kv-cache-gib",
    "1",
    "--max-num-seqs",
    "32",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    """The environment of a server subprocess: this checkout's code, no network."""
    env = dict(os.environ, **extra)
    env.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


@contextmanager
def running_process(
    cmd: Sequence[str],
    log_path: Path,
    ready: Callable[[], bool],
    timeout: float,
    **popen: object,
) -> Iterator[subprocess.Popen]:
    """Start `cmd` (its output in `log_path`) and wait until `ready()` is true (an HTTP check;
    connection errors count as not yet); terminate the process on exit."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)
    deadline = time.time() + timeout
    try:
        while True:
            assert proc.poll() is None, f"{cmd[0]} exited:\n" + log_path.read_text()[-3000:]
            assert time.time() < deadline, f"{cmd[0]} not ready:\n" + log_path.read_text()[-3000:]
            try:
                if ready():
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def running_server(
    checkpoint: Path | None,
    log_path: Path,
    args: Sequence[str] = (),
    timeout: float = 180,
    env: dict[str, str] | None = None,
) -> Iterator[dict]:
    """`python -m server.cli --checkpoint CHECKPOINT --port FREE ARGS...` (no --checkpoint when
    None: ARGS name the model), its output in `log_path`, once /ready answers 200 (env: the
    process's environment, default server_env()). Yields
    {"base": URL, "seen": [(health, ready) statuses while starting], "log": log_path, "proc":
    Popen}."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "--port", str(port), *args]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    base = f"http://127.0.0.1:{port}"
    seen: list[tuple[int, int]] = []

    def ready() -> bool:
        h = httpx.get(base + "/health", timeout=2).status_code
        r = httpx.get(base + "/ready", timeout=2).status_code
        seen.append((h, r))
        return r == 200

    with running_process(cmd, log_path, ready, timeout, cwd=ROOT, env=env or server_env()) as proc:
        yield {"base": base, "seen": seen, "log": log_path, "proc": proc}


def scrape(server: dict) -> dict:
    """All samples of the server's GET /metrics, parsed with prometheus_client's own parser:
    {(sample name, sorted label items): value}."""
    resp = httpx.get(server["base"] + "/metrics", timeout=30)
    assert resp.status_code == 200
    return metric_samples(resp.text)


def metric_samples(text: str) -> dict:
    """A /metrics body, parsed: {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
