"""Layer microbenchmark: the ReMix serving layer against the plain base linear, a naive loop
over the pool, and the FLOP floor, across token counts.

ReMix paths, all float32 with numba kernels: "remix" is the grouped path with one checkpoint
slot, the one a float32 engine takes (the base GEMM alone, then the whole adapter in one numba
call: the router's products, and only the k chosen LoRAs' A and B rows; ops/paths/
numba_grouped.py); "onednn" is the same path with its adapter products on oneDNN instead (what it
does for a row-parallel shard and past `kernel_max_tokens`): the slot's [A ; P] product, numba
routing, the B product; "stacked" folds the A and router rows into the base GEMM
(ops/paths/stacked.py), the one-slot engine's path before revision c1f9363.

The FLOP floor is the extra arithmetic of the dense ReMix term relative to the base product,
n*r*(d_in + d_out) / (d_in*d_out) (the router adds n/d_out more). A layer that costs exactly its
arithmetic runs at base_time/remix_time = 1 / (1 + floor); `over_floor` divides the measured
ratio by that, so 1.0 means no overhead beyond the FLOPs. The numba kernel does k/n of the A
and B arithmetic (and the router's), so it can pass that floor.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import paired_ratio

from remix_infer.config import RemixConfig
from remix_infer.ops import PoolLayout, RemixPool, TokenSlots
from remix_infer.routing import topk_select
from remix_infer.vllm_plugin.layer import PrepackedCpuGemm, linear_kernel


def make_layer(
    d_in: int,
    d_out: int,
    n: int,
    k: int,
    r: int,
    max_tokens: int,
    seed: int = 0,
    grouped: bool = False,
) -> tuple[Callable, RemixPool, Callable]:
    """The base product (with the kernel vLLM uses for it), a ReMix pool over it, and the
    pool's one GEMM (the same kernel on the folded weight), as the engine binds them. grouped:
    the engine's path, one checkpoint slot whose tokens are every token (`fill_slots`)."""
    torch.manual_seed(seed)
    weight = torch.randn(d_out, d_in) * d_in**-0.5
    config = RemixConfig(
        base_model="bench", architecture="llama", num_layers=1, target_modules=["o_proj"],
        num_loras=n, top_k=k, rank=r, omega=2.0 / (k * r),
    )  # fmt: skip
    layout = PoolLayout.from_config(config, d_in, [d_out], [0])
    slots = TokenSlots(max_tokens, device="cpu") if grouped else None
    pool = RemixPool(layout, torch.float32, max_tokens, device="cpu", slots=slots)
    with torch.no_grad():
        pool.lora_a.normal_(0, d_in**-0.5)
        pool.router.normal_(0, d_in**-0.5)
        pool.lora_b[0].normal_(0, 0.02)
    folded = pool.fold_base_weight(weight)  # before prepare: the products prepack its rows
    pool.prepare(PrepackedCpuGemm if grouped else linear_kernel)  # as RemixLinearMethod does
    return linear_kernel(weight), pool, linear_kernel(folded)


def fill_slots(pool: RemixPool, tokens: int) -> None:
    """A step of `tokens` tokens, all of slot 0's (what the engine's slot filler writes)."""
    if pool.slots is not None:
        pool.slots.fill(torch.zeros(tokens, dtype=torch.int64))


def naive_remix(base: Callable, pool: RemixPool, x: torch.Tensor) -> torch.Tensor:
    """The obvious implementation: route, then loop over the pool, gathering each LoRA's tokens."""
    n, r = pool.layout.num_loras, pool.layout.rank
    y = base(x)
    selected = topk_select(F.linear(x, pool.router), pool.layout.top_k)
    a = pool.lora_a.view(n, r, -1)
    b = pool.lora_b[0].view(-1, n, r)
    for i in range(n):
        rows = (selected == i).any(-1).nonzero().squeeze(1)
        if rows.numel():
            y.index_add_(0, rows, pool.layout.omega * (x[rows] @ a[i].T) @ b[:, i].T)
    return y


