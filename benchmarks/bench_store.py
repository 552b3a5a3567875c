"""`make bench-store`: the checkpoint store under open-loop traffic. One random Llama and 64
router variants of one random ReMix checkpoint over it; Poisson arrivals, each request for a
checkpoint drawn from Zipf(1.0) popularity; served three ways by a real remix-serve:

    store      --checkpoint-dir of 64, 8 slots, 32 in the host tier (loads on first use, LRU)
    8 loaded   8 checkpoints given with --checkpoint (the same traffic over 8, never evicted)
    1          one checkpoint (all traffic to it)

Each way runs every rate of --rates in turn on one server: the default 3 requests/s is light,
150 saturates the engine on a 2-core CPU (so tokens/s is what each way can serve). Reports
throughput (generated tokens/s), p50/p99 time to first token (streamed), errors, mismatches
(answers that differ from their checkpoint's reference greedy tokens, remix_infer.modeling),
hit rate and loads per second (the store's metrics), and the store's load times from its log.
The variants are chosen to answer apart (tests/reference.py distinct_variants), so an answer
from the wrong checkpoint counts as a mismatch.

Then the stall (store only): one request for a loaded checkpoint streams --stall-tokens tokens
while one-token requests arrive every --stall-interval s, first for other loaded checkpoints
(quiet), then for ones not in a slot (each a load); the stream's gaps between tokens in both.
Last, the engine's own pause for one load (the load RPC, in this process, no traffic), which
the stall is held against.
Results: benchmarks/results/<UTC time>-<machine>-store.json and .png. Small sizes by default
(2-core CPU machine); --rates, --seconds, --max-tokens scale it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import common  # noqa: F401 - puts the checkout and tests/ on sys.path
import httpx
from common import build_random_llama, build_random_remix, machine, save_results
from helpers.servers import SMALL_ENGINE, running_server, scrape
from reference import distinct_variants

WORK = Path(__file__).resolve().parents[1] / ".cache" / "bench-store"


PROMPTS = 2  # random 8-token prompts; each request picks one
LORA_B_NOISE = 0.05  # the random template's B matrices are 0.02: variants answer apart
MIN_MARGIN = 2e-4  # each greedy token's lead over the runner-up, far above float32 noise


class Checkpoints:
    """The variants (c00, c01, ...) in one folder, the prompts and each variant's reference
    answers as the server's logprobs name the tokens (the word tokenizer: token i is `wi`)."""

    def __init__(self, count: int, max_tokens: int) -> None:
        base = build_random_llama(WORK / "base", hidden=256, layers=4, vocab=2000)
        template = build_random_remix(WORK / "template", base, n=8, k=2, r=8)
        rng = random.Random(0)
        self.prompts = [[rng.randrange(3, 2000) for _ in range(8)] for _ in range(PROMPTS)]
        self.folder = WORK / "variants"
        tokens = self._variants(template, count, max_tokens)
        self.answers = {
            (name, i): [f"w{t}" for t in answer]
            for name, answers in tokens.items()
            for i, answer in enumerate(answers)
        }
        self.names = sorted(tokens)

    def _variants(self, template: Path, count: int, max_tokens: int) -> dict:
        """The variants and their reference tokens, chosen again only when the settings changed
        (choosing 64 takes minutes on 2 cores)."""
        settings = [count, max_tokens, self.prompts, LORA_B_NOISE, MIN_MARGIN]
        cache = self.folder / "references.json"  # a file: the store lists folders only
        if cache.exists() and json.loads(cache.read_text())["settings"] == settings:
            return json.loads(cache.read_text())["tokens"]
        shutil.rmtree(self.folder, ignore_errors=True)
        tokens = distinct_variants(
            template, self.folder, count, self.prompts, max_tokens, LORA_B_NOISE, MIN_MARGIN
        )
        cache.write_text(json.dumps({"settings": settings, "tokens": tokens}))
        return tokens


def zipf_weights(n: int) -> list[float]:
    return [1.0 / (i + 1) for i in range(n)]


async def one(
    client: httpx.AsyncClient,
    model: str,
    prompt: list[int],
    max_tokens: int,
    times: list[float] | None = None,
) -> tuple[int, float, list[str]]:
    """(status, time to first token, the tokens as logprobs name them) of one streamed
    request (status 0: the connection failed); times: each token's arrival (perf_counter) is
    appended to it."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "logprobs": 0}
    body |= {"stream": True, "ignore_eos": True, "temperature": 0}
    t0 = time.perf_counter()
    ttft, tokens = float("nan"), []
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, ttft, tokens
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    logprobs = choices[0]["logprobs"] if choices else None
                    new = logprobs["tokens"] if logprobs else []
                    if new and not tokens:
                        ttft = time.perf_counter() - t0
                    if new and times is not None:
                        times.append(time.perf_counter())
                    tokens += new
    except httpx.TransportError as e:
        print(f"{model}: {type(e).__name__}: {e}", file=sys.stderr)
        return 0, ttft, tokens  # counted as an error
    return 200, ttft, tokens


async def warm_up(base: str, model: str, ckpts: Checkpoints, args: argparse.Namespace) -> None:
    """Two bursts of 8 requests for the most popular checkpoint, left out of the figures: a
    fresh engine's first batches are slow."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        for _ in range(2):
            jobs = [one(client, model, ckpts.prompts[0], args.max_tokens) for _ in range(8)]
            await asyncio.gather(*jobs)


