"""Parity of the vLLM serving layer with the reference PyTorch model (the definition of correct).

One engine per configuration (eager TP=1, TP=2, compiled), shared by the tests of this module.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from helpers.engines import captured_prefill_selections, greedy, make_parity_checkpoint, remix_llm
from reference import plain_greedy, reference_run

from remix_infer.config import split_module_path
from remix_infer.modeling import load_remix_model, remix_modules
from remix_infer.ops import StatsRow

MAX_TOKENS = 8
LOGPROB_TOL = 1e-4  # float32 engine vs float32 reference, log-probabilities


def mixed_prompts(count: int = 10, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 7, 12, 20, 33, 5, 48, 2, 64][:count]
    return [[rng.randrange(3, 64) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """With an always-on LoRA on q, v and o only (MoR-LoRA's attention LoRA; k_proj, merged
    into qkv_proj with them, gets zero rows, and the MLP pools none); the shared-scope test has
    one on every module, the other families' test none."""
    return make_parity_checkpoint(
        tmp_path_factory.mktemp("parity") / "ckpt",
        always_on_rank=3,
        always_on_modules=["q_proj", "v_proj", "o_proj"],
    )


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, _ = load_remix_model(checkpoint)
    return model


@pytest.fixture(scope="module")
def reference_runs(reference):
    return [reference_run(reference, p, MAX_TOKENS) for p in mixed_prompts()]


@pytest.fixture(scope="module")
def llm(checkpoint):
    with remix_llm(checkpoint) as engine:
        yield engine


def assert_parity(outputs, selections, runs, prompts) -> None:
    """Engine outputs/selections vs reference runs: tokens, per-token top-k, prompt logprobs."""
    for i, (out, sel, ref, prompt) in enumerate(
        zip(outputs, selections, runs, prompts, strict=True)
    ):
        assert list(out.outputs[0].token_ids) == ref.tokens, f"prompt {i}: greedy tokens differ"
        assert set(sel) == set(ref.selections)
        for module, chosen in sel.items():
            assert torch.equal(chosen, ref.selections[module]), (
                f"prompt {i} {module}: top-k differs"
            )
        if out.prompt_logprobs is not None and len(prompt) > 1:
            got = torch.tensor(
                [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], prompt[1:], strict=True)],
                dtype=torch.float64,
            )
            torch.testing.assert_close(got, ref.prompt_logprobs, atol=LOGPROB_TOL, rtol=0)


def test_parity_batch_with_reference(llm, reference_runs):
    prompts = mixed_prompts()
    outputs = greedy(llm, prompts, MAX_TOKENS, prompt_logprobs=True)
    selections = captured_prefill_selections(llm, prompts)
    assert_parity(outputs, selections, reference_runs, prompts)


def test_parity_batch_invariance(llm):
    """A prompt's routing and output do not depend on its batch neighbours."""
    prompts = mixed_prompts()
    target = prompts[5]
    alone_out = greedy(llm, [target], MAX_TOKENS)[0].outputs[0].token_ids
    alone_sel = captured_prefill_selections(llm, [target])[0]
    for seed in (1, 2):
        batch = mixed_prompts(seed=seed)
        batch.insert(seed, target)
        out = greedy(llm, batch, MAX_TOKENS)[seed].outputs[0].token_ids
        sel = captured_prefill_selections(llm, batch)[seed]
        assert out == alone_out
        for module, chosen in sel.items():
            assert torch.equal(chosen, alone_sel[module]), module


def test_parity_check_catches_a_corrupted_pool(llm, checkpoint, reference_runs):
    """Negating one LoRA's B in one module must make the parity check fail."""
    prompts = mixed_prompts()
    outputs = greedy(llm, prompts, MAX_TOKENS, prompt_logprobs=True)
    selections = captured_prefill_selections(llm, prompts)
    corrupted, _ = load_remix_model(checkpoint)
    module_name = "model.layers.0.self_attn.o_proj"
    module = remix_modules(corrupted)[module_name]
    used = torch.bincount(
        torch.cat([s[module_name].flatten() for s in selections]), minlength=module.num_loras
    )
    with torch.no_grad():
        module.lora_b[int(used.argmax())].neg_()
    runs = [reference_run(corrupted, p, MAX_TOKENS) for p in prompts]
    with pytest.raises(AssertionError):
        assert_parity(outputs, selections, runs, prompts)
    assert_parity(outputs, selections, reference_runs, prompts)  # and the real one still passes


