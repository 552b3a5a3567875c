"""Several checkpoints over one base model in one vLLM engine (checkpoint slots), requests of
each and of the base model interleaved in one batch: each answer is its own reference model's.

One engine per mode (eager in process; compiled in its own process), shared by this module.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from helpers.engines import make_parity_checkpoint, remix_llm
from reference import plain_greedy, reference_run

from remix_infer.checkpoint import load_checkpoint
from remix_infer.modeling import load_remix_model
from remix_infer.ops import StatsRow
from remix_infer.vllm_plugin.engine import (
    BASE_MODEL_SLOT,
    CHECKPOINT_SLOT_KEY,
    check_slot_compatible,
    remix_engine_kwargs,
)

MAX_TOKENS = 6
SLOTS = 3  # a and b at start, one empty slot


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """a (router bias), b (lower rank, no router bias: zero-padded in a's slots), c (loaded
    while serving), all over a's base model, always-on LoRAs beside every pool."""
    root = tmp_path_factory.mktemp("multi")
    a = make_parity_checkpoint(root / "a", seed=0, always_on_rank=2, router_bias=True)
    base = a / "base"
    b = make_parity_checkpoint(root / "b", seed=7, base=base, always_on_rank=2, rank=2)
    c = make_parity_checkpoint(root / "c", seed=9, base=base, always_on_rank=2, router_bias=True)
    return {"a": a, "b": b, "c": c}


def prompts_of(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 64) for _ in range(rng.choice([1, 4, 9, 17]))] for _ in range(count)]


# The batch: (checkpoint name or None for the base model, prompt), interleaved.
BATCH = list(zip(["a", "b", None, "b", "a", None, "a", "b"], prompts_of(8, seed=1), strict=True))


@pytest.fixture(scope="module")
def expected(checkpoints):
    """Per checkpoint name (and None: the base model), the reference's run of every prompt."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in checkpoints.items():
        model, _ = load_remix_model(path)
        out[name] = {tuple(p): reference_run(model, p, MAX_TOKENS) for _, p in BATCH}
    base = AutoModelForCausalLM.from_pretrained(checkpoints["a"] / "base", dtype=torch.float32)
    out[None] = {tuple(p): plain_greedy(base, p, MAX_TOKENS) for _, p in BATCH}
    return out


def generate(llm, batch, slot_of: dict, max_tokens: int = MAX_TOKENS):
    """One generate() call: each request tagged with its slot (and a cache salt per model)."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=True,
            extra_args={CHECKPOINT_SLOT_KEY: slot_of[name]},
        )
        for name, _ in batch
    ]
    prompts = [{"prompt_token_ids": p, "cache_salt": f"salt-{name}"} for name, p in batch]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_answers(answers, batch, expected, model_of: dict) -> None:
    """model_of: the reference that each batch name must match (None: the base model)."""
    for i, ((name, prompt), got) in enumerate(zip(batch, answers, strict=True)):
        want = expected[model_of[name]][tuple(prompt)]
        want = want if isinstance(want, list) else want.tokens
        assert got == want, f"request {i} ({name} as {model_of[name]}): tokens differ"


SLOT_OF = {"a": 0, "b": 1, "c": 2, None: BASE_MODEL_SLOT}
AS_IS = {"a": "a", "b": "b", "c": "c", None: None}


@pytest.fixture(scope="module")
def llm(checkpoints):
    with remix_llm({"a": checkpoints["a"], "b": checkpoints["b"]}, max_checkpoints=SLOTS) as e:
        yield e


def test_interleaved_batch_matches_each_reference(llm, expected):
    """Greedy tokens, per-token top-k of the prompts and routing statistics per slot."""
    distinct = [
        len(
            {
                tuple(expected[m][tuple(p)] if m is None else expected[m][tuple(p)].tokens)
                for m in ("a", "b", None)
            }
        )
        for _, p in BATCH
    ]
    assert sum(distinct) >= 2.5 * len(BATCH)  # the three models answer differently: a mixup shows
    llm.collective_rpc("remix_reset_routing_stats")
    llm.collective_rpc("remix_capture_selections", args=(True,))
    answers = generate(llm, BATCH, SLOT_OF, max_tokens=1)
    captured = llm.collective_rpc("remix_captured_selections")[0]
    llm.collective_rpc("remix_capture_selections", args=(False,))
    stats = llm.collective_rpc("remix_routing_stats")[0]
    assert len(answers) == len(BATCH)
    lengths = [len(p) for _, p in BATCH]
    for module, rows in captured.items():
        per_prompt = torch.tensor(rows).split(lengths)
        for (name, prompt), chosen in zip(BATCH, per_prompt, strict=True):
            if name is None:
                assert (chosen == -1).all(), module  # base-model tokens route nowhere
            else:
                want = expected[name][tuple(prompt)].selections[module]
                assert torch.equal(chosen, want), f"{name} {module}: top-k differs"
    for slot, name in enumerate(["a", "b", None]):
        tokens = sum(len(p) for n, p in BATCH if n == name) if name else 0
        assert len(stats[slot]) == 14  # every module of the two layers
        assert all(StatsRow.parse(row).tokens == tokens for row in stats[slot].values()), slot
    assert_answers(generate(llm, BATCH, SLOT_OF), BATCH, expected, AS_IS)


