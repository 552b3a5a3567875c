"""Serving benchmark: four HTTP servers on one random model, driven by the same seeded workload.

    remix      remix-serve with a ReMix checkpoint (n = 8, k = 4, r = 8 on all seven projections)
    base       remix-serve with the same base model and no adapters (--base-model)
    vllm_lora  vLLM's own OpenAI server with one ordinary LoRA of rank k*r = 32 on the same
               projections (--enable-lora), requests addressed to the LoRA
    vllm_base  vLLM's own OpenAI server on the base model

All four start once and stay up (an idle vLLM server uses no CPU); the measurements then take
turns, server by server, in an order that reverses every round, so drift of the (shared) machine
falls on all of them alike. Each round runs, per server, a closed-loop run (a fixed number of
clients, each sending its next request when the last one ends: saturation throughput); the first
round also runs open-loop runs (Poisson arrivals at fixed rates, chosen from the base server's
first closed-loop throughput). Requests stream (`stream_options.include_usage`), ignore EOS, and use token-id
prompts; lengths come from a seeded distribution, identical for every server.

Prints a table, then one JSON line with the saturation throughput ratios; writes
benchmarks/results/<date>-<machine>-serve.json and a PNG of throughput against latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import (
    build_peft_lora,
    build_random_llama,
    build_random_remix,
    free_port,
    git_revision,
    machine,
    save_results,
    server_env,
)
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("remix", "base", "vllm_lora", "vllm_base")
LORA_NAME = "lora32"


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    name: str
    url: str
    model: str  # the `model` field of requests
    ready_path: str  # 200 once the engine can take requests
    process: subprocess.Popen
    log: Path


def server_commands(args: argparse.Namespace, base: Path, remix: Path, lora: Path) -> dict:
    """name -> (command, model name in requests, readiness path). Same engine settings for all."""
    engine = ["--dtype", "float32", "--max-model-len", str(args.max_model_len)]
    engine += ["--max-num-seqs", str(args.max_num_seqs)]
    engine += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    engine += [] if args.compiled else ["--enforce-eager"]
    remix_serve = [sys.executable, "-m", "server.cli", "--kv-cache-gib", str(args.kv_cache_gib)]
    vllm = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base)]
    vllm += ["--served-model-name", "base", "--gpu-memory-utilization", "0.5", "--seed", "0"]
    lora_flags = ["--enable-lora", "--max-lora-rank", "32", "--max-loras", "1"]
    lora_flags += ["--lora-modules", f"{LORA_NAME}={lora}"]
    return {
        "remix": (
            [*remix_serve, "--checkpoint", str(remix), "--served-model-name", "remix", *engine],
            "remix",
            "/ready",
        ),
        "base": (
            [*remix_serve, "--base-model", str(base), "--served-model-name", "base", *engine],
            "base",
            "/ready",
        ),
        "vllm_lora": ([*vllm, *lora_flags, *engine], LORA_NAME, "/health"),
        "vllm_base": ([*vllm, *engine], "base", "/health"),
    }


@contextlib.contextmanager
def running_servers(commands: dict, kv_cache_gib: int, log_dir: Path) -> Iterator[dict]:
    """Starts every server, waits until all are ready, and stops them at the end."""
    env = server_env(VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
    servers: dict[str, Server] = {}
    try:
        for name, (cmd, model, ready_path) in commands.items():
            port = free_port()
            log = log_dir / f"{name}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    [*cmd, "--host", "127.0.0.1", "--port", str(port)],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            servers[name] = Server(name, f"http://127.0.0.1:{port}", model, ready_path, proc, log)
        wait_ready(list(servers.values()))
        yield servers
    finally:
        for s in servers.values():
            s.process.terminate()
        for s in servers.values():
            try:
                s.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                s.process.kill()


def wait_ready(servers: list[Server], timeout_s: float = 900) -> None:
    pending = {s.name: s for s in servers}
    deadline = time.time() + timeout_s
    with tqdm(total=len(servers), desc="starting servers", unit="server") as bar:
        while pending:
            for name, s in list(pending.items()):
                if s.process.poll() is not None:
                    tail = s.log.read_text()[-3000:]
                    raise RuntimeError(f"server {name} exited while starting:\n{tail}")
                try:
                    if httpx.get(s.url + s.ready_path, timeout=2).status_code == 200:
                        del pending[name]
                        bar.update()
                except httpx.TransportError:
                    pass
            if time.time() > deadline:
                raise RuntimeError(f"servers not ready after {timeout_s} s: {sorted(pending)}")
            time.sleep(1)


# ---------------------------------------------------------------------------------------------
# Workload and load generation


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int


def make_workload(count: int, args: argparse.Namespace, seed: int) -> list[Request]:
    """Seeded prompt and output lengths (uniform in the given ranges), random token ids."""
    rng = random.Random(seed)
    return [
        Request(
            [rng.randrange(3, args.vocab) for _ in range(rng.randint(*args.prompt_len))],
            rng.randint(*args.output_len),
        )
        for _ in range(count)
    ]


@dataclass
class Result:
    ok: bool
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)  # per generated token after the first
    output_tokens: int = 0
    error: str | None = None


async def send(client: httpx.AsyncClient, server: Server, req: Request) -> Result:
    """One streamed completion. A chunk may carry several tokens when the client falls behind;
    its gap is split evenly over them (the tokenizer decodes one word per token)."""
    body = {
        "model": server.model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = Result(ok=False, start=time.perf_counter())
    last = res.start
    try:
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                words = len(chunk["choices"][0]["text"].split()) if chunk.get("choices") else 0
                if words:
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - res.start
                        res.itls += [0.0] * (words - 1)  # came with the first token
                    else:
                        res.itls += [(now - last) / words] * words
                    last = now
    except httpx.HTTPError as e:
        res.error = repr(e)[:200]
        return res
    res.end = time.perf_counter()
    res.ok = res.output_tokens == req.max_tokens
    if not res.ok:
        res.error = f"{res.output_tokens} tokens of {req.max_tokens}"
    return res


async def closed_loop(server: Server, work: list[Request], clients: int, bar: tqdm) -> list:
    queue = list(reversed(work))
    results: list[Result] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            results.append(await send(client, server, queue.pop()))
            bar.update()

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(client_loop(c) for _ in range(clients)))
    return results


async def open_loop(server: Server, work: list[Request], rate: float, seed: int, bar: tqdm):  # noqa: ANN201
    """Poisson arrivals at `rate` requests/s, whatever the server's progress (open loop)."""
    rng = random.Random(seed)

    async def one(client: httpx.AsyncClient, delay: float, req: Request) -> Result:
        await asyncio.sleep(delay)
        res = await send(client, server, req)
        bar.update()
        return res

    delays, t = [], 0.0
    for _ in work:
        delays.append(t)
        t += rng.expovariate(rate)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as c:
        return await asyncio.gather(*(one(c, d, r) for d, r in zip(delays, work, strict=True)))


