"""`make bench-store`: the checkpoint store under open-loop traffic. One random Llama and 64
router variants of one random ReMix checkpoint over it; Poisson arrivals, each request for a
checkpoint drawn from Zipf(1.0) popularity; served three ways by a real remix-serve:

    store      --checkpoint-dir of 64, 8 slots, 32 in the host tier (loads on first use, LRU)
    8 loaded   8 checkpoints given with --checkpoint (the same traffic over 8, never evicted)
    1          one checkpoint (all traffic to it)

Reports throughput (generated tokens/s), p50/p99 time to first token (streamed), errors, hit
rate and loads per second (the store's metrics). Small sizes by default (2-core CPU machine);
--rate, --seconds, --max-tokens scale it."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import common  # noqa: F401 - puts the checkout and tests/ on sys.path
import httpx
from common import RESULTS, build_random_llama, build_random_remix, machine
from helpers.models import router_variant
from helpers.servers import SMALL_ENGINE, running_server, scrape

WORK = Path(__file__).resolve().parents[1] / ".cache" / "bench-store"


def build(count: int) -> tuple[Path, list[Path]]:
    base = build_random_llama(WORK / "base", hidden=256, layers=4, vocab=2000)
    template = build_random_remix(WORK / "template", base, n=8, k=2, r=8)
    folder = WORK / "checkpoints"
    for i in range(count):
        if not (folder / f"c{i:02d}" / "remix_config.json").exists():
            router_variant(template, folder / f"c{i:02d}", seed=i + 1)
    return folder, sorted(folder.iterdir())


def zipf_weights(n: int) -> list[float]:
    return [1.0 / (i + 1) for i in range(n)]


async def one(client: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[int, float, int]:
    """(status, time to first token, tokens) of one streamed request."""
    body = {"model": model, "prompt": "w5 w6 w7 w8 w9 w10 w11 w12", "max_tokens": max_tokens}
    body |= {"stream": True, "ignore_eos": True, "temperature": 0}
    t0 = time.perf_counter()
    ttft, tokens = float("nan"), 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, ttft, 0
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"text"' in line:
                tokens += 1
                if tokens == 1:
                    ttft = time.perf_counter() - t0
    return 200, ttft, tokens


async def traffic(base: str, models: list[str], args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    weights = zipf_weights(len(models))
    tasks = []
    limits = httpx.Limits(max_connections=1000)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            model = rng.choices(models, weights)[0]
            tasks.append(asyncio.create_task(one(client, model, args.max_tokens)))
            await asyncio.sleep(rng.expovariate(args.rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ttfts = sorted(t for s, t, _ in results if s == 200)
    pick = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None  # noqa: E731
    return {
        "requests": len(results),
        "errors": sum(s != 200 for s, _, _ in results),
        "tokens_per_s": sum(n for *_, n in results) / wall,
        "ttft_p50_s": pick(0.5),
        "ttft_p99_s": pick(0.99),
        "seconds": wall,
    }


def store_figures(before: dict, after: dict, seconds: float) -> dict:
    def total(name: str) -> float:
        return sum(v for (n, _), v in after.items() if n == name) - sum(
            v for (n, _), v in before.items() if n == name
        )

    hits, misses = total("remix_checkpoint_hits_total"), total("remix_checkpoint_misses_total")
    return {
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "loads_per_s": total("remix_checkpoint_loads_total") / seconds,
    }


def run(name: str, flags: list[str], models: list[str], args: argparse.Namespace) -> dict:
    log = WORK / f"{name.replace(' ', '-')}.log"
    flags = [*flags, *SMALL_ENGINE, "--max-model-len", "256", "--max-queue", "1000"]
    with running_server(None, log, flags, timeout=600) as server:
        before = scrape(server)
        out = asyncio.run(traffic(server["base"], models, args))
        out |= store_figures(before, scrape(server), out["seconds"])
    print(name, json.dumps(out))
    return out


def plot(results: dict, out: Path) -> None:
    """Time to first token (p50, p99) of each way of serving, and the store's hit rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, q in enumerate(("ttft_p50_s", "ttft_p99_s")):
        xs = [j + 0.4 * i for j in range(len(names))]
        ax.bar(xs, [results[n][q] * 1000 for n in names], 0.4, label=q[5:8])
    ax.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax.set_ylabel("time to first token (ms)")
    hit = results["store"]["hit_rate"]
    ax.set_title(f"64 checkpoints in 8 slots (hit rate {hit:.2f}) vs 8 loaded vs 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=3.0, help="requests per second (Poisson)")
    p.add_argument("--seconds", type=float, default=20.0, help="arrivals for this long")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--checkpoints", type=int, default=64)
    args = p.parse_args()
    folder, paths = build(args.checkpoints)
    names = [path.name for path in paths]
    results = {
        "store": run(
            "store",
            ["--checkpoint-dir", str(folder), "--max-checkpoints", "8"]
            + ["--max-host-checkpoints", "32"],
            names,
            args,
        ),
        "8 loaded": run(
            "8 loaded", [f"--checkpoint={p.name}={p}" for p in paths[:8]], names[:8], args
        ),
        "1": run("1", ["--checkpoint", str(paths[0])], names[:1], args),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench-store.json"
    out.write_text(
        json.dumps({"machine": machine(), "args": vars(args), "results": results}, indent=1)
    )
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
