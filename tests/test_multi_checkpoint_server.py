"""Several checkpoints over one base model in one real `remix-serve` (vLLM engine): the quick
demo checkpoint, a second checkpoint over the same base that routes differently, and the base
model alone, served at once; checkpoints loaded, unloaded and reloaded while the others serve.
Every answer is compared with its own reference model (remix_infer.modeling). The HTTP side's
edge cases run against the fake engine: test_multi_checkpoint_http.py."""

from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from helpers.models import make_checkpoint, router_variant
from helpers.servers import SMALL_ENGINE, running_server, scrape
from reference import ReferenceRun, reference_run

from remix_infer.checkpoint import load_checkpoint
from remix_infer.config import module_path

pytestmark = pytest.mark.slow

KEY = "admin-key"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoints(demo_checkpoint, tmp_path_factory) -> dict[str, Path]:
    return {
        "demo": demo_checkpoint,
        "flip": router_variant(demo_checkpoint, tmp_path_factory.mktemp("flip") / "ckpt"),
    }


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    """demo and flip in slots 0 and 1 of 3, the base model as 'base'; an API key (admin)."""
    log_path = tmp_path_factory.mktemp("multi-server") / "server.log"
    args = [f"--checkpoint=demo={checkpoints['demo']}", f"--checkpoint=flip={checkpoints['flip']}"]
    args += ["--serve-base-model", "base", "--max-checkpoints", "3", "--api-key", KEY]
    args += [*SMALL_ENGINE, "--max-model-len", "256"]
    with running_server(
        None, log_path, args, timeout=600
    ) as s:  # 180 s ran out on a loaded machine
        yield s


class References:
    """Each served model's reference PyTorch model, and their greedy runs (cached)."""

    def __init__(self, checkpoints: dict[str, Path]) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from remix_infer.modeling import load_remix_model

        base = load_checkpoint(checkpoints["demo"]).base_model_path
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.models = {name: load_remix_model(path)[0] for name, path in checkpoints.items()}
        self.models["base"] = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.config = load_checkpoint(checkpoints["demo"]).config
        self.runs: dict[tuple[str, tuple[int, ...]], ReferenceRun] = {}

    def run(self, model: str, ids: list[int]) -> ReferenceRun:
        key = (model, tuple(ids))
        if key not in self.runs:
            self.runs[key] = reference_run(self.models[model], ids, MAX_TOKENS)
        return self.runs[key]

    def tokens(self, model: str, ids: list[int]) -> list[str]:
        """The greedy answer token by token, as the server's logprobs name them (special tokens
        included: the answer's text leaves them out, and the quick demo emits many)."""
        return [self.tokenizer.decode([t]) for t in self.run(model, ids).tokens]

    def selections(self, model: str, ids: list[int], tokens: int) -> list[dict[str, list[int]]]:
        """Per layer and module, how often each LoRA was chosen by the first `tokens` tokens."""
        chosen = self.run(model, ids).sequence_selections
        n = self.config.num_loras
        return [
            {
                m: torch.bincount(chosen[path][:tokens].flatten(), minlength=n).tolist()
                for m in self.config.target_modules
                if (path := module_path(i, m)) in chosen
            }
            for i in range(self.config.num_layers)
        ]


@pytest.fixture(scope="module")
def refs(checkpoints) -> References:
    return References(checkpoints)


@pytest.fixture(scope="module")
def prompts(demo_checkpoint, refs) -> list[list[int]]:
    lines = (demo_checkpoint / "data" / "eval.jsonl").read_text().splitlines()[:3]
    return [refs.tokenizer.encode(json.loads(line)["prompt"]) for line in lines]


