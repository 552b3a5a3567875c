"""Several checkpoints in one server, the HTTP side in-process against the fake engine (no
vLLM process, milliseconds): the --checkpoint flags, a request's `model` picking its slot and
prefix-cache salt, and the admin load/unload endpoints with real checkpoint validation. The
real engine behind the same app: test_multi_checkpoint_server.py."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from helpers.asgi import Reply, call, lifespan
from helpers.fake_engine import FakeEngine
from helpers.models import make_checkpoint
from helpers.servers import metric_samples

from remix_infer.checkpoint import load_checkpoint
from server.app import create_app
from server.cli import build_parser, checkpoints_from_environment, main, named_checkpoints
from server.settings import ServerSettings, SettingsError

KEY = "admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


# ---------------------------------------------------------------------------------------------
# remix-serve's flags


def test_checkpoint_flags_name_the_models(tmp_path, monkeypatch):
    a, b, demo = (tmp_path / d for d in ("a", "b-dir", "demo-checkpoint"))
    for d in (a, b, demo):
        d.mkdir()
    assert named_checkpoints([f"one={a}", str(b)], None, "base") == {"one": a, "b-dir": b}
    assert named_checkpoints([str(demo)], None, None) == {"remix-demo": demo}  # as before
    assert named_checkpoints([str(a)], "mine", None) == {"mine": a}  # --served-model-name
    odd = tmp_path / "x=y"  # an existing directory is a directory, '=' or not
    odd.mkdir()
    assert named_checkpoints([str(odd)], None, None) == {"x=y": odd}
    monkeypatch.setenv("REMIX_CHECKPOINT", f"one={a}, two={b}")
    args = build_parser().parse_args([])
    checkpoints_from_environment(args)
    assert args.checkpoint == [f"one={a}", f"two={b}"]
    args = build_parser().parse_args(["--checkpoint", str(a)])  # a flag wins over the variable
    checkpoints_from_environment(args)
    assert args.checkpoint == [str(a)]


@pytest.mark.parametrize(
    "specs, served, base, named",
    [
        (["x={a}", "x={b}"], None, None, "two checkpoints are named 'x'"),
        (["{a}", "{a}"], None, None, "two checkpoints are named 'a'"),
        (["x={a}"], None, "x", "--serve-base-model 'x'"),
        (["x={a}", "{b}"], "m", None, "--served-model-name"),
        (["x={a}"], "m", None, "--served-model-name"),
        (["bad name={a}"], None, None, "NAME=DIR"),
    ],
)
def test_checkpoint_names_that_cannot_work_are_refused(tmp_path, specs, served, base, named):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    specs = [s.format(a=tmp_path / "a", b=tmp_path / "b") for s in specs]
    with pytest.raises(SettingsError, match=named):
        named_checkpoints(specs, served, base)


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Checkpoints a and b over one base model (b/base is a's, through a relative path), and
    c over another base model."""
    root = tmp_path_factory.mktemp("bases")
    a = make_checkpoint(root / "a", seed=1)
    b = make_checkpoint(root / "b", base_rel="../a/base", seed=2)
    c = make_checkpoint(root / "c", seed=3)
    return a, b, c