async def traffic(
    base: str, models: list[str], ckpts: Checkpoints, rate: float, args: argparse.Namespace
) -> dict:
    rng = random.Random(0)
    weights = zipf_weights(len(models))
    tasks, jobs = [], []
    # open connections at most: enough to keep every engine sequence busy (--max-num-seqs 32)
    # keep-alive shorter than the server's (uvicorn: 5 s), so no request goes out on a
    # connection the server is closing
    limits = httpx.Limits(max_connections=256, keepalive_expiry=1.0)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        t0 = arrival = time.perf_counter()
        while arrival - t0 < args.seconds:
            # to the arrival's time, not for a gap: a busy client catches up, offering it all
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            job = (rng.choices(models, weights)[0], rng.randrange(len(ckpts.prompts)))
            prompt = ckpts.prompts[job[1]]
            tasks.append(asyncio.create_task(one(client, job[0], prompt, args.max_tokens)))
            jobs.append(job)
            arrival += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [(job, r) for job, r in zip(jobs, results, strict=True) if r[0] == 200]
    ttfts = sorted(r[1] for _, r in ok)
    pick = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None  # noqa: E731
    return {
        "rate": rate,
        "requests": len(results),
        "errors": len(results) - len(ok),
        # 503: waited --load-timeout-s for a slot (every slot busy); 0: the connection failed
        "errors_by_status": dict(Counter(str(r[0]) for r in results if r[0] != 200)),
        "mismatches": sum(r[2] != ckpts.answers[job] for job, r in ok),
        "tokens_per_s": sum(len(r[2]) for _, r in ok) / wall,
        "ttft_p50_s": pick(0.5),
        "ttft_p99_s": pick(0.99),
        "seconds": wall,
    }


def counted(before: dict, after: dict, name: str) -> float:
    """How much the counter `name` (all its series) grew from one scrape to the next."""
    total = lambda samples: sum(v for (n, _), v in samples.items() if n == name)  # noqa: E731
    return total(after) - total(before)


def loads_by_source(before: dict, after: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), value in after.items():
        if name == "remix_checkpoint_loads_total":
            source = dict(labels)["source"]
            out[source] = out.get(source, 0) + value - before.get((name, labels), 0)
    return out


def store_figures(before: dict, after: dict, seconds: float) -> dict:
    hits = counted(before, after, "remix_checkpoint_hits_total")
    misses = counted(before, after, "remix_checkpoint_misses_total")
    return {
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "loads_per_s": counted(before, after, "remix_checkpoint_loads_total") / seconds,
    }


def load_seconds(log: Path) -> dict[str, list[float]]:
    """The store's loads from its log, by source: seconds from the staged read's start until
    the checkpoint serves (server/store.py logs each)."""
    out: dict[str, list[float]] = {}
    for m in re.finditer(r"loaded '\w+' into slot \d+ from (\w+) in ([\d.]+) s", log.read_text()):
        out.setdefault(m[1], []).append(float(m[2]))
    return out


def quantiles(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {"count": 0}
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"count": len(values), "p50": pick(0.5), "p99": pick(0.99), "max": values[-1]}


