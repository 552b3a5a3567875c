"""The HTTP server end to end: one real `remix-serve` process (vLLM engine, quick demo
checkpoint) for the module, driven with the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers.fuzz import fuzz_no_5xx
from helpers.servers import ROOT, SMALL_ENGINE, running_server, scrape, server_env

pytestmark = pytest.mark.slow

API_KEY = "test-key"
MODEL = "remix-test"
MAX_MODEL_LEN = 128
MAX_QUEUE = 24


@pytest.fixture(scope="module")
def server(demo_checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server-log") / "server.log"
    args = [
        "--api-key",
        API_KEY,
        "--served-model-name",
        MODEL,
        *SMALL_ENGINE,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-queue",
        str(MAX_QUEUE),
        "--max-n",
        "4",
        "--max-body-mib",
        "1",
    ]
    with running_server(demo_checkpoint, log_path, args) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def prompts(demo_checkpoint) -> list[str]:
    lines = (demo_checkpoint / "data" / "eval.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines]


def greedy(client, prompt, max_tokens=10, **extra):
    return client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )


def post(server, path, body, key=API_KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server["base"] + path, content=raw, headers=headers, timeout=30)
    return httpx.post(server["base"] + path, json=body, headers=headers, timeout=30)


def assert_openai_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert "Traceback" not in resp.text
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# ---------------------------------------------------------------------------------------------


def test_health_and_readiness(server):
    # While the engine loaded, liveness answered 200 and readiness 503.
    assert (200, 503) in server["seen"]
    assert httpx.get(server["base"] + "/health").status_code == 200
    ready = httpx.get(server["base"] + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server["base"] + "/v1/models").status_code == 401  # key required


def test_completion_and_usage(client):
    ids = [5, 6, 7, 8, 9, 10]
    r = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.model == MODEL
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == len(ids) + 7


def test_streaming_matches_non_streaming(client, prompts):
    full = greedy(client, prompts[0], max_tokens=12)
    stream = client.completions.create(
        model=MODEL,
        prompt=prompts[0],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(chunks) > 3
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "add 1 2 =", "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST",
        server["base"] + "/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_n_and_prompt_lists(client, prompts):
    r = client.completions.create(
        model=MODEL, prompt=prompts[:2], n=3, max_tokens=5, temperature=1.0, seed=1
    )
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert 6 <= r.usage.completion_tokens <= 30
    # a list of prompts: one greedy choice each, equal to that prompt's solo output
    g = greedy(client, prompts[:3], max_tokens=6)
    assert [c.index for c in g.choices] == [0, 1, 2] and g.usage.completion_tokens == 18
    for i in range(3):
        assert g.choices[i].text == greedy(client, prompts[i], max_tokens=6).choices[0].text
    # the same seed gives the same samples
    again = client.completions.create(
        model=MODEL, prompt=prompts[:2], n=3, max_tokens=5, temperature=1.0, seed=1
    )
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    # n > 1 at temperature 0: n copies of the greedy answer, as OpenAI returns them
    copies = greedy(client, prompts[:2], max_tokens=6, n=3)
    assert [c.index for c in copies.choices] == list(range(6))
    assert [c.text for c in copies.choices] == [g.choices[0].text] * 3 + [g.choices[1].text] * 3
    assert copies.usage.completion_tokens == 36


def test_logprobs(client, prompts):
    r = greedy(client, prompts[1], max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    # tokens decode one by one: special tokens show, a multi-byte character's parts do not join
    if "\ufffd" not in r.choices[0].text:
        assert "".join(t for t in lp.tokens if t != "</s>") == r.choices[0].text
    assert all(x <= 0 for x in lp.token_logprobs)
    for top, x in zip(lp.top_logprobs, lp.token_logprobs, strict=True):
        assert 1 <= len(top) <= 3
        assert all(v <= x + 1e-5 for v in top.values())  # greedy picks the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_stop(client, prompts):
    text = greedy(client, prompts[2], max_tokens=12).choices[0].text
    stop = text[len(text) // 2 :][:2]
    r = client.completions.create(
        model=MODEL, prompt=prompts[2], max_tokens=12, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_echo(client, prompts):
    plain = greedy(client, prompts[3], max_tokens=5).choices[0].text
    r = greedy(client, prompts[3], max_tokens=5, echo=True, logprobs=1)
    assert r.choices[0].text == prompts[3] + plain
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens).startswith(prompts[3])
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])


def test_chat(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "add 2 3 ="}],
        max_tokens=6,
        temperature=0,
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)  # the tiny model may stop at once
    assert 1 <= r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0
    assert r.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "add 2 3 ="}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


def test_concurrent_requests_match_solo_greedy(server, client, prompts):
    chosen = prompts[4:24]
    solo = [greedy(client, p, max_tokens=8).choices[0].text for p in chosen]
    aclient = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0)

    async def one(p, stream):
        if not stream:
            r = await aclient.completions.create(
                model=MODEL, prompt=p, max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            return r.choices[0].text
        s = await aclient.completions.create(
            model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return "".join([c.choices[0].text async for c in s])

    async def all_of():
        try:
            return await asyncio.gather(*(one(p, i % 2 == 1) for i, p in enumerate(chosen)))
        finally:
            await aclient.close()

    assert asyncio.run(all_of()) == solo


def test_overload_gives_429_and_health_answers(server):
    body = {
        "model": MODEL,
        "prompt": "sort 31 =",
        "max_tokens": 100,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def run():
        async with httpx.AsyncClient(base_url=server["base"], timeout=60) as c:

            async def one():
                async with c.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                    if r.status_code != 200:
                        await r.aread()
                        return r.status_code, r.headers.get("retry-after"), r.json()
                    async for _ in r.aiter_lines():
                        pass
                    return 200, None, None

            tasks = [asyncio.create_task(one()) for _ in range(MAX_QUEUE + 8)]
            await asyncio.sleep(0.3)
            health = (await c.get("/health")).status_code
            return health, await asyncio.gather(*tasks)

    health, results = asyncio.run(run())
    assert health == 200
    refused = [r for r in results if r[0] == 429]
    assert sum(r[0] == 200 for r in results) >= MAX_QUEUE - 2 and len(refused) >= 6
    for _, retry_after, err in refused:
        assert retry_after is not None and int(retry_after) >= 1
        assert err["error"]["type"] == "rate_limit_error"


def test_disconnect_mid_stream_aborts(server):
    body = {"model": MODEL, "prompt": "add 4 5 =", "max_tokens": 100, "ignore_eos": True}
    with httpx.stream(
        "POST",
        server["base"] + "/v1/completions",
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.time() + 10
    while True:
        state = httpx.get(server["base"] + "/ready").json()
        if state["requests_in_flight"] == 0 and state["engine_unfinished_requests"] == 0:
            break
        assert time.time() < deadline, state
        time.sleep(0.1)


def test_wrong_or_missing_api_key(server, client):
    bad = openai.OpenAI(base_url=server["base"] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=MODEL, prompt="add 1 1 =", max_tokens=2)
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"
    err = assert_openai_error(post(server, "/v1/completions", {"prompt": "x"}, key=None), 401)
    assert err["code"] == "invalid_api_key"


LONG = [3] * (MAX_MODEL_LEN + 5)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL, "prompt": "add 1 2 =", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": 12}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": "gpt-4", "prompt": "add 1 2 ="}, 404, "model"),
        ({"model": MODEL, "prompt": LONG}, 400, "prompt"),
        ({"model": MODEL, "prompt": "add 1 2 =", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "add 1 2 =", "max_tokens": 10_000}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "add 1 2 =", "n": 50}, 400, "n"),
        (
            {"model": MODEL, "prompt": "x", "remix": {"return_routing": "yes"}},
            400,
            "remix.return_routing",
        ),
        ({"model": MODEL, "prompt": "x", "stream": "true"}, 400, "stream"),
        ({"model": MODEL, "prompt": "x", "remix": {"routing": True}}, 400, "remix.routing"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt"),
        ({"model": MODEL, "prompt": []}, 400, "prompt"),
        ({"model": MODEL, "prompt": [[]]}, 400, "prompt"),
        ({"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
        ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias.5"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"five": 1}}, 400, "logit_bias"),
        ({"model": MODEL, "prompt": "x", "frobnicate": True}, 400, "frobnicate"),
        ({"model": MODEL, "prompt": "x", "logprobs": 99}, 400, "logprobs"),
        ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "messages": []}, 400, None),
    ],
)
def test_bad_completion_input(server, body, status, param):
    err = assert_openai_error(post(server, "/v1/completions", body), status, param)
    if status == 404:
        assert err["code"] == "model_not_found"


def test_bad_json_and_bad_chat(server):
    assert_openai_error(post(server, "/v1/completions", None, raw=b'{"prompt": "x",'), 400)
    # not text: a lone surrogate (the tokenizer cannot take it), bytes that are not UTF-8
    assert_openai_error(
        post(server, "/v1/completions", None, raw=b'{"prompt": "\\ud800"}'), 400, "prompt"
    )
    assert_openai_error(post(server, "/v1/completions", None, raw=b'{"prompt": "\xff"}'), 400)
    deep = b"[" * 100_000 + b"]" * 100_000  # past any JSON decoder's recursion limit
    assert_openai_error(post(server, "/v1/completions", None, raw=deep), 400)
    big = {"model": MODEL, "prompt": "x" * (2 << 20)}  # over --max-body-mib 1
    assert_openai_error(post(server, "/v1/completions", big), 413)
    assert_openai_error(post(server, "/v1/completions", None, raw=b"[1, 2]"), 400)
    assert_openai_error(post(server, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400)
    bad_role = {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}
    assert_openai_error(post(server, "/v1/chat/completions", bad_role), 400)
    assert_openai_error(post(server, "/v1/nothing-here", {}), 404)


@pytest.mark.parametrize("flag, named", [("--checkpoint", "remix_config.json"),
                                         ("--base-model", "config.json")])  # fmt: skip
def test_cli_refuses_bad_checkpoint(tmp_path, flag, named):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "remix_config.json").write_text('{"format_version": 1, "architecture": "llama"')
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", flag, str(bad), "--port", "1"],
        cwd=ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert named in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr


def test_base_model_server(demo_checkpoint, tmp_path):
    """--base-model: the same server over the plain base model (what bench-serve compares
    against). Its greedy answer is transformers' own; it has no routing to report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = demo_checkpoint / "base"
    args = ["--base-model", str(base), "--served-model-name", "base", *SMALL_ENGINE]
    with running_server(None, tmp_path / "base.log", [*args, "--max-model-len", "128"]) as srv:
        client = openai.OpenAI(base_url=srv["base"] + "/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="base", prompt="add 1 2 =", max_tokens=6, temperature=0)
        refused = post(srv, "/v1/completions", {"prompt": "x", "remix": {"return_routing": True}})
        samples = scrape(srv)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = tokenizer("add 1 2 =", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert r.choices[0].text == tokenizer.decode(out, skip_special_tokens=True)
    assert_openai_error(refused, 400, "remix.return_routing")
    requests = {"endpoint": "/v1/completions", "model": "base"}
    assert sample(samples, "remix_requests_total", **requests, status="200") == 1
    assert sample(samples, "remix_requests_total", **requests, status="400") == 1
    assert not any(name.startswith(("remix_lora", "remix_rout")) for name, _ in samples)


def sample(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_requests_tokens_and_routing(server, client, prompts):
    before = scrape(server)
    outs = [greedy(client, p, max_tokens=6) for p in prompts[:4]]
    bad = post(server, "/v1/completions", {"model": MODEL, "prompt": "", "max_tokens": 4})
    after = scrape(server)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    # `model`: the served name each request resolved to (kept for the one refused afterwards)
    endpoint = {"endpoint": "/v1/completions", "model": MODEL}
    assert delta("remix_requests_total", **endpoint, status="200") == 4
    assert delta("remix_requests_total", **endpoint, status=str(bad.status_code)) == 1
    assert delta("remix_prompt_tokens_total", model=MODEL) == sum(
        o.usage.prompt_tokens for o in outs
    )
    assert delta("remix_generation_tokens_total", model=MODEL) == sum(
        o.usage.completion_tokens for o in outs
    )
    assert delta("remix_request_duration_seconds_count", **endpoint) == 5
    assert delta("remix_time_to_first_token_seconds_count") == 4
    assert 0 <= sample(after, "remix_kv_cache_usage_ratio") <= 1
    # Routing: each module saw the tokens the model computed (prefix caching may skip some
    # prompt tokens), and every token selected exactly k LoRAs with ReMix's constant weights.
    n, k = 8, 2
    for where in (("0", "q_proj"), ("3", "down_proj")):
        module = {"checkpoint": MODEL, "layer": where[0], "module": where[1]}
        routed = delta("remix_routed_tokens_total", **module)
        assert (
            0 < routed <= sum(o.usage.prompt_tokens + o.usage.completion_tokens - 1 for o in outs)
        )
        selected = sum(
            delta("remix_lora_selections_total", lora=str(i), **module) for i in range(n)
        )
        assert selected == k * routed
        assert sample(after, "remix_routing_weight_ess", **module) == pytest.approx(k)
        assert 1 <= sample(after, "remix_routing_effective_loras", **module) <= n
        assert 0 < sample(after, "remix_router_entropy_nats", **module) <= math.log(n) + 1e-9
    assert ("remix_routing_collapsed_modules", (("checkpoint", MODEL),)) in after


def test_request_routing_summary(server, client, prompts):
    """remix.return_routing adds the request's own selections per layer and module; they are
    what the engine counted for it (the /metrics counters move by exactly as much)."""
    n, k, layers = 8, 2, 4
    plain = greedy(client, prompts[-1], max_tokens=6)
    assert "remix" not in plain.model_dump()  # clients that do not ask see plain OpenAI bodies
    before = scrape(server)
    r = greedy(client, prompts[-1], max_tokens=6, remix={"return_routing": True})
    after = scrape(server)
    assert r.choices[0].text == plain.choices[0].text
    routing = r.model_extra["remix"]["routing"]
    assert (routing["num_loras"], routing["top_k"], len(routing["layers"])) == (n, k, layers)
    assert 0 < routing["tokens"] <= r.usage.prompt_tokens + r.usage.completion_tokens - 1
    for index, modules in enumerate(routing["layers"]):
        assert set(modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                "up_proj", "down_proj"}  # fmt: skip
        for module, counts in modules.items():
            assert len(counts) == n and sum(counts) == k * routing["tokens"]
            labels = {"checkpoint": MODEL, "layer": str(index), "module": module}
            moved = [
                sample(after, "remix_lora_selections_total", lora=str(i), **labels)
                - sample(before, "remix_lora_selections_total", lora=str(i), **labels)
                for i in range(n)
            ]
            assert counts == moved, (index, module)
    # streamed: the summary comes in the last chunk, with usage; chat has it too
    events = list(
        client.completions.create(
            model=MODEL, prompt=prompts[-1], max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "remix": {"return_routing": True}},
        )
    )  # fmt: skip
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 6
    assert events[-1].model_extra["remix"]["routing"]["layers"] == routing["layers"]
    assert all("remix" not in e.model_extra for e in events[:-1])
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "add 2 3 ="}], max_tokens=4,
        temperature=0, extra_body={"remix": {"return_routing": True}},
    )  # fmt: skip
    assert chat.model_extra["remix"]["routing"]["tokens"] > 0


