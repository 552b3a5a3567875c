"""The HTTP layer in-process against a fake engine (tests/helpers/fake_engine.py): no vLLM
process, milliseconds per test. The real engine behind the same app: test_server.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from helpers.asgi import Reply, call, lifespan
from helpers.fake_engine import FakeEngine
from helpers.fuzz import fuzz_no_5xx

from server.app import create_app
from server.settings import ServerSettings

MODEL = "fake"


def settings(**overrides) -> ServerSettings:
    return ServerSettings(**{"max_queue": 4, **overrides})


class Server:
    """An app over a FakeEngine, its observations, and the failures it reported."""

    def __init__(self, engine: FakeEngine | None = None, **overrides) -> None:
        self.engine = engine or FakeEngine()
        self.failures = 0
        self.app = create_app(self.engine, settings(**overrides), self._failed)
        self.admission = self.app.state.services.admission
        self.records: list = []
        self.admission.observers.append(self.records.append)

    def _failed(self) -> None:
        self.failures += 1

    async def post(self, path: str, body: dict, **kw) -> Reply:
        return await call(self.app, "POST", path, body, **kw)

    async def get(self, path: str) -> Reply:
        return await call(self.app, "GET", path)

    def statuses(self) -> list[int]:
        return [r.status for r in self.records]


def serve(test):  # noqa: ANN001, ANN201
    """Run `test(server)` inside the app's lifespan, once the fake engine is ready."""

    def run(**overrides):
        async def main():
            server = Server(**overrides)
            async with lifespan(server.app):
                while not server.engine.ready:
                    await asyncio.sleep(0)
                await test(server)

        asyncio.run(main())

    return run


def completion(**body) -> dict:
    return {"model": MODEL, "prompt": "ab", "max_tokens": 5, **body}


# ---------------------------------------------------------------------------------------------
# Answers


@serve
async def check_completion_and_stream(server: Server) -> None:
    r = await server.post("/v1/completions", completion())
    assert r.status == 200, r.body
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == "cdefg" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert "remix" not in body
    s = await server.post(
        "/v1/completions", completion(stream=True, stream_options={"include_usage": True})
    )
    assert s.headers["content-type"].startswith("text/event-stream")
    events = s.events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "cdefg"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert server.statuses() == [200, 200] and server.admission.in_flight == 0


def test_completion_and_stream():
    check_completion_and_stream()


@serve
async def check_n_logprobs_echo(server: Server) -> None:
    r = (await server.post("/v1/completions", completion(prompt=["ab", "xy"], n=2))).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in r["choices"]] == ["cdefg", "cdefg", "zabcd", "zabcd"]
    r = (await server.post("/v1/completions", completion(echo=True, logprobs=1))).json()
    (choice,) = r["choices"]
    assert choice["text"] == "abcdefg"
    lp = choice["logprobs"]
    assert lp["tokens"] == list("abcdefg") and lp["token_logprobs"][0] is None
    assert lp["text_offset"] == list(range(7))
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {"b": -0.25, "0": -2.0}


def test_n_logprobs_echo():
    check_n_logprobs_echo()