async def stream_beside(
    client: httpx.AsyncClient,
    streamed: str,
    others: list[str],
    ckpts: Checkpoints,
    args: argparse.Namespace,
) -> dict:
    """The gaps between the tokens of one long streamed request for `streamed`, while a
    one-token request for the next of `others` arrives every --stall-interval s; gaps that
    overlap such a request's wait for its first token (its load, for a miss) count as `during`."""
    times: list[float] = []
    prompt = ckpts.prompts[0]
    stream = asyncio.create_task(one(client, streamed, prompt, args.stall_tokens, times))

    async def poke(model: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        _, ttft, _ = await one(client, model, prompt, 1)
        return t0, t0 + ttft

    pokes = []
    while not stream.done():
        await asyncio.sleep(args.stall_interval)
        pokes.append(asyncio.create_task(poke(others[len(pokes) % len(others)])))
    status, _, tokens = await stream
    windows = await asyncio.gather(*pokes)
    gaps = [(a, b) for a, b in zip(times, times[1:], strict=False)]
    during = [b - a for a, b in gaps if any(a < e and b > s for s, e in windows)]
    return {
        "status": status,
        "tokens": len(tokens),
        "requests_beside": len(pokes),
        "gaps_s": quantiles([b - a for a, b in gaps]),
        "gaps_during_beside_s": quantiles(during),
        "gaps_ms": [round((b - a) * 1000, 2) for a, b in gaps],
    }


async def stall(server: dict, ckpts: Checkpoints, args: argparse.Namespace) -> dict:
    """Quiet: the requests beside are for other loaded checkpoints (hits); loading: for
    checkpoints in no slot (each a load, evicting an idle one)."""
    async with httpx.AsyncClient(base_url=server["base"], timeout=600) as client:
        listed = (await client.get("/v1/models")).json()["data"]
        loaded = [m["id"] for m in listed if m["status"] == "loaded"]
        elsewhere = [m["id"] for m in listed if m["status"] != "loaded"]
        out = {"streamed": loaded[0]}
        for phase, others in (("quiet", loaded[1:]), ("loading", elsewhere)):
            before = scrape(server)
            out[phase] = await stream_beside(client, loaded[0], others, ckpts, args)
            out[phase]["loads"] = loads_by_source(before, scrape(server))
    return out


def engine_pause(ckpts: Checkpoints, repeats: int = 10) -> dict[str, float]:
    """The engine's own figures for one load into an eight-slot engine of these variants, in
    this process with no traffic (bench_engine.reload_timings, medians): the staged read, and
    the unload and load RPCs, during which the engine runs no step."""
    from bench_engine import reload_timings
    from helpers.engines import remix_llm

    slots = {name: ckpts.folder / name for name in ckpts.names[:8]}
    with remix_llm(slots, max_model_len=256) as llm:
        return reload_timings(llm, ckpts.folder / ckpts.names[8], repeats)


def run(
    name: str, flags: list[str], models: list[str], ckpts: Checkpoints, args: argparse.Namespace
) -> dict:
    """Every rate in turn on one server (the store: then the stall)."""
    log = WORK / f"{name.replace(' ', '-')}.log"
    flags = [*flags, *SMALL_ENGINE, "--max-model-len", "256", "--max-queue", "10000"]
    out: dict = {}
    with running_server(None, log, flags, timeout=600) as server:
        asyncio.run(warm_up(server["base"], models[0], ckpts, args))
        for rate in args.rates:
            before = scrape(server)
            figures = asyncio.run(traffic(server["base"], models, ckpts, rate, args))
            out[f"rate {rate:g}"] = figures | store_figures(
                before, scrape(server), figures["seconds"]
            )
            print(name, json.dumps(out[f"rate {rate:g}"]), flush=True)
        if name == "store":
            out["stall"] = asyncio.run(stall(server, ckpts, args))
            print(name, "stall", json.dumps(out["stall"]), flush=True)
        out["load_seconds"] = {k: quantiles(v) for k, v in load_seconds(log).items()}
    return out


def plot(results: dict, rates: list[float], out: Path) -> None:
    """Tokens/s of each way of serving at each rate; time to first token (p50, p99) at the
    first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in results if f"rate {rates[0]:g}" in results[name]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        xs = [j + width * i for j in range(len(names))]
        left.bar(xs, [results[n][f"rate {rate:g}"]["tokens_per_s"] for n in names], width,
                 label=f"{rate:g} requests/s")  # fmt: skip
    left.set_xticks([j + width * (len(rates) - 1) / 2 for j in range(len(names))], names)
    left.set_ylabel("generated tokens/s")
    left.legend()
    first = f"rate {rates[0]:g}"
    for i, q in enumerate(("ttft_p50_s", "ttft_p99_s")):
        xs = [j + 0.4 * i for j in range(len(names))]
        right.bar(xs, [results[n][first][q] * 1000 for n in names], 0.4, label=q[5:8])
    right.set_xticks([j + 0.2 for j in range(len(names))], names)
    right.set_ylabel(f"time to first token (ms), {rates[0]:g} requests/s")
    right.legend()
    hit = results["store"][first]["hit_rate"]
    fig.suptitle(f"64 checkpoints in 8 slots (hit rate {hit:.2f} at {rates[0]:g}/s) vs 8 vs 1")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", type=lambda v: [float(r) for r in v.split(",")], default=[3.0, 150.0],
                   help="requests per second (Poisson), comma-separated: each in turn")  # fmt: skip
    p.add_argument("--seconds", type=float, default=20.0, help="arrivals for this long")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--checkpoints", type=int, default=64)
    p.add_argument("--stall-tokens", type=int, default=200)
    p.add_argument("--stall-interval", type=float, default=0.25)
    args = p.parse_args()
    load_before = os.getloadavg()  # the machine may be shared: how busy it was
    ckpts = Checkpoints(args.checkpoints, args.max_tokens)
    store = ["--checkpoint-dir", str(ckpts.folder), "--max-checkpoints", "8"]
    store += ["--max-host-checkpoints", "32"]
    eight = [f"--checkpoint={n}={ckpts.folder / n}" for n in ckpts.names[:8]]
    results = {
        "store": run("store", store, ckpts.names, ckpts, args),
        "8 loaded": run("8 loaded", eight, ckpts.names[:8], ckpts, args),
        "1": run(
            "1", ["--checkpoint", str(ckpts.folder / ckpts.names[0])], ckpts.names[:1], ckpts, args
        ),  # fmt: skip
    }
    results["engine pause"] = engine_pause(ckpts)
    print("engine pause", json.dumps(results["engine pause"]), flush=True)
    load = {"before": load_before, "after": os.getloadavg()}
    info = {"machine": machine(), "load_average": load, "args": vars(args)}
    path = save_results("store", info | {"results": results})
    plot(results, args.rates, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
