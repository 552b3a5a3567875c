"""What applications build on, against one real `remix-serve` (vLLM engine, quick demo
checkpoint), with the official `openai` client: structured outputs (response_format, vLLM's
structured_outputs), forced tool calls, logit_bias / allowed_token_ids / bad_words. The tiny
model prefers none of these formats: the constraints must hold whatever it would say."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import openai
import pytest
from helpers.servers import SMALL_ENGINE, running_server
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MODEL = "remix-demo"
PROMPT = "sort 3921 ="


@pytest.fixture(scope="module")
def server(demo_checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("api-log") / "server.log"
    args = ["--served-model-name", MODEL, *SMALL_ENGINE, "--max-model-len", "128", "--max-n", "8"]
    with running_server(demo_checkpoint, log_path, args) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0)


def complete(client, max_tokens=8, **extra):
    return client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body=extra
    )


class Answer(BaseModel):
    task: Literal["sort", "add", "upper", "reverse"]
    digits: list[Annotated[int, Field(ge=0, le=9)]] = Field(max_length=4)  # bounded: a tiny
    done: bool  # model at temperature 1 writes numbers of any length otherwise


def test_parse_returns_valid_instances(client):
    """The openai client's chat.completions.parse (response_format from a pydantic model, a
    strict JSON schema): a valid instance on every sample at temperature 1."""
    for seed in range(4):
        r = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            response_format=Answer,
            max_tokens=100,
            temperature=1.0,
            seed=seed,
        )
        assert isinstance(r.choices[0].message.parsed, Answer), r.choices[0].message.content
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        response_format={"type": "json_object"},
        max_tokens=100,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "length" or isinstance(
        json.loads(r.choices[0].message.content), dict
    )


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_regex_and_choice_hold_on_every_sample(client, endpoint):
    constraints = [({"regex": "[0-9]{4}"}, re.compile("[0-9]{4}").fullmatch),
                   ({"choice": ["yes", "no", "1239"]}, {"yes", "no", "1239"}.__contains__)]  # fmt: skip
    for so, holds in constraints:
        extra = {"structured_outputs": so}
        if endpoint == "completions":
            r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=8,
                                          temperature=1.0, seed=1, extra_body=extra)  # fmt: skip
            texts = [c.text for c in r.choices]
        else:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=8, n=8, temperature=1.0, seed=1,
                                               extra_body=extra)  # fmt: skip
            texts = [c.message.content for c in r.choices]
        assert len(texts) == 8 and all(holds(t) for t in texts), (so, texts)


class Sort(BaseModel):
    digits: str = Field(pattern="^[0-9]{1,4}$")
    descending: bool


def test_named_tool_call_arguments_follow_the_schema(client):
    tools = [openai.pydantic_function_tool(Sort, name="sort"),
             {"type": "function", "function": {"name": "noop"}}]  # fmt: skip
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "sort"}},
        max_tokens=60,
        temperature=1.0,
        seed=3,
    )
    (choice,) = r.choices
    assert choice.message.content is None and choice.finish_reason == "stop"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "sort" and call.id
    Sort.model_validate_json(call.function.arguments)
    # "required": one or more calls, each to one of the tools
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=0,
    )
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name in ("sort", "noop")
    if call.function.name == "sort":
        Sort.model_validate_json(call.function.arguments)
    # "none" and no tool_choice: text, as without tools
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0
    )
    for choice_arg in ({"tool_choice": "none"}, {}):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                           tools=tools, max_tokens=8, temperature=0, **choice_arg)  # fmt: skip
        assert r.choices[0].message.content == plain.choices[0].message.content
        assert not r.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                       tools=tools, tool_choice="auto")  # fmt: skip


@pytest.fixture(scope="module")
def token_id(demo_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint / "base")

    def one(text: str) -> int:
        (i,) = tokenizer.encode(text, add_special_tokens=False)
        return i

    return one


def test_logit_bias_allowed_token_ids_and_bad_words(client, token_id):
    greedy = complete(client, ignore_eos=True)
    text = greedy.choices[0].text
    banned = complete(client, logit_bias={str(token_id(text[0])): -100}, ignore_eos=True)
    assert banned.choices[0].text[0] != text[0], (text, banned.choices[0].text)
    forced = complete(client, max_tokens=4, logit_bias={str(token_id("x")): 100}, ignore_eos=True)
    assert forced.choices[0].text == "xxxx"
    only = complete(
        client, max_tokens=6, allowed_token_ids=[token_id("a"), token_id("b")], ignore_eos=True
    )
    assert set(only.choices[0].text) <= {"a", "b"} and len(only.choices[0].text) == 6
    without = complete(client, bad_words=[text[:2]], ignore_eos=True)
    assert text[:2] not in without.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
        temperature=0, logit_bias={str(token_id("x")): 100}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert chat.choices[0].message.content == "xxxx"
    for field, value in [("logit_bias", {"100000": 1}), ("allowed_token_ids", [100000])]:
        with pytest.raises(openai.BadRequestError, match=field):
            complete(client, **{field: value})


def test_constraints_leave_routing_unchanged(client):
    """Constrained decoding masks logits only: a regex that admits exactly the greedy answer
    gives the same tokens and the same per-request routing counts as no constraint."""
    routing = {"remix": {"return_routing": True}}
    plain = complete(client, **routing)
    text = plain.choices[0].text
    constrained = complete(client, structured_outputs={"regex": re.escape(text)}, **routing)
    assert constrained.choices[0].text == text
    assert constrained.model_extra["remix"] == plain.model_extra["remix"]


def test_batch_file_equals_the_online_answers(client, demo_checkpoint, tmp_path):
    """`remix-serve batch`: 50 mixed lines (completions and chat, greedy) answered offline equal
    the online server's answers, in input order; a bad line gets an error object and a bad body
    the server's 400, and the other lines go on."""
    import subprocess
    import sys

    from helpers.servers import ROOT, server_env

    prompts = [json.loads(x)["prompt"] for x in (demo_checkpoint / "data" / "eval.jsonl").read_text().splitlines()][:48]  # fmt: skip
    lines = []
    for i, p in enumerate(prompts):
        if i % 2:
            lines.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": MODEL, "messages": [{"role": "user", "content": p}],
                                   "max_tokens": 6, "temperature": 0}})  # fmt: skip
        else:
            lines.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                          "body": {"model": MODEL, "prompt": p, "max_tokens": 6, "temperature": 0}})  # fmt: skip
    lines.insert(
        10, {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}
    )
    lines.insert(20, {"custom_id": "bad-body", "method": "POST", "url": "/v1/completions",
                      "body": {"model": MODEL, "prompt": "x", "temperature": 9}})  # fmt: skip
    src, dst = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cmd = [sys.executable, "-m", "server.cli", "batch", "--input", str(src), "--output", str(dst),
           "--checkpoint", str(demo_checkpoint), "--served-model-name", MODEL, *SMALL_ENGINE,
           "--max-model-len", "128"]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [x["custom_id"] for x in lines]
    for line, r in zip(lines, results, strict=True):
        if line["custom_id"] == "bad-url":
            assert r["response"] is None and "url" in r["error"]["message"]
            continue
        if line["custom_id"] == "bad-body":
            assert r["response"]["status_code"] == 400
            assert r["response"]["body"]["error"]["param"] == "temperature"
            continue
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        if line["url"] == "/v1/completions":
            online = client.completions.create(**line["body"]).choices[0].text
            assert body["choices"][0]["text"] == online, line
        else:
            online = client.chat.completions.create(**line["body"]).choices[0].message.content
            assert body["choices"][0]["message"]["content"] == online, line