def post(server: dict, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.post(server["base"] + path, json=body, headers=headers, timeout=timeout)


def complete(server: dict, model: str, ids: list[int], routing: bool = False) -> httpx.Response:
    body = {"model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0}
    body |= {"ignore_eos": True, "logprobs": 0, "remix": {"return_routing": routing}}
    return post(server, "/v1/completions", body)


def answer(r: httpx.Response) -> list[str]:
    """The tokens of a completion (its logprobs' tokens)."""
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def routed_tokens(samples: dict, checkpoint: str) -> float:
    """remix_routed_tokens_total of the first adapted module of layer 0, for `checkpoint`."""
    return sum(
        v
        for (name, items), v in samples.items()
        if name == "remix_routed_tokens_total"
        and dict(items)["checkpoint"] == checkpoint
        and dict(items)["layer"] == "0"
        and dict(items)["module"] == "q_proj"
    )


# ---------------------------------------------------------------------------------------------


def test_each_model_answers_with_its_own_checkpoint(server, refs, prompts):
    """Two checkpoints and the base model, requests interleaved in the engine's batches: each
    answer is its own reference model's greedy answer, each routing summary its own reference's
    selections, and the routing metrics count each checkpoint's tokens under its name."""
    models = httpx.get(server["base"] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert [m["id"] for m in models.json()["data"]] == ["demo", "flip", "base"]
    before = scrape(server)
    jobs = [(m, ids) for ids in prompts for m in ("demo", "flip", "base")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: complete(server, *j, routing=j[0] != "base"), jobs))
    after = scrape(server)
    routed = Counter()
    for (model, ids), r in zip(jobs, answers, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        assert answer(r) == refs.tokens(model, ids), model
        if model == "base":
            assert "remix" not in r.json()
            continue
        routing = r.json()["remix"]["routing"]
        assert routing["tokens"] == len(ids) + MAX_TOKENS - 1  # short prompts: no cached block
        assert routing["layers"] == refs.selections(model, ids, routing["tokens"]), model
        routed[model] += routing["tokens"]
    assert any(refs.tokens("demo", p) != refs.tokens("flip", p) for p in prompts)  # they differ
    for model in ("demo", "flip"):
        assert routed_tokens(after, model) - routed_tokens(before, model) == routed[model]
    labels = {dict(items).get("checkpoint") for (name, items) in after if "rout" in name}
    assert labels == {"demo", "flip"}  # the base model has no routing series
    for model in ("demo", "flip", "base"):  # serving metrics: each model's own requests, tokens
        served = [r.json()["usage"] for (m, _), r in zip(jobs, answers, strict=True) if m == model]
        for name, labels, expected in [
            ("remix_requests_total", {"endpoint": "/v1/completions", "status": "200"}, len(served)),
            ("remix_prompt_tokens_total", {}, sum(u["prompt_tokens"] for u in served)),
            ("remix_generation_tokens_total", {}, sum(u["completion_tokens"] for u in served)),
        ]:
            key = (name, tuple(sorted({**labels, "model": model}.items())))
            assert after[key] - before.get(key, 0) == expected, (model, name)
    base_refused = complete(server, "base", prompts[0], routing=True)
    assert base_refused.status_code == 400
    assert base_refused.json()["error"]["param"] == "remix.return_routing"


def test_prefix_cache_is_never_shared_between_models(server, refs, prompts):
    """A prompt longer than one KV block (128 tokens on CPU): sent to demo, then flip, then the
    base model, then demo again. Only the repeat to demo reuses cached KV (fewer tokens
    computed); flip and base compute everything and give their own reference answers."""
    long = (sum(prompts, []) * 20)[:150]

    def computed(model: str) -> int:
        r = complete(server, model, long, routing=True)
        assert answer(r) == refs.tokens(model, long), model
        return r.json()["remix"]["routing"]["tokens"]

    full = len(long) + MAX_TOKENS - 1
    assert computed("demo") == full
    assert computed("flip") == full
    assert answer(complete(server, "base", long)) == refs.tokens("base", long)
    assert computed("demo") < full  # the cache is on: a repeat to the same model hits it


def test_load_unload_reload_under_traffic(server, refs, prompts, checkpoints, tmp_path):
    """While demo and base serve a steady stream of requests: a checkpoint is loaded into the
    free slot, serves, is refused unloading while its stream runs (timeout_s 0), unloaded
    once the stream ends (the unload waits), and loaded again. No request of the others fails
    or changes its answer; a full slot table and bad checkpoints are refused."""
    stop = threading.Event()
    served: Counter = Counter()
    failures: list[str] = []

    def traffic(model: str) -> None:
        while not stop.is_set():
            r = complete(server, model, prompts[1])
            if r.status_code != 200 or answer(r) != refs.tokens(model, prompts[1]):
                failures.append(f"{model}: {r.status_code} {r.text[:200]}")
            served[model] += 1

    threads = [threading.Thread(target=traffic, args=(m,)) for m in ("demo", "base")]
    for t in threads:
        t.start()
    try:
        check_load_cycle(server, refs, prompts, checkpoints["flip"], tmp_path)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures
    assert min(served.values()) >= 3, served


def check_load_cycle(server, refs, prompts, flip: Path, tmp_path: Path) -> None:
    load, unload = "/v1/load_checkpoint", "/v1/unload_checkpoint"
    r = post(server, load, {"name": "extra", "path": str(flip)})
    assert r.status_code == 200 and r.json()["slot"] == 2, r.text
    assert answer(complete(server, "extra", prompts[0])) == refs.tokens("flip", prompts[0])
    # Refused, nothing touched: a full slot table, another base model, no checkpoint there.
    r = post(server, load, {"name": "more", "path": str(flip)})
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_free_slot", r.text
    r = post(server, unload, {"name": "flip"})
    assert r.status_code == 200, r.text
    other = make_checkpoint(tmp_path / "other", seed=4)  # a tiny model: another base
    for path in (other, tmp_path / "nowhere"):
        r = post(server, load, {"name": "more", "path": str(path)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "path", r.text
        assert str(path) in r.json()["error"]["message"]
    r = post(server, load, {"name": "flip", "path": str(flip)})  # back in slot 1
    assert r.status_code == 200 and r.json()["slot"] == 1, r.text
    # Unloading while a stream of 'extra' runs: refused at once with timeout_s 0, else waits.
    body = {"model": "extra", "prompt": prompts[0], "max_tokens": 200, "ignore_eos": True}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    streamed: list[str] = []
    started = threading.Event()

    def stream() -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream(
            "POST", server["base"] + "/v1/completions", json=body,
            headers=headers, timeout=120,
        ) as s:  # fmt: skip
            for line in s.iter_lines():
                started.set()
                streamed.append(line)

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    r = post(server, unload, {"name": "extra", "timeout_s": 0})
    assert r.status_code == 409 and r.json()["error"]["code"] == "checkpoint_busy", r.text
    r = post(server, unload, {"name": "extra", "timeout_s": 120})
    reader.join()
    assert r.status_code == 200, r.text
    events = [json.loads(x[6:]) for x in streamed if x.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 200  # the stream ran to its end
    assert [x for x in streamed if x][-1] == "data: [DONE]"
    assert complete(server, "extra", prompts[0]).status_code == 404
    # Loaded again: serves its own answers again.
    assert post(server, load, {"name": "extra", "path": str(flip)}).status_code == 200
    assert answer(complete(server, "extra", prompts[2])) == refs.tokens("flip", prompts[2])
    assert post(server, unload, {"name": "extra"}).status_code == 200