def cpu_seconds(server: Server) -> tuple[float, float]:
    """CPU seconds used so far by the HTTP server process and by its children (vLLM's engine
    core and workers): their split shows what the HTTP layer costs."""
    import psutil

    proc = psutil.Process(server.process.pid)

    def used(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    return used(proc), sum(used(c) for c in proc.children(recursive=True))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(results: list[Result]) -> dict:
    good = [r for r in results if r.ok]
    span = max(r.end for r in good) - min(r.start for r in good) if good else 0.0
    tokens = sum(r.output_tokens for r in good)
    ttfts = [r.ttft for r in good if r.ttft is not None]
    itls = [x for r in good for x in r.itls]
    out = {
        "requests": len(results),
        "errors": len(results) - len(good),
        "first_error": next((r.error for r in results if not r.ok), None),
        "requests_per_s": len(good) / span if span else 0.0,
        "output_tokens_per_s": tokens / span if span else 0.0,
    }
    for name, values in (("ttft", ttfts), ("itl", itls)):
        for q in (50, 90, 99):
            v = percentile(values, q)
            out[f"{name}_p{q}_ms"] = v * 1e3 if v is not None else None
    return out


# ---------------------------------------------------------------------------------------------
# The benchmark


def run_rounds(servers: dict[str, Server], args: argparse.Namespace) -> dict:
    """Per server: closed-loop results per round and open-loop results per rate and round."""
    closed_work = make_workload(args.requests, args, seed=1)
    open_work = make_workload(args.open_requests, args, seed=2)
    names = list(servers)
    runs: dict[str, dict] = {n: {"closed": [], "open": {}} for n in names}
    rates: list[float] = []
    total = args.rounds * len(names) * len(closed_work)
    total += args.open_rounds * len(names) * len(args.rate_fractions) * len(open_work)
    with tqdm(total=total, desc="requests", unit="req") as bar:
        for n in names:  # warm-up: first requests take slower, one-time paths
            asyncio.run(closed_loop(servers[n], make_workload(2, args, seed=9), 2, bar))
        bar.total += 2 * len(names)
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for n in order:
                bar.set_postfix_str(f"round {rnd + 1} closed loop {n}")
                cpu_before = cpu_seconds(servers[n])
                results = asyncio.run(closed_loop(servers[n], closed_work, args.clients, bar))
                cpu_after = cpu_seconds(servers[n])
                http, engine = (cpu_after[i] - cpu_before[i] for i in (0, 1))
                summary = summarize(results)
                summary["http_cpu_share"] = http / (http + engine)
                summary["http_cpu_ms_per_request"] = http / len(results) * 1e3
                runs[n]["closed"].append(summary)
            if rnd >= args.open_rounds:
                continue
            if not rates:  # open-loop rates: fractions of remix-serve base's saturation rate
                saturation = runs["base"]["closed"][0]["requests_per_s"]
                rates = [round(f * saturation, 3) for f in args.rate_fractions]
            for rate in rates:
                for n in order:
                    bar.set_postfix_str(f"round {rnd + 1} {rate} req/s {n}")
                    results = asyncio.run(open_loop(servers[n], open_work, rate, rnd, bar))
                    runs[n]["open"].setdefault(str(rate), []).append(summarize(results))
    return {"rates": rates, "runs": runs}


def median_of(rounds: list[dict]) -> dict:
    """Field-wise median over rounds (errors summed)."""
    out = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds if r[key] is not None]
        if key in ("requests", "errors"):
            out[key] = sum(r[key] for r in rounds)
        elif key == "first_error":
            out[key] = next((v for v in values), None)
        else:
            out[key] = statistics.median(values) if values else None
    return out