def time_repeats(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, per repeat; the candidates alternate within each repeat so that
    the machine's drift falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call (time_repeats)."""
    return {name: statistics.median(t) for name, t in time_repeats(fns, x, repeats).items()}


def run(
    dims: tuple[int, ...] = (1024, 2048),
    token_counts: tuple[int, ...] = (1, 8, 64, 512, 4096),
    n: int = 8,
    k: int = 4,
    r: int = 8,
    budget_s: float = 0.4,
    threads: int = 1,
) -> list[dict]:
    """threads: torch's threads while timing (one, as in vLLM's CPU worker; with two on a
    2-core machine that another job shares, OpenMP's barriers wait on the other job)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return [row for d in dims for row in run_width(d, token_counts, n, k, r, budget_s)]
    finally:
        torch.set_num_threads(before)


def run_width(
    d: int, token_counts: tuple[int, ...], n: int, k: int, r: int, budget_s: float
) -> list[dict]:
    """The rows of one width d (run's)."""
    rows = []
    base, stacked, stacked_gemm = make_layer(d, d, n, k, r, max(token_counts))
    _, grouped, grouped_gemm = make_layer(d, d, n, k, r, max(token_counts), grouped=True)
    _, on_onednn, onednn_gemm = make_layer(d, d, n, k, r, max(token_counts), grouped=True)
    on_onednn.path.kernel_max_tokens = 0  # the grouped path's products all on oneDNN
    floor = n * r * (d + d) / (d * d)
    for tokens in token_counts:
        x = torch.randn(tokens, d)
        fill_slots(grouped, tokens)
        fill_slots(on_onednn, tokens)
        fns = {
            "base": base,
            "remix": lambda x, pool=grouped, gemm=grouped_gemm: pool(x, gemm),
            "onednn": lambda x, pool=on_onednn, gemm=onednn_gemm: pool(x, gemm),
            "stacked": lambda x, pool=stacked, gemm=stacked_gemm: pool(x, gemm),
            "naive": lambda x, base=base, pool=stacked: naive_remix(base, pool, x),
        }
        probe = time_interleaved(fns, x, 1)
        repeats = max(5, min(200, int(budget_s / max(sum(probe.values()), 1e-6))))
        row = layer_row(d, tokens, time_repeats(fns, x, repeats), 1 / (1 + floor))
        rows.append(row)
        print(
            f"d={d:5d} tokens={tokens:5d}  base {row['base_ms']:8.3f} ms"
            f"  remix {row['remix_ms']:8.3f} ms  oneDNN {row['onednn_ms']:8.3f} ms"
            f"  stacked {row['stacked_ms']:8.3f} ms"
            f"  naive {row['naive_ms']:8.3f} ms  base/remix {row['base_over_remix']:.3f}"
            f"  base/oneDNN {row['base_over_onednn']:.3f}"
            f"  base/stacked {row['base_over_stacked']:.3f}  floor {row['floor_ratio']:.3f}",
            flush=True,
        )
    return rows


def layer_row(d: int, tokens: int, times: dict[str, list[float]], floor_ratio: float) -> dict:
    """One result row: median milliseconds per call, and base time over each path's (paired:
    the median of the repeats' own ratios)."""
    ratio = paired_ratio(times["base"], times["remix"])
    return {
        "d": d,
        "tokens": tokens,
        **{f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()},
        "base_over_remix": ratio,
        "base_over_onednn": paired_ratio(times["base"], times["onednn"]),
        "base_over_stacked": paired_ratio(times["base"], times["stacked"]),
        "base_over_naive": paired_ratio(times["base"], times["naive"]),
        "floor_ratio": floor_ratio,
        "over_floor": ratio / floor_ratio,
    }


if __name__ == "__main__":
    run()
