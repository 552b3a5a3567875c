"""The checkpoint store in one real `remix-serve` (vLLM engine): 16 checkpoints in a
--checkpoint-dir (the quick demo with other routers and noisy LoRA B matrices each, chosen so
that every two answer apart), 4 slots, 8 in the host tier. Each answer is its own checkpoint's
reference greedy answer (remix_infer.modeling): loaded on first use, after eviction and reload,
from the host tier, under 64 concurrent clients, with a request in flight while others churn
the slots; a bad folder, a removed folder, and a restart over the same directory. The store's logic against the fake engine: test_store.py."""

from __future__ import annotations

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers.servers import SMALL_ENGINE, running_server, scrape
from reference import distinct_variants

from remix_infer.checkpoint import load_checkpoint
from remix_infer.config import ADAPTERS_FILE

pytestmark = pytest.mark.slow

KEY = "admin-key"
MAX_TOKENS = 6
NAMES = [f"c{i:02d}" for i in range(16)]


LORA_B_NOISE = 0.15  # the quick demo's LoRAs barely trained: other routers alone answer alike
MIN_MARGIN = 0.02  # each greedy token's lead over the runner-up, far above float32 noise


class References:
    """16 variants of the demo in `directory` (c00..c15) and each one's reference greedy
    answers to 3 eval prompts, token by token as the logprobs name them."""

    def __init__(self, demo: Path, directory: Path) -> None:
        from transformers import AutoTokenizer

        self.directory = directory
        tokenizer = AutoTokenizer.from_pretrained(load_checkpoint(demo).base_model_path)
        lines = (demo / "data" / "eval.jsonl").read_text().splitlines()[:3]
        self.prompts = [tokenizer.encode(json.loads(line)["prompt"]) for line in lines]
        tokens = distinct_variants(
            demo, directory, len(NAMES), self.prompts, MAX_TOKENS, LORA_B_NOISE, MIN_MARGIN,
            # a lone byte of a longer character: its logprobs text is '' in vLLM, '\ufffd' here
            readable=lambda token: "\ufffd" not in tokenizer.decode([token]),
        )  # fmt: skip
        self.answers = {
            (name, i): [tokenizer.decode([t]) for t in answer]
            for name, answers in tokens.items()
            for i, answer in enumerate(answers)
        }


@pytest.fixture(scope="module")
def refs(demo_checkpoint, tmp_path_factory) -> References:
    refs = References(demo_checkpoint, tmp_path_factory.mktemp("store") / "checkpoints")
    answers = {tuple(tuple(refs.answers[name, i]) for i in range(3)) for name in NAMES}
    # every pair differs in some prompt's answer, so an answer from the wrong checkpoint shows
    assert len(answers) == len(NAMES), answers
    return refs


@pytest.fixture(scope="module")
def directory(refs) -> Path:
    return refs.directory


def server_args(directory: Path) -> list[str]:
    args = ["--checkpoint-dir", str(directory), "--max-checkpoints", "4"]
    args += ["--max-host-checkpoints", "8", "--load-timeout-s", "120", "--api-key", KEY]
    return args + [*SMALL_ENGINE, "--max-model-len", "256"]