def test_base_model_requests_beside_the_checkpoint(llm, checkpoint, reference_runs):
    """One checkpoint slot: requests for the base model (BASE_MODEL_SLOT) in the same batch get
    the plain base model's greedy tokens and are not counted in the routing statistics; the
    others keep their reference answers."""
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from remix_infer.vllm_plugin.engine import BASE_MODEL_SLOT, CHECKPOINT_SLOT_KEY

    prompts = mixed_prompts()[:6]
    slots = [0, BASE_MODEL_SLOT, None, BASE_MODEL_SLOT, 0, BASE_MODEL_SLOT]  # None: no key
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=MAX_TOKENS,
            ignore_eos=True,
            extra_args=None if slot is None else {CHECKPOINT_SLOT_KEY: slot},
        )
        for slot in slots
    ]
    llm.collective_rpc("remix_reset_routing_stats")
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.collective_rpc("remix_routing_stats")[0][0]
    base = AutoModelForCausalLM.from_pretrained(checkpoint / "base", dtype=torch.float32)
    for i, (prompt, slot, out) in enumerate(zip(prompts, slots, outputs, strict=True)):
        if slot == BASE_MODEL_SLOT:
            want = plain_greedy(base, prompt, MAX_TOKENS)
            assert want != reference_runs[i].tokens  # the adapter matters for this prompt
        else:
            want = reference_runs[i].tokens
        assert list(out.outputs[0].token_ids) == want, f"prompt {i} (slot {slot})"
    adapted = sum(
        len(p) + MAX_TOKENS - 1 for p, s in zip(prompts, slots, strict=True) if s != BASE_MODEL_SLOT
    )
    assert all(StatsRow.parse(row).tokens == adapted for row in stats.values())


def test_routing_stats_count_real_tokens(llm):
    llm.collective_rpc("remix_reset_routing_stats")
    prompts = mixed_prompts()
    greedy(llm, prompts, max_tokens=4)
    stats = llm.collective_rpc("remix_routing_stats")[0][0]  # worker 0, checkpoint slot 0
    # every prompt token and every generated token but the last goes through the model once
    tokens = sum(map(len, prompts)) + len(prompts) * 3
    n, k = 4, 2
    for module, raw in stats.items():
        row = StatsRow.parse(raw)
        assert row.tokens == tokens, module
        assert sum(row.selections) == tokens * k, module
        assert row.ess_sum == pytest.approx(tokens * k)  # constant weights: ESS is exactly k
        assert 0 < row.entropy_sum / tokens <= torch.log(torch.tensor(float(n))) + 1e-6


def assert_request_routing(engine, runs, prompts) -> None:
    """Requests that ask (extra_args key) get the selections of exactly their own tokens: every
    prompt token and every generated token but the last, summed over requests sharing a key."""
    from vllm import SamplingParams

    from remix_infer.vllm_plugin.worker import ROUTING_KEY
    from server.engine_client import merge_request_routing

    def take(key: str) -> dict | None:  # every worker's part: pipeline stages hold their layers
        return merge_request_routing(
            [engine.collective_rpc("remix_take_request_routing", args=(key,))]
        )

    engine.collective_rpc("remix_track_request_routing")
    keys = ["a", None, "a", "b"]  # "a" spans two requests; the unkeyed one is not tracked
    prompts, runs = prompts[: len(keys)], runs[: len(keys)]
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=MAX_TOKENS,
            ignore_eos=True,
            extra_args={ROUTING_KEY: key} if key else None,
        )
        for key in keys
    ]
    engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    n = 4
    for key in ("a", "b"):
        summary = take(key)
        mine = [i for i, k in enumerate(keys) if k == key]
        lengths = [len(prompts[i]) + MAX_TOKENS - 1 for i in mine]
        assert summary["tokens"] == sum(lengths)
        assert set(summary["modules"]) == set(runs[0].sequence_selections)
        for module, counts in summary["modules"].items():
            expected = sum(
                torch.bincount(runs[i].sequence_selections[module][:length].flatten(), minlength=n)
                for i, length in zip(mine, lengths, strict=True)
            )
            assert counts == expected.tolist(), (key, module)
        assert take(key) is None
    assert take("nobody") is None


def test_request_routing_summary_matches_reference(llm, reference_runs):
    assert_request_routing(llm, reference_runs[3:], mixed_prompts()[3:])


def test_parity_tensor_parallel_2(checkpoint, reference_runs):
    """TP=2 (gloo on CPU): same greedy tokens, top-k choices and logprobs as the reference."""
    prompts = mixed_prompts()
    tp2 = dict(tensor_parallel_size=2, distributed_executor_backend="mp")
    with remix_llm(
        checkpoint, in_process=False, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, **tp2
    ) as engine:
        outputs = greedy(engine, prompts, MAX_TOKENS, prompt_logprobs=True)
        selections = captured_prefill_selections(engine, prompts)
        ranks = engine.collective_rpc("remix_routing_stats")
        assert_request_routing(engine, reference_runs[3:], prompts[3:])
    assert_parity(outputs, selections, reference_runs, prompts)
    assert len(ranks) == 2 and ranks[0] == ranks[1]  # routing is replicated, not split