@serve
async def check_chat(server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = await server.post("/v1/chat/completions", {**body, "logprobs": True, "top_logprobs": 1})
    assert r.status == 200, r.body
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "stu", "tool_calls": []}
    first = choice["logprobs"]["content"][0]
    assert first["token"] == "s" and first["bytes"] == [115] and len(first["top_logprobs"]) == 2
    s = await server.post("/v1/chat/completions", {**body, "stream": True})
    chunks = [json.loads(e) for e in s.events()[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "stu"


def test_chat():
    check_chat()


@serve
async def check_models_health_ready_metrics(server: Server) -> None:
    assert (await server.get("/v1/models")).json()["data"][0]["id"] == MODEL
    assert (await server.get("/health")).json() == {"status": "ok"}
    ready = (await server.get("/ready")).json()
    assert ready["status"] == "ready" and ready["requests_in_flight"] == 0
    await server.post("/v1/completions", completion())
    text = (await server.get("/metrics")).body.decode()
    assert 'remix_requests_total{endpoint="/v1/completions",model="fake",status="200"} 1.0' in text


def test_models_health_ready_metrics():
    check_models_health_ready_metrics()


# ---------------------------------------------------------------------------------------------
# Bad input: 4xx with OpenAI's error body, never a 5xx


def assert_error(r: Reply, status: int, param: str | None = None) -> dict:
    assert r.status == status, (r.status, r.body)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


BAD_BODIES = [
    (b'{"prompt": "\\ud800"}', "prompt"),  # a lone surrogate: not text
    (b'{"prompt": ["ok", "\\udfff x"]}', "prompt"),
    (b'{"prompt": "x", "stop": ["\\ud800"]}', "stop"),
    (b'{"prompt": "x", "user": "\\ud83d"}', "user"),
    (b'{"prompt": "x", "\\ud800": 1}', None),  # a field name that is not text
    (b'{"prompt": "x", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    (b'{"prompt": "x", "model": "\\ud800"}', "model"),
    (b'{"prompt": "\xff\xfe"}', None),  # not UTF-8
    (b"[" * 100_000 + b"]" * 100_000, None),  # nested too deeply for any JSON decoder
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),
    (b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}", "prompt"),
    (b'{"prompt": "x",', None),
    (b"[1, 2]", None),
    (b"", None),
    (b"null", None),
    (b'{"prompt": "x", "seed": 1e400}', "seed"),
    (b'{"prompt": "x", "temperature": NaN}', None),
    (b'{"prompt": "x", "max_tokens": 100000000000000000000000}', "max_tokens"),
    (b'{"prompt": "x", "suffix": "y"}', "suffix"),
    (b'{"prompt": "x", "best_of": 3}', "best_of"),
    (b'{"prompt": "x", "logit_bias": {"five": 1.0}}', "logit_bias"),
    (b'{"prompt": "x", "logit_bias": {"5": 101}}', "logit_bias.5"),
    (b'{"prompt": "x", "logit_bias": {"256": 1}}', "logit_bias"),  # the fake vocabulary: 256
    (b'{"prompt": "x", "allowed_token_ids": [3, 999]}', "allowed_token_ids"),
    (b'{"prompt": "x", "allowed_token_ids": []}', "allowed_token_ids"),
    (b'{"prompt": "x", "stop_token_ids": [256]}', "stop_token_ids"),
    (b'{"prompt": "x", "structured_outputs": {}}', "structured_outputs"),
    (
        b'{"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}',
        "structured_outputs",
    ),
    (b'{"prompt": "x", "structured_outputs": {"regex": "(a"}}', "structured_outputs"),
    (b'{"prompt": "x", "structured_outputs": {"choice": []}}', "structured_outputs.choice"),
    (b'{"prompt": "x", "structured_outputs": {"grammar": "root ::= "}}', "structured_outputs"),
    (b'{"prompt": "x", "structured_outputs": {"json": "{not json"}}', "structured_outputs"),
    (
        b'{"prompt": "x", "structured_outputs": {"json": {"type": "nonsense"}}}',
        "structured_outputs",
    ),
    (b'{"prompt": "x", "stream_options": {"include_usage": true}}', None),
]


@pytest.mark.parametrize(("raw", "param"), BAD_BODIES)
def test_bad_completion_bodies_are_400(raw, param):
    @serve
    async def check(server: Server) -> None:
        r = await server.post("/v1/completions", None, raw=raw)
        assert_error(r, 400, param)
        assert r.body.isascii()  # escaped, so any message encodes
        assert server.statuses() == [400] and server.admission.in_flight == 0

    check()


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "\ud800"}],
        [{"role": "user", "content": "x", "name": "\udc00"}],
        [{"role": "robot", "content": "x"}],
        [],
    ],
)
def test_bad_chat_bodies_are_400(messages):
    @serve
    async def check(server: Server) -> None:
        raw = json.dumps({"model": MODEL, "messages": messages}).encode()  # ASCII escapes
        assert_error(await server.post("/v1/chat/completions", None, raw=raw), 400)

    check()


TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
BAD_CHAT_FIELDS = [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
    ({"tools": [TOOL], "tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "required", "stream": True}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "wrong"}}}}}], "tool_choice": "required"}, "tools"),
    ({"logit_bias": {"300": -100}}, "logit_bias"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT_FIELDS)
def test_bad_chat_fields_are_400(fields, param):
    @serve
    async def check(server: Server) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **fields}
        error = assert_error(await server.post("/v1/chat/completions", body), 400, param)
        assert param in error["message"]
        assert server.statuses() == [400] and server.admission.in_flight == 0

    check()


@serve
async def check_constrained_requests_are_accepted(server: Server) -> None:
    """Valid constraints and biases pass the server's checks (the fake engine ignores them; the
    real engine's answers under them: test_api.py)."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for fields in [
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}},
        {"structured_outputs": {"grammar": 'root ::= "a" | "b"'}},
        {"tools": [TOOL], "tool_choice": "none"},
        {"tools": [TOOL]},
        {"logit_bias": {"255": 100, "0": -100}, "allowed_token_ids": [0, 255], "bad_words": ["ab"]},
    ]:  # fmt: skip
        r = await server.post("/v1/chat/completions", {**chat, **fields})
        assert r.status == 200, (fields, r.body)
    for so in [{"regex": "[0-9]+"}, {"choice": ["a", "b"]}, {"json": {"type": "object"}}]:
        r = await server.post("/v1/completions", completion(structured_outputs=so))
        assert r.status == 200, (so, r.body)


def test_constrained_requests_are_accepted():
    check_constrained_requests_are_accepted()


@serve
async def check_tokenize_and_detokenize(server: Server) -> None:
    """vLLM's shapes (the fake model's tokens are bytes)."""
    r = await server.post("/tokenize", {"model": MODEL, "prompt": "ab", "return_token_strs": True})
    assert r.json() == {
        "count": 2,
        "max_model_len": 128,
        "tokens": [97, 98],
        "token_strs": ["a", "b"],
    }
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    r = await server.post("/tokenize", chat)
    assert r.json()["tokens"] == list(b"<user>hi<a>") and r.json()["token_strs"] is None
    r = await server.post("/detokenize", {"model": MODEL, "tokens": [104, 105]})
    assert r.json() == {"prompt": "hi"}
    assert_error(await server.post("/detokenize", {"tokens": [256]}), 400, "tokens")
    assert_error(await server.post("/tokenize", {"model": "other", "prompt": "x"}), 404)
    assert_error(await server.post("/tokenize", {"prompt": "x", "messages": []}), 400)
    spec = (await server.get("/openapi.json")).json()
    assert {"/tokenize", "/detokenize"} <= set(spec["paths"])


def test_tokenize_and_detokenize():
    check_tokenize_and_detokenize()


@serve
async def check_body_limit(server: Server) -> None:
    big = {"prompt": "x" * (1 << 20)}
    assert_error(await server.post("/v1/completions", big), 413)
    # a chunked body with no Content-Length is counted as it arrives
    chunked: list[dict] = []

    async def receive() -> dict:
        chunked.append({})
        if len(chunked) <= 3:
            return {"type": "http.request", "body": b"x" * 600_000, "more_body": True}
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
             "query_string": b"", "asgi": {"version": "3.0"}}  # fmt: skip
    await server.app(scope, receive, send)
    assert sent[0]["status"] == 413 and len(chunked) == 2  # refused without reading the rest


def test_body_limit():
    check_body_limit(max_body_mib=1)


@serve
async def check_openapi(server: Server) -> None:
    spec = (await server.get("/openapi.json")).json()
    for path, model in [("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatCompletionRequest")]:  # fmt: skip
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"].endswith("/" + model)
        assert "400" in spec["paths"][path]["post"]["responses"]
    fields = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "temperature", "stream", "logprobs", "remix"} <= set(fields)


def test_openapi_documents_request_bodies():
    check_openapi()


# ---------------------------------------------------------------------------------------------
# Admission: one slot and one observation per request, however it ends


@serve
async def check_capacity(server: Server) -> None:
    server.engine.step_s = 0.02
    tasks = [asyncio.create_task(server.post("/v1/completions", completion())) for _ in range(6)]
    replies = await asyncio.gather(*tasks)
    statuses = sorted(r.status for r in replies)
    assert statuses == [200] * 4 + [429] * 2
    refused = next(r for r in replies if r.status == 429)
    assert refused.headers["retry-after"] == "1"
    assert_error(refused, 429)
    assert sorted(server.statuses()) == statuses and server.admission.in_flight == 0


def test_capacity_gives_429():
    check_capacity()


@serve
async def check_stream_cancelled_before_it_runs(server: Server) -> None:
    """The response starts (headers) but the request is cancelled before its stream's
    generator first runs: the slot comes back and the request is observed once (499)."""
    at_start = asyncio.Event()

    async def stall_at_start(message: dict) -> None:
        if message["type"] == "http.response.start":
            at_start.set()
            await asyncio.Event().wait()  # a client that never reads

    task = asyncio.create_task(
        server.post("/v1/completions", completion(stream=True), on_send=stall_at_start)
    )
    await at_start.wait()
    assert server.admission.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.admission.in_flight == 0 and server.statuses() == [499]
    assert server.engine.generated == 0  # the generator never ran
    # the client already gone when the response begins: the same, whatever the stream did
    gone = asyncio.Event()
    gone.set()
    await server.post("/v1/completions", completion(stream=True), disconnect=gone)
    assert server.admission.in_flight == 0 and len(server.statuses()) == 2
    assert server.engine.running == set()


def test_stream_cancelled_before_its_generator_runs_does_not_leak():
    check_stream_cancelled_before_it_runs()


@serve
async def check_disconnects(server: Server) -> None:
    server.engine.step_s = 0.01
    gone = asyncio.Event()
    seen: list[dict] = []

    async def leave_after_two_chunks(message: dict) -> None:
        seen.append(message)
        if len(seen) == 3:
            gone.set()

    body = completion(stream=True, max_tokens=100)
    await server.post("/v1/completions", body, disconnect=gone, on_send=leave_after_two_chunks)
    # non-streamed: the client leaves while the engine works
    gone2 = asyncio.Event()
    task = asyncio.create_task(
        server.post("/v1/completions", completion(max_tokens=100), disconnect=gone2)
    )
    await asyncio.sleep(0.1)
    gone2.set()
    await task
    assert server.statuses() == [499, 499]
    assert server.admission.in_flight == 0 and server.engine.running == set()


def test_disconnects_abort_and_are_observed_once():
    check_disconnects()


@serve
async def check_tokenizer_off_loop(server: Server) -> None:
    server.engine.step_s = 0.01
    stream = asyncio.create_task(
        server.post("/v1/completions", completion(prompt=[5, 6], stream=True, max_tokens=60))
    )
    await asyncio.sleep(0.1)
    t0 = time.perf_counter()
    long = await server.post("/v1/completions", completion(prompt="z" * 4000, max_tokens=1))
    tokenizing = time.perf_counter() - t0
    reply = await stream
    assert long.status == 400  # longer than the context, found once tokenized
    assert tokenizing >= 1.0
    arrivals = [t for t, _ in reply.chunks]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    # tokenizing on the event loop would stall one gap for all of it; a loaded machine (the
    # 10 ms steps stretch) must not fail the test, so the bound is relative, not 0.15 s
    assert max(gaps) < tokenizing / 2, (max(gaps), tokenizing)


def test_long_prompt_does_not_stall_a_concurrent_stream():
    check_tokenizer_off_loop(engine=FakeEngine(encode_s_per_char=2.5e-4))


@serve
async def check_engine_death(server: Server) -> None:
    server.engine.step_s = 0.01
    stream = asyncio.create_task(
        server.post("/v1/completions", completion(stream=True, max_tokens=100))
    )
    await asyncio.sleep(0.1)
    server.engine.die()
    events = (await stream).events()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error"
    for _ in range(100):
        if server.failures:
            break
        await asyncio.sleep(0.01)
    assert server.failures == 1
    ready = await server.get("/ready")
    assert ready.status == 503 and ready.json()["status"] == "failed"
    assert (await server.get("/health")).status == 503
    assert_error(await server.post("/v1/completions", completion()), 503)
    assert server.admission.in_flight == 0


def test_engine_death_fails_requests_readiness_and_liveness():
    check_engine_death()


# ---------------------------------------------------------------------------------------------
# The documented schema, fuzzed (the same against the real engine: test_server.py)


def test_fuzzed_requests_never_get_a_5xx():
    import schemathesis

    engine = FakeEngine()
    asyncio.run(engine.start())
    app = create_app(engine, settings(max_queue=64))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    fuzz_no_5xx(schema, lambda case: case.call(), max_examples=15)


def test_every_setting_reads_its_flag_and_environment(monkeypatch):
    from server.cli import build_parser
    from server.settings import EngineSettings, from_args

    for name, value in [("MAX_N", "3"), ("SEED", "7"), ("ENFORCE_EAGER", "1"),
                        ("MAX_BODY_MIB", "2"), ("MAX_NUM_SEQS", "8")]:  # fmt: skip
        monkeypatch.setenv(f"REMIX_{name}", value)
    args = build_parser().parse_args(["--max-num-seqs", "9"])  # a flag wins over its variable
    server = from_args(ServerSettings, args)
    assert (server.max_n, server.max_body_bytes) == (3, 2 << 20)
    engine = from_args(EngineSettings, args)
    assert engine.engine_args() == {
        "tensor_parallel_size": 1, "max_num_seqs": 9, "enforce_eager": True, "seed": 7,
        "pipeline_parallel_size": 1, "data_parallel_size": 1, "nnodes": 1, "node_rank": 0,
        "master_addr": "127.0.0.1", "master_port": 29501,
    }  # fmt: skip


def test_an_interrupted_demo_build_is_built_again(tmp_path, monkeypatch):
    """./demo-checkpoint without its checkpoint (a build stopped part-way, say by Ctrl-C during
    `make serve`) is built again instead of refused; a built one is served as it is."""
    import remix_infer.train.demo
    from server.cli import resolve_checkpoint

    built = []
    monkeypatch.setattr(remix_infer.train.demo, "run_demo", built.append)
    demo = tmp_path / "demo-checkpoint"
    (demo / "base").mkdir(parents=True)  # what an interrupted build leaves
    assert resolve_checkpoint(str(demo)) == demo and built == [demo]
    (demo / "remix_config.json").write_text("{}")
    assert resolve_checkpoint(str(demo)) == demo and built == [demo]