@pytest.fixture(scope="module")
def server(directory, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("store-server") / "server.log"
    with running_server(None, log_path, server_args(directory), timeout=600) as s:
        yield s


def complete(server: dict, model: str, ids: list[int], max_tokens: int = MAX_TOKENS):  # noqa: ANN201
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0}
    body |= {"ignore_eos": True, "logprobs": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.post(server["base"] + "/v1/completions", json=body, headers=headers, timeout=300)


def check_answer(server: dict, refs: References, name: str, i: int) -> None:
    r = complete(server, name, refs.prompts[i])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"]["tokens"] == refs.answers[name, i], name


def models(server: dict) -> dict[str, tuple[str, int | None]]:
    r = httpx.get(server["base"] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    return {m["id"]: (m["status"], m["slot"]) for m in r.json()["data"]}


def loads(server: dict) -> dict[tuple[str, str], float]:
    """The loads counted, by (model, source) (a checkpoint in a slot also has zero series)."""
    return {
        (dict(k)["model"], dict(k)["source"]): v
        for (n, k), v in scrape(server).items()
        if n == "remix_checkpoint_loads_total" and v
    }


def load_seconds(server: dict) -> list[tuple[str, str, float]]:
    """(model, source, seconds) of every load, from the server's log."""
    pattern = re.compile(r"loaded '(\w+)' into slot \d+ from (\w+) in ([\d.]+) s")
    return [(m[1], m[2], float(m[3])) for m in pattern.finditer(server["log"].read_text())]


# ---------------------------------------------------------------------------------------------


def test_first_use_eviction_and_host_tier(server, refs):
    """c00 sizes the slots and starts in slot 0; c01..c03 load into the free slots on first use,
    c04 evicts c00 (least recently used), c00 evicts c01, and c01 comes back from the host tier.
    Every answer is its own checkpoint's; routing series exist for the loaded ones only, and
    count their own tokens only."""
    listed = models(server)
    assert listed["c00"] == ("loaded", 0) and len(listed) == 16
    assert all(listed[n] == ("available", None) for n in NAMES[1:])
    for name in ("c01", "c02", "c03", "c04", "c00", "c01"):
        check_answer(server, refs, name, 0)
    assert loads(server) == {
        ("c01", "disk"): 1, ("c02", "disk"): 1, ("c03", "disk"): 1, ("c04", "disk"): 1,
        ("c00", "disk"): 1, ("c01", "host"): 1,
    }  # fmt: skip
    listed = models(server)
    assert {n for n, (status, _) in listed.items() if status == "loaded"} == {
        "c00", "c01", "c03", "c04"
    }  # fmt: skip
    assert listed["c02"] == ("host", None)
    routed: dict[str, dict[tuple[str, str], float]] = {}
    for (n, k), tokens in scrape(server).items():
        if n == "remix_routed_tokens_total":
            labels = dict(k)
            routed.setdefault(labels["checkpoint"], {})[labels["layer"], labels["module"]] = tokens
    assert set(routed) == {"c00", "c01", "c03", "c04"}
    # One request each since its load; c00 and c01 went into slots that had served c01 and c02
    # (evicted, not emptied first: the load zeroes the slot's statistics), c03 into a new one.
    assert all(routed[name] == routed["c03"] for name in routed), routed
    from_host = [s for _, source, s in load_seconds(server) if source == "host"]
    from_disk = [s for _, source, s in load_seconds(server) if source == "disk"]
    print(f"load seconds: disk {from_disk}, host {from_host}")


def test_64_clients_over_16_checkpoints_in_4_slots(server, refs):
    jobs = [(NAMES[i % 16], i % 3) for i in range(64)]

    def run(job: tuple[str, int]) -> tuple[int, list[str] | str]:
        r = complete(server, job[0], refs.prompts[job[1]])
        if r.status_code != 200:
            return r.status_code, r.text
        return 200, r.json()["choices"][0]["logprobs"]["tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run, jobs))
    seconds = time.perf_counter() - t0
    errors = [(job, r) for job, r in zip(jobs, results, strict=True) if r[0] != 200]
    assert not errors, errors[:3]
    wrong = [job for job, r in zip(jobs, results, strict=True) if r[1] != refs.answers[job]]
    assert not wrong, wrong
    samples = scrape(server)
    assert samples[("remix_checkpoint_requests_waiting_for_load", ())] == 0
    print(f"64 requests over 16 checkpoints in 4 slots: {seconds:.1f} s")


def test_a_request_in_flight_is_never_evicted(server, refs):
    """A long request for c05 runs while 8 other checkpoints take turns in the other slots: c05
    is the least recently used (taken first), yet never evicted; it finishes whole with its own
    answer."""

    def evictions() -> float:
        return scrape(server).get(("remix_checkpoint_evictions_total", (("model", "c05"),)), 0)

    check_answer(server, refs, "c05", 1)  # loaded
    before = evictions()
    longest = 255 - len(refs.prompts[1])

    def timed(work, *args):  # noqa: ANN001, ANN202
        return work(*args), time.perf_counter()

    with ThreadPoolExecutor(9) as pool:
        long = pool.submit(timed, complete, server, "c05", refs.prompts[1], longest)
        time.sleep(0.2)
        churn = [pool.submit(timed, check_answer, server, refs, n, 2) for n in NAMES[6:14]]
        r, done = long.result()
        first = min(f.result()[1] for f in churn)
    assert first < done  # churn ran while the long request was in flight
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == longest and tokens[:MAX_TOKENS] == refs.answers["c05", 1]
    assert evictions() == before


def test_bad_folder_and_removed_folder(server, refs, directory, tmp_path, caplog):
    broken = Path(shutil.copytree(directory / "c15", tmp_path / "broken"))
    (broken / ADAPTERS_FILE).write_bytes(b"\x00" * 64)
    broken.rename(directory / "broken")
    for _ in range(2):
        r = complete(server, "broken", refs.prompts[0])
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert str(directory / "broken" / ADAPTERS_FILE) in message
    assert server["log"].read_text().count(f"{directory / 'broken' / ADAPTERS_FILE}:") == 1
    assert "broken" not in models(server)
    check_answer(server, refs, "c15", 0)  # the others serve on
    shutil.rmtree(directory / "c15")  # loaded, idle
    assert "c15" not in models(server)
    assert complete(server, "c15", refs.prompts[0]).status_code == 404
    deadline = time.time() + 30  # unloaded at the next periodic scan
    while "evicted 'c15'" not in server["log"].read_text().split("loaded 'c15'")[-1]:
        assert time.time() < deadline, "c15 was not unloaded"
        time.sleep(0.5)
    shutil.rmtree(directory / "broken")


def test_restart_with_the_same_directory_serves_the_same_models(server, refs, directory, tmp_path):
    before = set(models(server))
    server["proc"].terminate()  # the shared server: this file's last test
    server["proc"].wait(timeout=60)
    with running_server(None, tmp_path / "again.log", server_args(directory), timeout=600) as s:
        assert set(models(s)) == before
        check_answer(s, refs, "c07", 1)
        check_answer(s, refs, "c00", 1)