def test_readme_structured_outputs_example_runs(client):
    """The README's example runs as shown (`client` is the test server's)."""
    from helpers.servers import ROOT

    text = (ROOT / "README.md").read_text().split("### Structured outputs", 1)[1]
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {"client": client}
    exec(compile(code, "README.md", "exec", dont_inherit=True), scope)  # noqa: S102
    assert isinstance(scope["r"].choices[0].text, str) and scope["r"].choices[0].text == "xxxx"


def test_tokenize_and_detokenize(server, client):
    """vLLM's shapes; messages render as a chat request's prompt (the same usage count)."""
    import httpx

    base = server["base"]
    r = httpx.post(base + "/tokenize", json={"model": MODEL, "prompt": PROMPT, "return_token_strs": True}).json()  # fmt: skip
    assert r["count"] == len(PROMPT) == len(r["tokens"]) and r["max_model_len"] == 128
    assert "".join(r["token_strs"]).replace("Ġ", " ") == PROMPT  # byte-level: Ġ is the space
    chat = httpx.post(base + "/tokenize", json={"messages": [{"role": "user", "content": PROMPT}]}).json()  # fmt: skip
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=1)  # fmt: skip
    assert chat["count"] == answer.usage.prompt_tokens
    back = httpx.post(base + "/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back == {"prompt": PROMPT}
    bad = httpx.post(base + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