def test_long_prompt_does_not_stall_a_concurrent_stream(server):
    """A prompt that takes the tokenizer about a second: the tokenizer runs in a worker
    thread, so another request's stream keeps flowing meanwhile."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "sort 1 =", "max_tokens": 120, "ignore_eos": True,
            "stream": True}  # fmt: skip
    arrivals: list[float] = []
    lines: list[str] = []

    def read_stream():
        with httpx.stream("POST", server["base"] + "/v1/completions", json=body,
                          headers=headers, timeout=60) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.perf_counter())
                    lines.append(line)

    reader = threading.Thread(target=read_stream)
    reader.start()
    while len(arrivals) < 5:
        time.sleep(0.01)
    start = time.perf_counter()
    long = post(server, "/v1/completions", {"model": MODEL, "prompt": "add 12 34 = " * 80_000})
    end = time.perf_counter()
    reader.join()
    assert_openai_error(long, 400, "prompt")  # longer than the context, found by tokenizing
    # up to 120 chunks (a token whose text is not complete yet sends none), then [DONE]
    assert lines[-1] == "data: [DONE]" and len(arrivals) > 60, lines[-3:]
    during = [t for t in arrivals if start <= t <= end]
    pairs = zip(arrivals, arrivals[1:], strict=False)
    gaps = [b - a for a, b in pairs if start <= b and a <= end]
    assert end - start > 0.3, "the prompt must take the tokenizer a while for this to test"
    assert during and max(gaps) < (end - start) / 2, (end - start, max(gaps))


def test_fuzzed_documented_schema_gets_no_5xx(server):
    """Schemathesis drives every operation in /openapi.json with generated valid and invalid
    requests against the real engine: none may answer 5xx."""
    import schemathesis

    schema = schemathesis.openapi.from_url(server["base"] + "/openapi.json")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    fuzz_no_5xx(schema, lambda case: case.call(base_url=server["base"], headers=headers,
                                               timeout=60), max_examples=10)  # fmt: skip
    assert httpx.get(server["base"] + "/ready").json()["status"] == "ready"


def engine_core(proc: subprocess.Popen):
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no engine core process")


def test_engine_death_fails_requests_and_stops_the_process(demo_checkpoint, tmp_path):
    """The engine core killed mid-stream: the stream ends with an error event and [DONE],
    /ready says failed, /health fails, and the process exits non-zero within 5 s (so a
    supervisor restarts it)."""
    args = [*SMALL_ENGINE, "--max-model-len", "128"]
    with running_server(demo_checkpoint, tmp_path / "server.log", args) as srv:
        body = {"prompt": "sort 1 =", "max_tokens": 120, "ignore_eos": True, "stream": True}
        probes: list[tuple[str, int, str]] = []
        times: list[float] = []
        with httpx.stream("POST", srv["base"] + "/v1/completions", json=body, timeout=30) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            next(lines)
            engine_core(srv["proc"]).kill()
            killed = time.perf_counter()
            rest = list(lines)
        while srv["proc"].poll() is None and time.perf_counter() - killed < 10:
            for path in ("/ready", "/health"):
                try:
                    resp = httpx.get(srv["base"] + path, timeout=1)
                    probes.append((path, resp.status_code, resp.json().get("status")))
                    times.append(time.perf_counter() - killed)
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        code = srv["proc"].wait(timeout=10)
        exited = time.perf_counter() - killed
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: ") :])["error"]["type"] == "server_error"
    assert ("/ready", 503, "failed") in probes, probes
    assert ("/health", 503, "failed") in probes, probes
    assert code != 0 and exited < 5, (code, exited, list(zip(times, probes, strict=True)))


def test_sigterm_drains_in_flight_requests(server):
    """The module's last test: SIGTERM lets an in-flight stream finish, then the process exits."""
    body = {
        "model": MODEL,
        "prompt": "sort 123 =",
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", server["base"] + "/v1/completions", json=body, headers=headers, timeout=60
    ) as resp:
        lines = (line for line in resp.iter_lines() if line.startswith("data: "))
        first = next(lines)
        server["proc"].send_signal(signal.SIGTERM)
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in [first, *rest[:-1]]]
    assert chunks[-1]["usage"]["completion_tokens"] == 60  # finished, not cut short
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    # uvicorn drains, shuts down, then re-raises the signal: the exit status says "SIGTERM"
    assert server["proc"].wait(timeout=40) in (0, -signal.SIGTERM)
