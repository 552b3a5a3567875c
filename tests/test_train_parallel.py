"""`remix-train train` as 2 data-parallel processes under torchrun (gloo on CPU): the same run
as one process with the same global batch, and an exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.engines import greedy, remix_llm
from helpers.models import make_tiny_base, save_word_tokenizer
from reference import reference_run

from remix_infer.checkpoint import load_checkpoint
from remix_infer.modeling import load_remix_model, remix_modules
from remix_infer.train.cli import main

# 32 records of 8 per step (4 per micro-batch, 2 micro-batches): 4 steps are one epoch.
STEPS = ["--max-steps", "4", "--batch-size", "4", "--max-length", "16", "--seed", "3"]
SMALL = ["--num-loras", "4", "--top-k", "2", "--rank", "4", "--warmup-steps", "1"]


def word_records(count: int, seed: int) -> list[dict]:
    """Prompt/completion records over the word tokenizer's vocabulary (words w3..w63)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, 64, (count, 8), generator=g).tolist()
    return [
        {"prompt": " ".join(f"w{i}" for i in w[:4]), "completion": " ".join(f"w{i}" for i in w[4:])}
        for w in words
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parallel")
    base = make_tiny_base(root / "base")
    save_word_tokenizer(base, 64)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in word_records(32, seed=0)))
    return {"root": root, "args": ["--base-model", str(base), "--data", str(data), *STEPS, *SMALL]}


def torchrun(args: list[str], processes: int = 2) -> None:
    """`torchrun --nproc-per-node N -m remix_infer.train.cli train ...`, one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(processes), "-m", "remix_infer.train.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def one_process(args: list[str]) -> None:
    """The CLI in this process, on one thread like each torchrun process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *args]) == 0
    finally:
        torch.set_num_threads(threads)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_processes(setup) -> Path:
    out = setup["root"] / "two"
    torchrun([*setup["args"], "--out", str(out)])
    return out


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(setup, two_processes):
    """2 processes x 4 sequences x 1 accumulation against 1 x 4 x 2: each micro-batch holds the
    same rows and draws the same selections (seeded by seed, step, shard), so the runs compute
    the same float32 operations on the same operands, on one thread each, save for how the two
    micro-batches' gradients are summed: one process adds shard 1's into shard 0's, gloo sums
    the ranks' buffers. Two addends commute exactly and the halvings (1/grad_accum, DDP's
    1/world_size) are exact, so the runs are expected to agree to the bit; the tolerance
    admits one rounding of that sum per step (2**-24 relative, over 4 AdamW steps whose
    updates are normalised, so at most a few ulps of each parameter)."""
    one = setup["root"] / "one"
    one_process([*setup["args"], "--grad-accum", "2", "--out", str(one)])
    torch.testing.assert_close(losses(two_processes), losses(one), rtol=1e-6, atol=0)
    got, want = load_checkpoint(two_processes).tensors, load_checkpoint(one).tensors
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_two_processes_stopped_and_resumed_equal_an_uninterrupted_run(setup, two_processes):
    out = setup["root"] / "resumed"
    torchrun([*setup["args"], "--out", str(out), "--stop-at-step", "2"])
    assert len(losses(out)) == 2
    torchrun([*setup["args"], "--out", str(out), "--resume"])
    assert losses(out) == losses(two_processes)
    got, want = load_checkpoint(out).tensors, load_checkpoint(two_processes).tensors
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_resume_refuses_another_global_batch(setup, two_processes, capsys):
    """Saved with 2 shards of 4 per step; one process with no accumulation has 1."""
    assert main(["train", *setup["args"], "--out", str(two_processes), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "saved with 2 micro-batches of 4 per step" in err and "this run has 1 (1 x 1)" in err


@pytest.mark.slow
def test_fsdp_over_two_processes_trains_the_ddp_model_and_saves_a_loadable_checkpoint(
    setup, two_processes
):
    """--fsdp shards the base and the adapters over the 2 processes (FSDP2 fully_shard, gloo).
    Its gradients are the same two addends, reduce-scattered instead of all-reduced, so it
    trains the DDP run's model (the tolerance as above), and rank 0 writes a checkpoint that
    the engine serves with the reference model's greedy tokens."""
    out = setup["root"] / "fsdp"
    torchrun([*setup["args"], "--out", str(out), "--fsdp"])
    torch.testing.assert_close(losses(out), losses(two_processes), rtol=1e-6, atol=0)
    ckpt = load_checkpoint(out)
    want = load_checkpoint(two_processes).tensors
    for name in want:
        torch.testing.assert_close(ckpt.tensors[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    model, _ = load_remix_model(ckpt)
    assert len(remix_modules(model)) == 2 * 7
    prompts = [[5, 9, 12], [40, 3, 3, 17, 8], [22], [60, 61, 7, 30, 11, 4, 19]]
    with remix_llm(out, in_process=False) as llm:  # its own process: one engine per process
        served = [list(o.outputs[0].token_ids) for o in greedy(llm, prompts, max_tokens=6)]
    assert served == [reference_run(model, p, max_tokens=6).tokens for p in prompts]


def test_fsdp_needs_several_processes(setup, capsys):
    out = setup["root"] / "fsdp-one"
    assert main(["train", *setup["args"], "--out", str(out), "--fsdp"]) == 2
    assert (
        "--fsdp shards over several processes: start them with torchrun" in capsys.readouterr().err
    )
