"""Where a ReMix layer's time goes: each stage of a pool's forward timed on its own.

One d x d projection with a pool of n = 8 LoRAs, k = 4, r = 8 (the serving benchmark's
configuration), float32, one torch thread (as in vLLM's CPU worker), interleaved medians.

`--path grouped` (the default: the path a float32 engine takes, one checkpoint slot holding
every token; ops/paths/numba_grouped.py), its stages in the order its forward makes them:

    base GEMM         gemm(x)                   the base product alone (vLLM's oneDNN kernel)
    adapter kernel    cpu_route.grouped_cpu     the whole adapter in one numba call: router
                                                products, top-k, gates, the k chosen LoRAs'
                                                A and B rows added to the base, statistics
    kernel alone      cpu_route.remix_rows      the same, less the op's Python (numpy views)

`--path stacked` (the one-slot engine's path before revision c1f9363), the stages of its torch
forward (the oracle's) and the numba routing that the stacked CPU path runs instead of them:

    stacked GEMM      gemm(x)                   one GEMM for the base rows, all A's and the router
    top-k             routing.topk_select       deterministic top-k (stable sort)
    gates             routing.routing_gates     constant omega on the k chosen
    counters          stats.record_routing      routing statistics and the per-step selections
    gating            path.gate_hidden          the hidden states times their gates
    B GEMM            path.add_pool_outputs     B product, added to the base
    numba routing     paths.base.numba_route    top-k, gates, gating, statistics in one call:
                                                what the CPU engine runs instead of the four
                                                torch stages above (not part of "other")

"other" is the forward's time less the stages' sum (call and dispatch overhead between them).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from bench_layer import fill_slots, make_layer, time_interleaved
from common import machine, save_results

from remix_infer.ops.cpu_route import grouped_cpu, remix_rows
from remix_infer.ops.paths.base import numba_route
from remix_infer.ops.stats import record_routing
from remix_infer.routing import routing_gates, topk_select


def profile(d: int, tokens: int, n: int, k: int, r: int, repeats: int) -> dict[str, float]:
    """Microseconds per call of the base GEMM, each adapter stage and the whole adapter."""
    base, pool, gemm = make_layer(d, d, n, k, r, max_tokens=tokens)
    x = torch.randn(tokens, d)
    with torch.no_grad():
        y = gemm(x)
        base_out, lora_h = y[:, :d], y[:, d : d + n * r]
        logits = y[:, d + n * r :].unflatten(-1, (1, n))
        selected = topk_select(logits, k)
        gates = routing_gates(logits, selected, pool.layout.omega, pool.layout.weighting)
        hidden = pool.path.gate_hidden(lora_h, gates)
    stages = {
        "base GEMM": lambda x: base(x),
        "adapter (whole)": lambda x: pool(x, gemm),
        "stacked GEMM": lambda x: gemm(x),
        "top-k": lambda x: topk_select(logits, k),
        "gates": lambda x: routing_gates(logits, selected, pool.layout.omega, "constant"),
        "counters": lambda x: record_routing(pool.stats, pool.step_selected, logits, gates, k),
        "gating": lambda x: pool.path.gate_hidden(lora_h, gates),
        "B GEMM": lambda x: pool.path.add_pool_outputs(base_out, hidden),
        "numba routing": lambda x: numba_route(pool, logits, lora_h, None),
    }
    t = {name: s * 1e6 for name, s in time_interleaved(stages, x, repeats).items()}
    parts = ["stacked GEMM", "numba routing", "B GEMM"]
    t["other"] = max(0.0, t["adapter (whole)"] - sum(t[p] for p in parts))
    return t


def profile_grouped(d: int, tokens: int, n: int, k: int, r: int, repeats: int) -> dict:
    """Microseconds per call of the grouped path's stages, its whole forward, the stacked
    path's whole forward and the base GEMM alone."""
    base, pool, gemm = make_layer(d, d, n, k, r, max_tokens=tokens, grouped=True)
    _, stacked, stacked_gemm = make_layer(d, d, n, k, r, max_tokens=tokens)
    fill_slots(pool, tokens)
    path, layout = pool.path, pool.layout
    x = torch.randn(tokens, d)
    out = base(x)
    selected = torch.empty(tokens, 1, k, dtype=torch.long)
    arguments = [
        x, path.slot_narrow, pool.router_bias, pool.slots.index, path.slot_b_t, path.b_columns,
        out, None, selected, pool.stats, pool.step_selected, k, layout.omega, False, r, 0,
        path.products, True,
    ]  # fmt: skip
    kernel_args = [x.numpy(), out.numpy(), np.zeros(0, np.bool_), *path.kernel_args()]
    stages = {
        "base GEMM": lambda x: base(x),
        "adapter (whole)": lambda x: pool(x, gemm),
        "stacked (whole)": lambda x: stacked(x, stacked_gemm),
        "adapter kernel": lambda x: grouped_cpu(*arguments),
        "kernel alone": lambda x: remix_rows(*kernel_args),
    }
    t = {name: s * 1e6 for name, s in time_interleaved(stages, x, repeats).items()}
    t["other"] = max(0.0, t["adapter (whole)"] - t["base GEMM"] - t["adapter kernel"])
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, nargs="+", default=(1, 16, 64, 512))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--path", choices=("grouped", "stacked"), default="grouped")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = profile_grouped if args.path == "grouped" else profile
    rows = {tokens: run(args.hidden, tokens, 8, 4, 8, args.repeats) for tokens in args.tokens}
    names = list(rows[args.tokens[0]])
    print(f"d={args.hidden}, {args.path} path, n=8 k=4 r=8, one thread; microseconds per call")
    print(f"{'stage':<17}" + "".join(f"{f'{t} tokens':>22}" for t in args.tokens))
    whole = ("base GEMM", "adapter (whole)", "stacked (whole)")
    for name in names:
        cells = ""
        for tokens in args.tokens:
            us, of = rows[tokens][name], rows[tokens]["adapter (whole)"]
            cells += f"{us:14.1f} {'' if name in whole else f'({us / of:4.0%})':>7}"
        print(f"{name:<17}{cells}")
    results = {"machine": machine(), "hidden": args.hidden, "path": args.path, "microseconds": rows}
    print(f"results: {save_results('profile', results)}")
    print(
        json.dumps(
            {
                f"adapter_over_base_{t}": round(
                    rows[t]["adapter (whole)"] / rows[t]["base GEMM"], 3
                )
                for t in args.tokens
            }
        )
    )


if __name__ == "__main__":
    main()
