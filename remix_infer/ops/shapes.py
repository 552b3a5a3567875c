"""The model geometries the GPU work is sized for: the projections of a Llama decoder layer and
the pool that `make bench-gpu` serves (one place for benchmarks/bench_gpu.py and aot_compile)."""

from __future__ import annotations

LLAMA_SHAPES = {  # hidden, q width, kv width, intermediate
    "llama3-8b": (4096, 4096, 1024, 14336),
    "llama3.2-1b": (2048, 2048, 512, 8192),
}
BENCH_POOL = {"num_loras": 8, "top_k": 4, "rank": 8}  # n, k, r of every bench-gpu pool


def projection_shapes(hidden: int, q: int, kv: int, inter: int) -> dict[str, tuple[int, list[int]]]:
    """Each projection of a decoder layer: input width and the output widths of its parts."""
    return {
        "qkv": (hidden, [q, kv, kv]),
        "o": (q, [hidden]),
        "gate_up": (hidden, [inter, inter]),
        "down": (inter, [hidden]),
    }