def test_load_unload_and_reload_while_serving(llm, checkpoints, expected):
    """Load c into the empty slot, empty b's slot (its requests get the base model), load b
    again, staged as the server does (read beside the steps, then copied in): the answers
    follow, and the other checkpoint's never change."""
    batch = BATCH + [("c", p) for _, p in BATCH[:3]]
    llm.collective_rpc("remix_load_checkpoint", args=(2, str(checkpoints["c"])))
    assert_answers(generate(llm, batch, SLOT_OF), batch, expected, AS_IS)
    llm.collective_rpc("remix_unload_checkpoint", args=(1,))
    assert llm.collective_rpc("remix_checkpoint_slots")[0][1] is None
    unloaded = {**AS_IS, "b": None}
    assert_answers(generate(llm, batch, SLOT_OF), batch, expected, unloaded)
    assert not any(
        StatsRow.parse(r).tokens for r in llm.collective_rpc("remix_routing_stats")[0][1].values()
    )
    llm.collective_rpc("remix_stage_checkpoint", args=(1, str(checkpoints["b"])))
    assert_answers(generate(llm, batch, SLOT_OF), batch, expected, unloaded)  # not in yet
    while not all(llm.collective_rpc("remix_staged_checkpoint", args=(1,))):
        time.sleep(0.01)
    llm.collective_rpc("remix_load_checkpoint", args=(1, str(checkpoints["b"])))
    assert_answers(generate(llm, batch, SLOT_OF), batch, expected, AS_IS)
    llm.collective_rpc("remix_unload_checkpoint", args=(2,))


def load_staged(llm, slot: int, path, host_key: str | None = None, drop=()) -> float:
    """Load as the server does (server/engine_client.py load_slot): stage, then ask until the
    workers have read it, the asking RPC loading it; the read's seconds."""
    [seconds] = llm.collective_rpc("remix_stage_checkpoint", args=(slot, str(path), host_key, drop))
    while seconds is None:
        time.sleep(0.01)
        [seconds] = llm.collective_rpc("remix_load_staged_checkpoint", args=(slot,))
    return seconds


def test_a_slot_loaded_again_without_unloading(llm, checkpoints, expected):
    """The server's miss: a checkpoint loaded over the one in the slot (no unload first), from
    disk, then from the host tier by the stage RPC alone, dropping another copy. Each starts
    with zero routing statistics and gives its own answers; b is back in slot 1 at the end."""

    def slot_tokens(slot: int) -> set[int]:
        rows = llm.collective_rpc("remix_routing_stats")[0][slot].values()
        return {StatsRow.parse(row).tokens for row in rows}

    as_c = {**AS_IS, "b": "c"}
    generate(llm, BATCH, SLOT_OF)
    assert slot_tokens(1) != {0}  # b's
    assert load_staged(llm, 1, checkpoints["c"], "c") > 0  # read from disk, kept as "c"
    assert slot_tokens(1) == {0}
    assert_answers(generate(llm, BATCH, SLOT_OF), BATCH, expected, as_c)
    assert load_staged(llm, 1, checkpoints["b"], "b") > 0
    assert_answers(generate(llm, BATCH, SLOT_OF), BATCH, expected, AS_IS)
    assert slot_tokens(1) != {0}
    stage = (1, str(checkpoints["c"]), "c", ["b"])
    assert llm.collective_rpc("remix_stage_checkpoint", args=stage) == [0.0]  # loaded
    assert slot_tokens(1) == {0}
    assert llm.collective_rpc("remix_host_checkpoints") == [["c"]]
    assert_answers(generate(llm, BATCH, SLOT_OF), BATCH, expected, as_c)
    load_staged(llm, 1, checkpoints["b"], drop=["c"])
    assert llm.collective_rpc("remix_host_checkpoints") == [[]]
    assert_answers(generate(llm, BATCH, SLOT_OF), BATCH, expected, AS_IS)