def refusal(capsys, *argv: str) -> str:
    """remix-serve's exit status 2 and its message, for flags refused before any engine starts."""
    assert main(["--port", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("remix-serve: ") and "Traceback" not in err
    return err


def test_cli_refuses_checkpoints_that_cannot_share_a_server(two_bases, tmp_path, capsys):
    a, b, c = two_bases
    err = refusal(capsys, "--checkpoint", f"a={a}", "--checkpoint", f"c={c}")
    assert str(c) in err and "base_model" in err  # names the checkpoint and the field
    err = refusal(
        capsys, "--checkpoint", f"a={a}", "--checkpoint", f"b={b}", "--max-checkpoints", "1"
    )
    assert "--max-checkpoints" in err
    err = refusal(capsys, "--checkpoint", f"a={a}", "--checkpoint", f"a={b}")
    assert "named 'a'" in err
    err = refusal(capsys, "--checkpoint", f"a={a}", "--serve-base-model", "a")
    assert "--serve-base-model 'a'" in err
    err = refusal(capsys, "--checkpoint", f"a={a}", "--checkpoint", f"x={tmp_path / 'nowhere'}")
    assert str(tmp_path / "nowhere") in err and "'x'" in err
    err = refusal(capsys, "--base-model", str(a / "base"), "--serve-base-model", "base")
    assert "--serve-base-model" in err


# ---------------------------------------------------------------------------------------------
# Serving several models


class Server:
    """The app over a FakeEngine serving checkpoints a and b (slots 0, 1 of 3) and the base
    model, with an API key (so the admin endpoints are open)."""

    def __init__(self, template=None, step_s: float = 0.0, api_key: str | None = KEY) -> None:  # noqa: ANN001
        self.engine = FakeEngine(
            step_s=step_s, models=("a", "b"), base_model="base", max_slots=3, template=template
        )
        self.app = create_app(self.engine, ServerSettings(api_key=api_key, max_queue=16))
        self.headers = AUTH if api_key else {}

    async def post(self, path: str, body: dict) -> Reply:
        return await call(self.app, "POST", path, body, headers=self.headers)

    async def get(self, path: str) -> Reply:
        return await call(self.app, "GET", path, headers=self.headers)

    async def complete(self, model: str | None, **body) -> Reply:
        fields = {"prompt": "ab", "max_tokens": 5, **body}
        return await self.post("/v1/completions", {"model": model, **fields} if model else fields)

    async def text(self, model: str) -> str:
        r = await self.complete(model)
        assert r.status == 200, r.body
        assert r.json()["model"] == model
        return r.json()["choices"][0]["text"]


def serve(test=None, **server_args):  # noqa: ANN001, ANN201
    """Run `test(server)` inside the app's lifespan, once the fake engine is ready."""

    def wrap(test):  # noqa: ANN001, ANN202
        async def main(**fixtures):
            server = Server(**server_args, **fixtures)
            async with lifespan(server.app):
                while not server.engine.ready:
                    await asyncio.sleep(0)
                await test(server)

        return main

    return wrap(test) if test is not None else wrap


def assert_error(r: Reply, status: int, code: str, param: str | None = None) -> str:
    assert r.status == status, (r.status, r.body)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["code"], body["error"]["param"]) == (code, param), body
    return body["error"]["message"]


@serve
async def check_model_picks_slot_and_salt(server: Server) -> None:
    ids = [m["id"] for m in (await server.get("/v1/models")).json()["data"]]
    assert ids == ["a", "b", "base"]
    assert (await server.get("/ready")).json()["models"] == ["a", "b", "base"]
    # Each model answers with its own slot (the fake engine steps slot + 1 letters).
    assert [await server.text(m) for m in ("a", "b", "base", "a")] == [
        "cdefg", "dfhjl", "bbbbb", "cdefg"
    ]  # fmt: skip
    salts = server.engine.salts
    assert salts[0] == salts[3] and len(set(salts)) == 3  # one prefix-cache salt per model
    # n choices, chat and streams go to the same slot.
    chat = {"model": "b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "n": 2}
    r = await server.post("/v1/chat/completions", chat)
    assert [c["message"]["content"] for c in r.json()["choices"]] == [
        "tv",
        "tv",
    ]  # two letters a step after ">"
    s = await server.complete("b", stream=True)
    assert "".join(json.loads(e)["choices"][0]["text"] for e in s.events()[:-1]) == "dfhjl"
    # Which model: required with several; an unknown one is a 404 naming those served.
    assert "'a', 'b', 'base'" in assert_error(
        await server.complete(None), 400, "model_required", "model"
    )
    msg = assert_error(await server.complete("gpt-4"), 404, "model_not_found", "model")
    assert "'gpt-4'" in msg and "'a', 'b', 'base'" in msg
    # The base model has no adapters, so no routing to return.
    r = await server.complete("base", remix={"return_routing": True})
    assert "'base'" in assert_error(r, 400, "invalid_value", "remix.return_routing")


def test_model_picks_slot_and_salt():
    asyncio.run(check_model_picks_slot_and_salt())


@serve
async def check_serving_metrics_per_model(server: Server) -> None:
    """The serving metrics' `model` label: the served name a request resolved to (kept when it
    is refused afterwards); "" for a name this server does not serve and for a body refused
    before its model was read, so a client cannot make up label values."""
    assert (await server.complete("a")).status == 200  # 2 prompt tokens, 5 generated
    assert (await server.complete("b", max_tokens=3)).status == 200
    assert (await server.complete("b", stream=True)).status == 200  # 5 more, streamed
    chat = {"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    assert (await server.post("/v1/chat/completions", chat)).status == 200
    assert (await server.complete("gpt-4")).status == 404  # unknown: model=""
    assert (await server.complete("a", bogus=1)).status == 400  # bad body: model=""
    assert (await server.complete("base", remix={"return_routing": True})).status == 400
    text = (await server.get("/metrics")).body.decode()
    samples = metric_samples(text)
    completions, chat_endpoint = "/v1/completions", "/v1/chat/completions"
    requests = {
        (labels["endpoint"], labels["model"], labels["status"]): value
        for (name, items), value in samples.items()
        if name == "remix_requests_total"
        for labels in [dict(items)]
    }
    assert requests == {
        (completions, "a", "200"): 1,
        (completions, "b", "200"): 2,
        (chat_endpoint, "a", "200"): 1,
        (completions, "", "404"): 1,
        (completions, "", "400"): 1,
        (completions, "base", "400"): 1,
    }
    duration = samples[
        ("remix_request_duration_seconds_count", (("endpoint", completions), ("model", "b")))
    ]
    assert duration == 2
    chat_prompt = len("<user>x<a>")

    def tokens(name: str) -> dict[str, float]:
        return {dict(items)["model"]: v for (n, items), v in samples.items() if n == name}

    assert tokens("remix_prompt_tokens_total") == {"a": 2 + chat_prompt, "b": 4}
    assert tokens("remix_generation_tokens_total") == {"a": 5 + 2, "b": 3 + 5}
    assert "gpt-4" not in text


def test_serving_metrics_per_model():
    asyncio.run(check_serving_metrics_per_model())


@serve(api_key=None)
async def check_admin_needs_an_api_key(server: Server) -> None:
    for path, body in [("/v1/load_checkpoint", {"name": "c", "path": "/x"}),
                       ("/v1/unload_checkpoint", {"name": "a"})]:  # fmt: skip
        r = await server.post(path, body)
        assert "--api-key" in assert_error(r, 403, "admin_disabled")
    assert await server.text("a") == "cdefg"  # nothing changed


def test_admin_needs_an_api_key():
    asyncio.run(check_admin_needs_an_api_key())


@pytest.fixture(scope="module")
def template(two_bases):
    return load_checkpoint(two_bases[0])


def test_load_and_unload_checkpoints(two_bases, template, tmp_path):
    a, b, c = two_bases
    broken = Path(shutil.copytree(b, tmp_path / "broken", symlinks=True))
    (broken / "remix_config.json").write_text("{")

    @serve(template=template)
    async def check(server: Server) -> None:
        load = "/v1/load_checkpoint"
        r = await server.post(load, {"name": "new", "path": str(b)})
        assert r.status == 200, r.body
        assert r.json() | {"seconds": 0} == {
            "name": "new", "path": str(b), "slot": 2, "status": "loaded", "seconds": 0
        }  # fmt: skip
        assert await server.text("new") == "ehknq"  # slot 2: three letters a step
        ids = [m["id"] for m in (await server.get("/v1/models")).json()["data"]]
        assert ids == ["a", "b", "new", "base"]
        # Refusals, each before any engine call, the slot table unchanged.
        assert_error(
            await server.post(load, {"name": "a", "path": str(b)}), 409, "model_exists", "name"
        )
        assert_error(
            await server.post(load, {"name": "base", "path": str(b)}), 409, "model_exists", "name"
        )
        assert "3 checkpoint slots" in assert_error(
            await server.post(load, {"name": "x", "path": str(b)}), 409, "no_free_slot"
        )
        r = await server.post("/v1/unload_checkpoint", {"name": "new"})
        assert r.status == 200 and r.json()["slot"] == 2 and r.json()["status"] == "unloaded"
        assert_error(await server.complete("new"), 404, "model_not_found", "model")
        for path, named in [(c, "base_model"), (broken, "remix_config.json"),
                            (tmp_path / "nowhere", "nowhere")]:  # fmt: skip
            msg = assert_error(
                await server.post(load, {"name": "x", "path": str(path)}),
                400,
                "invalid_checkpoint",
                "path",
            )
            assert str(path) in msg and named in msg
        assert_error(
            await server.post(load, {"name": "x y", "path": str(b)}), 400, "invalid_value", "name"
        )
        assert set(server.engine.slots) == {0, 1}
        # Unloading: a name not served, the base model.
        unload = "/v1/unload_checkpoint"
        assert_error(await server.post(unload, {"name": "nope"}), 404, "model_not_found", "model")
        assert_error(await server.post(unload, {"name": "base"}), 400, "invalid_value", "name")
        # Loaded again under the same name: a new prefix-cache salt.
        await server.post(load, {"name": "new", "path": str(b)})
        before = len(server.engine.salts)
        await server.text("new")
        assert server.engine.salts[before] not in server.engine.salts[:before]

    asyncio.run(check())


@serve(step_s=0.01)
async def check_unload_waits_for_requests_in_flight(server: Server) -> None:
    unload = "/v1/unload_checkpoint"
    slow = asyncio.create_task(server.complete("a", max_tokens=40))  # about 0.4 s
    while not server.engine.running:
        await asyncio.sleep(0.001)
    # timeout_s 0: refused at once, and "a" serves on.
    r = await server.post(unload, {"name": "a", "timeout_s": 0})
    assert "1 request(s) in flight" in assert_error(r, 409, "checkpoint_busy", "timeout_s")
    assert await server.text("a") == "cdefg"
    # Waiting: new requests for "a" are refused meanwhile; the others' go on.
    waiting = asyncio.create_task(server.post(unload, {"name": "a", "timeout_s": 120}))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert "being unloaded" in assert_error(
        await server.complete("a"), 404, "model_not_found", "model"
    )
    assert [await server.text(m) for m in ("b", "base")] == ["dfhjl", "bbbbb"]
    assert (await slow).status == 200  # the request in flight finished whole
    assert (await waiting).status == 200  # then the unload ran (the fake engine checks)
    assert 0 not in server.engine.slots


def test_unload_waits_for_requests_in_flight(template):
    asyncio.run(check_unload_waits_for_requests_in_flight(template=template))