def report(measured: dict) -> dict:
    runs = measured["runs"]
    table = {n: {"closed": median_of(r["closed"])} for n, r in runs.items()}
    for n, r in runs.items():
        table[n]["open"] = {rate: median_of(rs) for rate, rs in r["open"].items()}

    def saturation(n: str) -> float:
        return table[n]["closed"]["output_tokens_per_s"]

    ratios = {
        "remix_over_base": round(saturation("remix") / saturation("base"), 3),
        "remix_over_vllm_lora": round(saturation("remix") / saturation("vllm_lora"), 3),
        "base_over_vllm_base": round(saturation("base") / saturation("vllm_base"), 3),
    }
    return {"table": table, "ratios": ratios}


def flop_floors(base: Path, n: int = 8, k: int = 4, r: int = 8) -> dict[str, float]:
    """Throughput ceilings relative to the base model if time followed multiply-adds per token
    (projections and LM head; attention is left out, which only raises them): ReMix as served
    (every LoRA A and B of the pool, gated: (n*r + n) * d_in + n*r * d_out per projection), ReMix
    at its minimum (only the k chosen: k*r*(d_in + d_out) + n*d_in), and one rank-k*r LoRA."""
    from remix_infer.checkpoint import BaseModelShape
    from remix_infer.config import ALL_TARGET_MODULES

    hf = json.loads((base / "config.json").read_text())
    shape = BaseModelShape.from_hf_config(hf)
    dims = [shape.linear_shape(m) for m in ALL_TARGET_MODULES]
    layers = hf["num_hidden_layers"]
    base_macs = layers * sum(i * o for i, o in dims) + hf["hidden_size"] * hf["vocab_size"]
    extra = {
        "remix_dense": sum((n * r + n) * i + n * r * o for i, o in dims),
        "remix_minimum": sum(k * r * (i + o) + n * i for i, o in dims),
        "lora_rank_kr": sum(k * r * (i + o) for i, o in dims),
    }
    return {name: round(base_macs / (base_macs + layers * e), 3) for name, e in extra.items()}