def test_parity_compiled_mode(checkpoint, reference_runs):
    """vLLM's default compiled mode (torch.compile, inductor): same tokens and logprobs, and the
    routing counters (a custom op inside the compiled graph) still count every token and give
    each request its own selections."""
    prompts = mixed_prompts()
    with remix_llm(checkpoint, in_process=False, enforce_eager=False) as engine:
        engine.collective_rpc("remix_reset_routing_stats")  # start-up warm-up ran dummy tokens
        outputs = greedy(engine, prompts, MAX_TOKENS, prompt_logprobs=True)
        stats = engine.collective_rpc("remix_routing_stats")[0][0]
        assert_request_routing(engine, reference_runs[3:], prompts[3:])
    no_selections = [{} for _ in prompts]
    runs = [dataclasses.replace(r, selections={}) for r in reference_runs]
    assert_parity(outputs, no_selections, runs, prompts)
    tokens = sum(map(len, prompts)) + len(prompts) * (MAX_TOKENS - 1)
    assert all(StatsRow.parse(row).tokens == tokens for row in stats.values())


def test_parity_pipeline_parallel_2(checkpoint, reference_runs):
    """PP=2 (mp backend, gloo on CPU, eager): stage 0 holds layer 0, stage 1 layer 1; together
    the same greedy tokens, top-k choices and logprobs as the reference, routing counters that
    count every token in every layer, and per-request summaries over both stages' layers."""
    from server.engine_client import merge_routing_stats

    prompts = mixed_prompts()
    pp2 = dict(pipeline_parallel_size=2, distributed_executor_backend="mp")
    with remix_llm(
        checkpoint, in_process=False, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, **pp2
    ) as engine:
        outputs = greedy(engine, prompts, MAX_TOKENS, prompt_logprobs=True)
        selections = captured_prefill_selections(engine, prompts)
        engine.collective_rpc("remix_reset_routing_stats")
        greedy(engine, prompts, max_tokens=4)
        stages = [slots[0] for slots in engine.collective_rpc("remix_routing_stats")]
        assert_request_routing(engine, reference_runs[3:], prompts[3:])
    assert_parity(outputs, selections, reference_runs, prompts)
    layers = [{split_module_path(m)[0] for m in stage} for stage in stages]
    assert layers == [{0}, {1}]  # each stage holds (and reports) its own layer's pools
    merged = merge_routing_stats([stages])
    assert set(merged) == set(reference_runs[0].selections)
    tokens = sum(map(len, prompts)) + len(prompts) * 3
    assert all(StatsRow.parse(row).tokens == tokens for row in merged.values())


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_parity_other_families(family, tmp_path):
    """Mistral and Qwen2 (q/k/v biases) through their own vLLM classes, with a router bias."""
    ckpt = make_parity_checkpoint(tmp_path / family, seed=3, model_type=family, router_bias=True)
    model, _ = load_remix_model(ckpt)
    prompts = mixed_prompts(6, seed=4)
    runs = [reference_run(model, p, MAX_TOKENS) for p in prompts]
    with remix_llm(ckpt, in_process=False) as engine:
        outputs = greedy(engine, prompts, MAX_TOKENS, prompt_logprobs=True)
        selections = captured_prefill_selections(engine, prompts)
    assert_parity(outputs, selections, runs, prompts)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_parity_shared_routing_scope(eager, tmp_path):
    """The shared routing scope (one router per token from the first layer's input, its choice
    in every module), with a router bias and an always-on LoRA: eager with the per-token
    selections, and vLLM's compiled mode (the router's logits cross the graph's pieces)."""
    ckpt = make_parity_checkpoint(
        tmp_path / "shared", seed=5, routing_scope="shared", router_bias=True, always_on_rank=2
    )
    model, _ = load_remix_model(ckpt)
    prompts = mixed_prompts(6, seed=6)
    runs = [reference_run(model, p, MAX_TOKENS) for p in prompts]
    first = next(iter(runs[1].selections.values()))
    assert all(torch.equal(s, first) for s in runs[1].selections.values())  # one decision
    with remix_llm(ckpt, in_process=False, enforce_eager=eager) as engine:
        outputs = greedy(engine, prompts, MAX_TOKENS, prompt_logprobs=True)
        selections = (
            captured_prefill_selections(engine, prompts) if eager else [{} for _ in prompts]
        )
    if not eager:
        runs = [dataclasses.replace(r, selections={}) for r in runs]
    assert_parity(outputs, selections, runs, prompts)
