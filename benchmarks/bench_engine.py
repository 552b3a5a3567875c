"""`make bench-engine`: what ReMix costs inside vLLM, measured side by side in one run.

1. Engine throughput: a ReMix checkpoint (n=8, k=4, r=8, all seven projections) against the same
   random base model served plainly, same engine settings and prompts, runs interleaved
   (base, remix, remix, base, ...) so machine drift cancels: batch decode and prefill-heavy.
2. Layer microbenchmark (bench_layer.py): the fused layer vs the base linear, a naive loop and
   the FLOP floor, across token counts.
3. Several checkpoints in one engine (checkpoint slots): batch decode with 1, 2, 4 and 8
   checkpoints active in one batch (an engine of 8 slots), against one checkpoint alone (an
   engine of one slot: the single-checkpoint path); half or all of the batch for the base model;
   and the base model served plainly, which base-model requests in a ReMix engine are held to.

Ends with one JSON line: remix_over_base_decode, remix_over_base_prefill, layer_over_floor,
multi_over_single_{1,2,4,8} (decode throughput over the one-slot engine's), half_base_over_single,
{single,multi}_all_base_over_plain (base-model requests alone in a 1- or 8-slot engine,
over the same requests to the plain base model), and load_pause_steps (loading a checkpoint
into a slot of the 8-slot engine, in decode steps of its fastest case).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from common import (
    build_random_llama,
    build_random_remix,
    git_revision,
    machine,
    paired_ratio,
    save_results,
)
from tqdm import tqdm

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench"


def engine_settings(args: argparse.Namespace) -> dict:
    return dict(
        enforce_eager=not args.compiled,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=64,
        max_num_batched_tokens=4096,
        gpu_memory_utilization=0.4,
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        seed=0,
    )


def workloads(args: argparse.Namespace) -> dict[str, dict]:
    rng = random.Random(0)

    def prompts(count: int, length: int) -> list[dict]:
        return [
            {"prompt_token_ids": [rng.randrange(10, 30000) for _ in range(length)]}
            for _ in range(count)
        ]

    return {
        # decode: many sequences, short prompts, long outputs; throughput = output tokens / s
        "decode": {
            "prompts": prompts(args.batch, 16),
            "max_tokens": args.decode_tokens,
            "count": "output",
        },
        # prefill-heavy: long prompts, one output token; throughput = prompt tokens / s
        "prefill": {
            "prompts": prompts(args.batch // 2, args.prefill_len),
            "max_tokens": 1,
            "count": "prompt",
        },
    }


def timed_run(llm, workload: dict, slots: list[int] | None = None) -> float:  # noqa: ANN001
    """Tokens per second of one generate() call over the workload; slots: request i asks for
    checkpoint slot slots[i % len(slots)] (-1: the base model)."""
    from vllm import SamplingParams

    from remix_infer.vllm_plugin.engine import CHECKPOINT_SLOT_KEY

    def sampling(slot: int | None) -> SamplingParams:
        extra = {CHECKPOINT_SLOT_KEY: slot} if slot is not None else None
        return SamplingParams(
            temperature=0.0, max_tokens=workload["max_tokens"], ignore_eos=True, extra_args=extra
        )

    count = len(workload["prompts"])
    params = [sampling(slots[i % len(slots)]) for i in range(count)] if slots else sampling(None)
    start = time.perf_counter()
    outs = llm.generate(workload["prompts"], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    if workload["count"] == "output":
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    else:
        tokens = sum(len(o.prompt_token_ids) for o in outs)
    return tokens / elapsed


def engine_benchmark(args: argparse.Namespace) -> dict:
    from vllm import LLM

    from remix_infer.vllm_plugin.engine import remix_engine_kwargs

    base = build_random_llama(
        CACHE / f"llama-d{args.hidden}", hidden=args.hidden, layers=args.layers
    )
    ckpt = build_random_remix(CACHE / f"remix-d{args.hidden}-n8k4r8", base)
    settings = engine_settings(args)
    print(f"starting engines (base model {base}, ReMix checkpoint {ckpt}) ...", flush=True)
    engines = {
        "base": LLM(model=str(base), **settings),
        "remix": LLM(**remix_engine_kwargs(ckpt), **settings),
    }
    loads = workloads(args)
    rates: dict[str, dict[str, list[float]]] = {w: {e: [] for e in engines} for w in loads}
    for engine in engines.values():  # warm-up: each workload's first step pays one-off costs
        timed_run(engine, {**loads["decode"], "max_tokens": 4})
        timed_run(engine, loads["prefill"])  # (its 4096-token step: page faults, buffers)
    runs = [
        (w, e)
        for rep in range(args.repeats)
        for w in loads
        for e in (list(engines)[:: 1 if rep % 2 else -1])
    ]
    for workload, name in tqdm(runs, desc="engine runs"):
        rates[workload][name].append(timed_run(engines[name], loads[workload]))
    for engine in engines.values():
        engine.llm_engine.engine_core.shutdown()
    summary = {}
    for workload, by_engine in rates.items():
        base_rate, remix_rate = (
            statistics.median(by_engine["base"]),
            statistics.median(by_engine["remix"]),
        )
        ratio = paired_ratio(by_engine["remix"], by_engine["base"])  # each repeat's pair
        summary[workload] = {
            "base_tok_s": base_rate,
            "remix_tok_s": remix_rate,
            "ratio": ratio,
            "runs": by_engine,
        }
        print(
            f"{workload:8s} base {base_rate:8.1f} tok/s  remix {remix_rate:8.1f} tok/s"
            f"  ratio {ratio:.3f} (median of the repeats' own ratios)"
        )
    return summary


# case -> (engine: the "plain" base model, "one" slot or "eight" slots; the slots its requests
# cycle through, -1 the base model)
MULTI_CASES = {
    "plain": ("plain", None),
    "single": ("one", [0]),
    "single_half_base": ("one", [0, -1]),
    "single_all_base": ("one", [-1]),
    "multi_all_base": ("eight", [-1]),
    "multi_1": ("eight", [0]),
    "multi_1_half_base": ("eight", [0, -1]),
    "multi_2": ("eight", [0, 1]),
    "multi_4": ("eight", [0, 1, 2, 3]),
    "multi_8": ("eight", list(range(8))),
}


def multi_checkpoint_benchmark(args: argparse.Namespace) -> dict:
    """Decode throughput of MULTI_CASES, runs interleaved; ratios over the one-slot engine."""
    from vllm import LLM

    from remix_infer.vllm_plugin.engine import remix_engine_kwargs

    base = build_random_llama(
        CACHE / f"llama-d{args.hidden}", hidden=args.hidden, layers=args.layers
    )
    ckpts = [
        build_random_remix(CACHE / f"remix-d{args.hidden}-n8k4r8-seed{i}", base, seed=i)
        for i in range(8)
    ]
    settings = engine_settings(args)
    cases = ["single", *(case for case in args.multi_cases if case != "single")]
    kwargs = {
        "plain": lambda: dict(model=str(base)),
        "one": lambda: remix_engine_kwargs(ckpts[0]),
        "eight": lambda: remix_engine_kwargs({f"c{i}": c for i, c in enumerate(ckpts)}),
    }
    used = sorted({MULTI_CASES[case][0] for case in cases})
    print(f"starting engines {used} over {base} ...", flush=True)
    engines = {name: LLM(**kwargs[name](), **settings) for name in used}
    decode = workloads(args)["decode"]
    for engine in engines.values():
        timed_run(
            engine,
            {**decode, "max_tokens": 4},
            list(range(8)) if engine is engines.get("eight") else None,
        )
    rates: dict[str, list[float]] = {case: [] for case in cases}
    runs = [case for _ in range(args.multi_repeats) for case in cases]
    for case in tqdm(runs, desc="multi-checkpoint runs"):
        engine, slots = MULTI_CASES[case]
        rates[case].append(timed_run(engines[engine], decode, slots))
    reload_s = (
        reload_timings(engines["eight"], ckpts[1], args.multi_repeats) if "eight" in engines else {}
    )
    for engine in engines.values():
        engine.llm_engine.engine_core.shutdown()
    summary = {}
    for case, runs_of_case in rates.items():
        rate, over = statistics.median(runs_of_case), paired_ratio(runs_of_case, rates["single"])
        summary[case] = {"tok_s": rate, "over_single": over, "runs": runs_of_case}
        print(f"{case:18s} {rate:8.1f} tok/s  over single {over:.3f}", flush=True)
    if not reload_s:
        return summary
    # the engine runs no step while it loads: the pause other requests see, in decode steps
    # (the engine's fastest case: its shortest step, so the pause is not understated)
    fastest = max(summary[case]["tok_s"] for case in cases if MULTI_CASES[case][0] == "eight")
    step_s = args.batch / fastest
    summary["reload"] = {**reload_s, "decode_step_s": step_s}
    print(f"read (staged, beside the steps) {reload_s['stage_s'] * 1e3:7.1f} ms", flush=True)
    for what in ("load", "unload"):
        pause = reload_s[f"{what}_s"]
        print(f"{what} {pause * 1e3:7.1f} ms = {pause / step_s:.2f} decode steps", flush=True)
    return summary


def reload_timings(llm, checkpoint: Path, repeats: int) -> dict[str, float]:  # noqa: ANN001
    """Median seconds of unloading slot 1, reading `checkpoint` for it beside the engine's steps
    (staged, as the server does), and copying it in (the load RPC: it runs between steps, so
    the engine is paused for as long)."""
    times: dict[str, list[float]] = {"unload_s": [], "stage_s": [], "load_s": []}

    def timed(what: str, call) -> None:  # noqa: ANN001
        start = time.perf_counter()
        call()
        times[what].append(time.perf_counter() - start)

    def stage() -> None:
        llm.collective_rpc("remix_stage_checkpoint", args=(1, str(checkpoint)))
        while not all(llm.collective_rpc("remix_staged_checkpoint", args=(1,))):
            time.sleep(0.005)

    for _ in range(repeats):
        timed("unload_s", lambda: llm.collective_rpc("remix_unload_checkpoint", args=(1,)))
        timed("stage_s", stage)
        timed(
            "load_s", lambda: llm.collective_rpc("remix_load_checkpoint", args=(1, str(checkpoint)))
        )
    return {what: statistics.median(runs) for what, runs in times.items()}


def multi_summary(multi: dict) -> dict[str, float]:
    """The summary line's figures of the cases that ran."""
    line = {}
    for n in (1, 2, 4, 8):
        if f"multi_{n}" in multi:
            line[f"multi_over_single_{n}"] = round(multi[f"multi_{n}"]["over_single"], 3)
    if "single_half_base" in multi:
        line["half_base_over_single"] = round(multi["single_half_base"]["over_single"], 3)
    if "multi_1_half_base" in multi and "multi_1" in multi:
        over = paired_ratio(multi["multi_1_half_base"]["runs"], multi["multi_1"]["runs"])
        line["multi_half_base_over_multi_1"] = round(over, 3)
    for engine in ("single", "multi"):
        if f"{engine}_all_base" in multi and "plain" in multi:
            over_plain = paired_ratio(multi[f"{engine}_all_base"]["runs"], multi["plain"]["runs"])
            line[f"{engine}_all_base_over_plain"] = round(over_plain, 3)
    if "reload" in multi:
        reload = multi["reload"]
        line["load_pause_steps"] = round(reload["load_s"] / reload["decode_step_s"], 2)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="sequences in the decode workload")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument(
        "--repeats", type=int, default=5, help="engine part (prefill spreads ~0.1 per repeat)"
    )
    parser.add_argument("--multi-repeats", type=int, default=3, help="several-checkpoints part")
    parser.add_argument(
        "--compiled", action="store_true", help="vLLM's compiled mode instead of eager"
    )
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--skip-multi", action="store_true")
    parser.add_argument(
        "--multi-cases",
        nargs="+",
        choices=list(MULTI_CASES),
        default=list(MULTI_CASES),
        help="the several-checkpoints part's cases (single always runs: the ratios' reference)",
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import bench_layer

    results: dict = {"machine": machine(), "revision": git_revision(), "args": vars(args)}
    line = {}
    if not args.skip_layer:
        print("== layer microbenchmark (n=8, k=4, r=8) ==", flush=True)
        results["layer"] = bench_layer.run()
        at = next(r for r in results["layer"] if r["d"] == 1024 and r["tokens"] == 512)
        line["layer_over_floor"] = round(at["over_floor"], 3)
    if not args.skip_engine:
        print(
            f"== engine throughput (d_model {args.hidden}, {args.layers} layers, fp32) ==",
            flush=True,
        )
        results["engine"] = engine_benchmark(args)
        line = {
            "remix_over_base_decode": round(results["engine"]["decode"]["ratio"], 3),
            "remix_over_base_prefill": round(results["engine"]["prefill"]["ratio"], 3),
            **line,
        }
    if not args.skip_multi:
        print("== several checkpoints in one engine (decode) ==", flush=True)
        results["multi"] = multi_checkpoint_benchmark(args)
        line.update(multi_summary(results["multi"]))
    results["summary"] = line
    # a run of some parts gets its own file, so that it does not overwrite the day's full run
    parts = [part for part in ("layer", "engine", "multi") if not getattr(args, f"skip_{part}")]
    path = save_results("-".join(["engine", *parts]) if len(parts) < 3 else "engine", results)
    if "layer" in results:
        from plot import plot_layer

        plot_layer(results["layer"], path.with_suffix(".png"))
    print(f"results: {path}", flush=True)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