def print_table(table: dict) -> None:
    head = f"{'server':<10} {'load':>12} {'req/s':>7} {'tok/s':>7} "
    head += " ".join(f"{m + '_' + q:>9}" for m in ("ttft", "itl") for q in ("p50", "p90", "p99"))
    print(head + f" {'errors':>6}")

    def row(name: str, load: str, s: dict) -> None:
        cells = " ".join(
            f"{s[f'{m}_{q}_ms']:9.1f}" if s[f"{m}_{q}_ms"] is not None else f"{'-':>9}"
            for m in ("ttft", "itl")
            for q in ("p50", "p90", "p99")
        )
        print(
            f"{name:<10} {load:>12} {s['requests_per_s']:7.2f} {s['output_tokens_per_s']:7.1f} "
            f"{cells} {s['errors']:>6}"
        )

    for name, t in table.items():
        for rate, s in t["open"].items():
            row(name, f"{rate} req/s", s)
        row(name, "closed loop", t["closed"])
    print("(latencies in ms; medians over rounds)")
    for name, t in table.items():
        c = t["closed"]
        print(
            f"{name:<10} HTTP server process: {c['http_cpu_share']:.1%} of the server's CPU time, "
            f"{c['http_cpu_ms_per_request']:.1f} ms CPU per request (closed loop)"
        )


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, t in table.items():
        points = [*t["open"].values(), t["closed"]]
        x = [p["output_tokens_per_s"] for p in points]
        for ax, metric in zip(axes, ("ttft_p50_ms", "itl_p50_ms"), strict=True):
            ax.plot(x, [p[metric] for p in points], marker="o", label=name)
    for ax, title in zip(
        axes, ("time to first token, p50", "inter-token latency, p50"), strict=True
    ):
        ax.set_xlabel("throughput (output tokens/s)")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("open-loop rates, then the closed-loop point (rightmost) per server")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--prompt-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX")
    )
    parser.add_argument("--output-len", type=int, nargs=2, default=(32, 96), metavar=("MIN", "MAX"))
    parser.add_argument("--requests", type=int, default=64, help="closed-loop requests per run")
    parser.add_argument("--clients", type=int, default=32, help="closed-loop concurrency")
    parser.add_argument("--open-requests", type=int, default=16, help="requests per open run")
    parser.add_argument(
        "--rate-fractions",
        type=float,
        nargs="+",
        default=(0.25, 0.5, 0.75),
        help="open-loop rates, as fractions of the base server's closed-loop request rate",
    )
    parser.add_argument("--rounds", type=int, default=3, help="closed-loop rounds")
    parser.add_argument("--open-rounds", type=int, default=1, help="rounds with open-loop runs")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--compiled", action="store_true", help="vLLM's compiled mode for all")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "bench-serve")
    args = parser.parse_args()

    work = args.work_dir / f"d{args.hidden}-l{args.layers}"
    base = build_random_llama(work / "base", args.hidden, args.layers, args.vocab)
    remix = build_random_remix(work / "remix", base)
    lora = build_peft_lora(work / "lora32", base, rank=32)
    commands = server_commands(args, base, remix, lora)
    started = time.time()
    with tempfile.TemporaryDirectory() as logs:
        with running_servers(commands, args.kv_cache_gib, Path(logs)) as servers:
            measured = run_rounds(servers, args)
    summary = report(measured)
    print_table(summary["table"])
    results = {
        "machine": machine(),
        "git": git_revision(),
        "command": "make bench-serve (" + " ".join(sys.argv[1:]) + ")",
        "settings": {k: v for k, v in vars(args).items() if k != "work_dir"},
        "wall_s": round(time.time() - started, 1),
        **summary,
        "flop_floors": flop_floors(base),
        "runs": measured["runs"],
        "rates": measured["rates"],
    }
    path = save_results("serve", results)
    plot(summary["table"], path.with_suffix(".png"))
    print(f"FLOP ceilings relative to base: {results['flop_floors']}")
    print(f"results: {path} (+ .png)")
    print(json.dumps(summary["ratios"]))


if __name__ == "__main__":
    main()