def test_refusals(llm, checkpoints, tmp_path):
    """Another base model, another geometry, a slot out of range, a bad path: a clear message
    naming the checkpoint and the field, host-side and in the worker; nothing changes."""
    other_base = make_parity_checkpoint(tmp_path / "other", seed=3)
    wider = make_parity_checkpoint(
        tmp_path / "wider", seed=4, base=checkpoints["a"] / "base", always_on_rank=2, num_loras=6
    )
    template = load_checkpoint(checkpoints["a"])
    cases = [
        (other_base, "field 'base_model'"),
        (wider, "field 'num_loras' is 6"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            check_slot_compatible(template, load_checkpoint(path))
        assert str(path) in str(error.value)
        with pytest.raises(Exception, match=message):
            llm.collective_rpc("remix_load_checkpoint", args=(2, str(path)))
        llm.collective_rpc("remix_stage_checkpoint", args=(2, str(path)))  # the read's error
        with pytest.raises(Exception, match=message):
            llm.collective_rpc("remix_load_checkpoint", args=(2, str(path)))
    with pytest.raises(ValueError, match="field 'rank' is 4"):
        check_slot_compatible(load_checkpoint(checkpoints["b"]), template)
    with pytest.raises(Exception, match="slot 3 is out of range"):
        llm.collective_rpc("remix_load_checkpoint", args=(3, str(checkpoints["c"])))
    with pytest.raises(Exception, match="not found"):
        llm.collective_rpc("remix_load_checkpoint", args=(2, str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="max_checkpoints is 1, fewer than the 2 given"):
        remix_engine_kwargs({"a": checkpoints["a"], "b": checkpoints["b"]}, max_checkpoints=1)
    with pytest.raises(ValueError, match="field 'base_model'"):
        remix_engine_kwargs({"a": checkpoints["a"], "x": other_base})
    assert llm.collective_rpc("remix_checkpoint_slots")[0][2] is None


def test_compiled_mode_interleaved_and_loaded_while_serving(checkpoints, expected):
    """vLLM's compiled mode: the same answers, and a checkpoint loaded after the graphs were
    compiled is what its requests get (the graphs read the rewritten weights in place)."""
    batch = BATCH + [("c", p) for _, p in BATCH[:3]]
    ab = {"a": checkpoints["a"], "b": checkpoints["b"]}
    with remix_llm(ab, in_process=False, enforce_eager=False, max_checkpoints=SLOTS) as engine:
        before = generate(engine, BATCH, SLOT_OF)
        engine.collective_rpc("remix_load_checkpoint", args=(2, str(checkpoints["c"])))
        after = generate(engine, batch, SLOT_OF)
    assert_answers(before, BATCH, expected, AS_IS)
    assert_answers(after, batch, expected, AS_IS)


@pytest.mark.parametrize("layout", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_two_ranks_interleaved_and_loaded_while_serving(layout, checkpoints, expected):
    """TP=2 or PP=2 (mp backend, gloo on CPU): row-parallel shards sum each slot's partial
    products, and each pipeline stage routes its own layers by the same token slots, so the
    interleaved batch, and a checkpoint loaded into both ranks while serving, give each request
    its own reference's greedy tokens."""
    batch = BATCH + [("c", p) for _, p in BATCH[:3]]
    ab = {"a": checkpoints["a"], "b": checkpoints["b"]}
    two = {layout: 2, "distributed_executor_backend": "mp"}
    with remix_llm(
        ab, in_process=False, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, max_checkpoints=SLOTS, **two
    ) as engine:
        before = generate(engine, BATCH, SLOT_OF)
        engine.collective_rpc("remix_load_checkpoint", args=(2, str(checkpoints["c"])))
        after = generate(engine, batch, SLOT_OF)
        ranks = engine.collective_rpc("remix_routing_stats")
    assert_answers(before, BATCH, expected, AS_IS)
    assert_answers(after, batch, expected, AS_IS)
    assert len(ranks) == 2
    if layout == "tensor_parallel_size":  # routing is replicated, not split
        assert ranks[0] == ranks[1]
