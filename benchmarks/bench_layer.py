"""Layer microbenchmark: the ReMix serving layer against the plain base linear, a naive loop
over the pool, and the FLOP floor, across token counts.

The FLOP floor is the extra arithmetic of the ReMix term relative to the base product,
n*r*(d_in + d_out) / (d_in*d_out) (the router adds n/d_out more). A layer that costs exactly its
arithmetic runs at base_time/remix_time = 1 / (1 + floor); `over_floor` divides the measured
ratio by that, so 1.0 means no overhead beyond the FLOPs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from remix_infer.config import RemixConfig
from remix_infer.ops import PoolLayout, RemixPool
from remix_infer.routing import topk_select
from remix_infer.vllm_plugin.layer import linear_kernel


def make_layer(
    d_in: int, d_out: int, n: int, k: int, r: int, max_tokens: int, seed: int = 0
) -> tuple[Callable, RemixPool, Callable]:
    """The base product (with the kernel vLLM uses for it), a ReMix pool over it, and the
    pool's one GEMM (the same kernel on the folded weight), as the engine binds them."""
    torch.manual_seed(seed)
    weight = torch.randn(d_out, d_in) * d_in**-0.5
    config = RemixConfig(
        base_model="bench", architecture="llama", num_layers=1, target_modules=["o_proj"],
        num_loras=n, top_k=k, rank=r, omega=2.0 / (k * r),
    )  # fmt: skip
    layout = PoolLayout.from_config(config, d_in, [d_out], [0])
    pool = RemixPool(layout, torch.float32, max_tokens, device="cpu")  # the engine's kernel
    with torch.no_grad():
        pool.lora_a.normal_(0, d_in**-0.5)
        pool.router.normal_(0, d_in**-0.5)
        pool.lora_b[0].normal_(0, 0.02)
    pool.prepare(linear_kernel)
    return linear_kernel(weight), pool, linear_kernel(pool.fold_base_weight(weight))


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


def time_interleaved(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call; the candidates alternate within each repeat so drift cancels."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def run(
    dims: tuple[int, ...] = (1024, 2048),
    token_counts: tuple[int, ...] = (1, 8, 64, 512, 4096),
    n: int = 8,
    k: int = 4,
    r: int = 8,
    budget_s: float = 0.4,
) -> list[dict]:
    rows = []
    for d in dims:
        base, pool, gemm = make_layer(d, d, n, k, r, max(token_counts))
        floor = n * r * (d + d) / (d * d)
        for tokens in token_counts:
            x = torch.randn(tokens, d)
            fns = {
                "base": base,
                "remix": lambda x, pool=pool, gemm=gemm: pool(x, gemm),
                "naive": lambda x, base=base, pool=pool: naive_remix(base, pool, x),
            }
            probe = time_interleaved(fns, x, 1)
            repeats = max(3, min(50, int(budget_s / max(sum(probe.values()), 1e-6))))
            t = time_interleaved(fns, x, repeats)
            ratio = t["base"] / t["remix"]
            rows.append(
                {
                    "d": d,
                    "tokens": tokens,
                    "base_ms": t["base"] * 1e3,
                    "remix_ms": t["remix"] * 1e3,
                    "naive_ms": t["naive"] * 1e3,
                    "base_over_remix": ratio,
                    "base_over_naive": t["base"] / t["naive"],
                    "floor_ratio": 1 / (1 + floor),
                    "over_floor": ratio * (1 + floor),
                }
            )
            print(
                f"d={d:5d} tokens={tokens:5d}  base {t['base'] * 1e3:8.3f} ms  remix {t['remix'] * 1e3:8.3f} ms"
                f"  naive {t['naive'] * 1e3:8.3f} ms  base/remix {ratio:.3f}  floor {1 / (1 + floor):.3f}"
                f"  over floor {ratio * (1 + floor):.3f}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    run()
