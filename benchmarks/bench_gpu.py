"""`make bench-gpu`: the ReMix serving layer (remix_infer.ops) on a GPU, without vLLM.

A decoder stack without attention (RMSNorm, qkv, o, RMSNorm, gate_up, SiLU-and-mul, down,
residuals) at Llama-3-8B and Llama-3.2-1B shapes, bf16, every projection carrying a pool of
n = 8 LoRAs, k = 4, r = 8, against the same stack without adapters (base) and with one plain
rank-32 LoRA per projection (two extra GEMMs each). Token counts 1 to 8192; eager, eager
captured in a CUDA graph, and torch.compile (dynamic) captured in a CUDA graph (as vLLM runs
on GPU); variants interleaved within each repeat so drift cancels; kernel launches per layer.
Then checkpoint slots (`--slot-tokens`, default 32 and 256): the stack's pools with 1 and 8
slots, the tokens spread over 1, 2, 4 or 8 checkpoints or partly the base model (SLOT_CASES),
against one checkpoint in a one-slot stack, in the last mode; on a GPU every 8-slot case both
on triton's dense path (its default) and its grouped one ("..., grouped"), to show which is
faster.

Before timing, it checks on the device that the fast path (the Triton routing kernel, bf16)
chooses the top-k the plain-torch float32 path chooses (except on true ties) and that their
outputs agree within bf16 tolerance, and the same for the grouped path of 8-slot pools, tokens
of every slot and the base model; it stops with an error if not: there is no other GPU test.

Then the routing kernel's configurations (triton_route.CONFIGURATIONS: more splits, narrower
d_in blocks, the router on tensor cores in tf32x3, x read once for all parts) on one layer's four projections, the kernel
alone in a CUDA graph, at each token count (`--sweep-tokens`), printing the fastest per count.
`--quick` (`make bench-gpu QUICK=1`) sizes the run for one short GPU call: compiled + graph
only, QUICK's token counts and repeats, one slot token count, and a time budget after which
the parts not yet started are skipped and listed in the JSON line. Runs from a bare checkout
with torch and Triton (tqdm and matplotlib optional): `python benchmarks/bench_gpu.py`.

Without a GPU it runs a small CPU shape (eager, float32, the torch kernel, and the numba kernel
for the slots; the Triton kernel's check runs in Triton's interpreter) and says so. Ends with one JSON line; results JSON + PNG go
to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the Triton kernel can only run in its interpreter here
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from common import RESULTS, git_revision, machine, save_results  # noqa: E402 - and sys.path
from torch import nn  # noqa: E402

from remix_infer.ops import FusedRemixLinear, PoolLayout, RemixPool, TokenSlots  # noqa: E402
from remix_infer.ops.shapes import BENCH_POOL, LLAMA_SHAPES, projection_shapes  # noqa: E402
from remix_infer.ops.slots import pick_slot  # noqa: E402
from remix_infer.ops.triton_route import CONFIGURATIONS, route  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # optional: no progress bars

    def tqdm(items, **_):
        return items


SHAPES = {**LLAMA_SHAPES, "cpu-small": (512, 512, 128, 1408)}  # hidden, q, kv, inter
N, K, R = (BENCH_POOL[key] for key in ("num_loras", "top_k", "rank"))
# `make bench-gpu QUICK=1`: one call of the GPU machine (estimate in docs/performance.md)
QUICK = {"tokens": [1, 32, 256, 2048, 8192], "repeats": 5, "slot_tokens": [32], "budget_s": 300}
LORA_RANK = 32
VARIANTS = ("base", "remix", "lora32")
MAX_TOKENS = 8192
# checkpoint slots: case -> (slots of the pools, the slots the tokens cycle through; -1: base)
SLOT_CASES = {
    "one checkpoint, 1 slot": (1, [0]),
    "half base model, 1 slot": (1, [0, -1]),
    "1 checkpoint of 8 slots": (8, [0]),
    "2 checkpoints of 8": (8, [0, 1]),
    "4 checkpoints of 8": (8, [0, 1, 2, 3]),
    "8 checkpoints of 8": (8, list(range(8))),
    "base model only, 8 slots": (8, [-1]),
}


def pool_layout(d_in: int, widths: list[int], num_slots: int) -> PoolLayout:
    """Every part adapted, constant gates omega = 2 / (k r), no always-on LoRA."""
    adapted = tuple(range(len(widths)))
    return PoolLayout(
        d_in, tuple(widths), adapted, N, R, K, 2.0 / (K * R), "constant", 0, num_slots
    )


def layer_projections(shape: str) -> dict[str, tuple[int, list[int]]]:
    """Each projection of a decoder layer: input width and the output widths of its parts."""
    return projection_shapes(*SHAPES[shape])


def random_pool(
    d_in: int,
    widths: list[int],
    dtype: torch.dtype,
    device: str,
    kernel: str,
    seed: int,
    slots: TokenSlots | None = None,
    num_slots: int = 1,
    grouped: bool | None = None,
) -> RemixPool:
    """A pool of random LoRAs and routers (in every one of its num_slots checkpoint slots)."""
    gen = torch.Generator().manual_seed(seed)
    layout = pool_layout(d_in, widths, num_slots)
    pool = RemixPool(
        layout, dtype, MAX_TOKENS, kernel=kernel, device=device, slots=slots, grouped=grouped
    )
    with torch.no_grad():
        pool.lora_a.copy_(torch.randn(pool.lora_a.shape, generator=gen) * d_in**-0.5)
        pool.router.copy_(torch.randn(pool.router.shape, generator=gen) * d_in**-0.5)
        for b in pool.lora_b:
            b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
    return pool


class LoraLinear(nn.Module):
    """A base linear plus one plain LoRA: x W^T + (x A^T) B^T."""

    def __init__(self, weight: torch.Tensor, rank: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        d_out, d_in = weight.shape
        self.weight = weight
        self.a = (torch.randn(rank, d_in, generator=gen) * d_in**-0.5).to(weight)
        self.b = (torch.randn(d_out, rank, generator=gen) * 0.02).to(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.a), self.b)


class PlainLinear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DecoderStack(nn.Module):
    """Decoder layers without attention (the q part of qkv stands in for attention's output).

    num_slots: ReMix pools of that many checkpoint slots, reading `token_slots` (the slot of
    each token, which the caller fills before running); None: pools without slots. grouped:
    the pools' grouped path (None: the kernel's default)."""

    def __init__(
        self,
        shape: str,
        layers: int,
        variant: str,
        dtype: torch.dtype,
        device: str,
        kernel: str,
        num_slots: int | None = None,
        grouped: bool | None = None,
    ) -> None:
        super().__init__()
        self.q_width = SHAPES[shape][1]
        self.token_slots = TokenSlots(MAX_TOKENS, num_slots, device) if num_slots else None
        self.layers = nn.ModuleList()
        for i in range(layers):
            projections = nn.ModuleDict()
            for j, (name, (d_in, widths)) in enumerate(layer_projections(shape).items()):
                seed = 1000 * i + j
                gen = torch.Generator().manual_seed(seed)
                weight = (torch.randn(sum(widths), d_in, generator=gen) * d_in**-0.5).to(
                    device=device, dtype=dtype
                )
                if variant == "remix":
                    pool = random_pool(
                        d_in, widths, dtype, device, kernel, seed, self.token_slots,
                        num_slots or 1, grouped,
                    )  # fmt: skip
                    projections[name] = FusedRemixLinear(weight, pool)
                elif variant == "lora32":
                    projections[name] = LoraLinear(weight, LORA_RANK, seed)
                else:
                    projections[name] = PlainLinear(weight)
            self.layers.append(projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.layers:
            h = F.rms_norm(x, x.shape[-1:])
            x = x + p["o"](p["qkv"](h)[:, : self.q_width])
            gate, up = p["gate_up"](F.rms_norm(x, x.shape[-1:])).chunk(2, dim=-1)
            x = x + p["down"](F.silu(gate) * up)
        return x


# --- the check on the device -------------------------------------------------------------


def check_fast_path(
    device: str,
    dtype: torch.dtype,
    tokens: int,
    shape: str,
    num_slots: int = 1,
    projections: tuple[str, ...] = ("qkv", "o", "gate_up", "down"),
) -> dict:
    """The fast kernel (triton, serving dtype) against the torch kernel in float32 on the same
    weights and inputs: top-k sets equal except on true ties, outputs within tolerance. With
    several slots: triton's grouped path, the tokens cycling through the base model and every
    slot, against the torch kernel's pool of as many slots."""
    report = {}
    slots = TokenSlots(MAX_TOKENS, num_slots, device) if num_slots > 1 else None
    if slots is not None:
        slots.fill(torch.arange(tokens, device=device) % (num_slots + 1) - 1)
    for name in projections:
        d_in, widths = layer_projections(shape)[name]
        grouped = True if slots is not None else None
        fast = random_pool(d_in, widths, dtype, device, "triton", 7, slots, num_slots, grouped)
        oracle = random_pool(d_in, widths, torch.float32, device, "torch", 7, slots, num_slots)
        with torch.no_grad():  # the oracle holds the serving dtype's values, in float32
            oracle.lora_a.copy_(fast.lora_a.float())
            for b_oracle, b_fast in zip(oracle.lora_b, fast.lora_b, strict=True):
                b_oracle.copy_(b_fast.float())
            weight = torch.randn(sum(widths), d_in, device=device) * d_in**-0.5
            x = torch.randn(tokens, d_in, device=device).to(dtype)
            got = FusedRemixLinear(weight.to(dtype), fast)(x).float()
            oracle_layer = FusedRemixLinear(weight.to(dtype).float(), oracle)
            want = oracle_layer(x.float())
            logits = F.linear(x.float(), oracle.router)
            if slots is not None:  # each token's own slot's
                logits = pick_slot(logits, slots.current(tokens), num_slots)
            logits = logits.unflatten(-1, (len(widths), N))
        differ = (fast.step_selected[:tokens] != oracle.step_selected[:tokens]).any(-1)
        # a true tie: the k-th and (k+1)-th float32 logits within float32 rounding of each other
        top = logits.sort(-1, descending=True).values
        margin = (top[..., K - 1] - top[..., K]).abs()
        tied = margin <= 1e-6 * top.abs().amax(-1).clamp_min(1.0)
        error = ((got - want).norm() / want.norm()).item()
        report[name] = {
            "topk_disagreement": differ.float().mean().item(),
            "disagreement_not_tie": (differ & ~tied).float().mean().item(),
            "relative_error": error,
        }
        if (differ & ~tied).any() or error > 2e-2:
            raise SystemExit(
                f"bench-gpu: the fast path ({num_slots} slots) disagrees with float32 on {name}: "
                f"{report}"
            )
        del fast, oracle
    return report


# --- timing --------------------------------------------------------------------------------


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Seconds per call of fn, synchronised with the device."""

    def run(fn: Callable[[], object]) -> float:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def runner(stack: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """A zero-argument call of the stack on x in this mode (graphs captured here)."""
    if mode == "eager":
        return lambda: stack(x)
    fn = torch.compile(stack, dynamic=True) if mode == "compiled+graph" else stack
    return captured(lambda: fn(x))


def captured(fn: Callable[[], object]) -> Callable[[], object]:
    """fn warmed up (compile, autotune, allocate) and captured in a CUDA graph: its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def launches_per_layer(stack: nn.Module, x: torch.Tensor, compiled: bool) -> float:
    from torch.profiler import ProfilerActivity, profile

    fn = torch.compile(stack, dynamic=True) if compiled else stack
    fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels) / len(stack.layers)


def time_shape(args: argparse.Namespace, shape: str, device: str, dtype, kernel, modes) -> list:
    stacks = {v: DecoderStack(shape, args.layers, v, dtype, device, kernel) for v in VARIANTS}
    clock = timer(device)
    rows = []
    hidden = SHAPES[shape][0]
    for mode in modes:
        for tokens in tqdm(args.tokens, desc=f"{shape} {mode}", leave=False):
            if not within_budget(args, f"{shape} {mode} {tokens} tokens"):
                continue
            x = torch.randn(tokens, hidden, device=device, dtype=dtype)
            with torch.no_grad():
                calls = {v: runner(stacks[v], x, mode) for v in VARIANTS}
                for call in calls.values():
                    call()
                times = {v: [] for v in VARIANTS}
                for _ in range(args.repeats):
                    for v, call in calls.items():
                        times[v].append(clock(call))
            t = {v: statistics.median(times[v]) for v in VARIANTS}
            rows.append(
                {
                    "shape": shape, "mode": mode, "tokens": tokens,
                    **{f"{v}_ms": t[v] * 1e3 for v in VARIANTS},
                    "remix_over_base": t["base"] / t["remix"],
                    "lora32_over_base": t["base"] / t["lora32"],
                    "remix_over_lora32": t["lora32"] / t["remix"],
                }
            )  # fmt: skip
            del calls
    if device == "cuda":
        x = torch.randn(32, hidden, device=device, dtype=dtype)
        with torch.no_grad():
            for v in VARIANTS:
                for compiled in (False, True):
                    key = f"launches_{'compiled' if compiled else 'eager'}"
                    rows.append(
                        {"shape": shape, "variant": v, key: launches_per_layer(stacks[v], x, compiled)}
                    )  # fmt: skip
    return rows


def slot_cases(kernel: str) -> dict[str, tuple[int, bool | None, list[int]]]:
    """SLOT_CASES as (slots, grouped, cycle), the pools' default path; on triton, whose default
    is dense, each case of several slots also on its grouped path ("..., grouped")."""
    cases = {case: (c, None, cycle) for case, (c, cycle) in SLOT_CASES.items()}
    if kernel == "triton":
        cases |= {f"{case}, grouped": (c, True, cycle) for case, (c, _, cycle) in cases.items()
                  if c > 1}  # fmt: skip
    return cases


def time_slots(args: argparse.Namespace, shape: str, device: str, dtype, kernel, mode) -> list:
    """Checkpoint slots: the stack with pools of 1 and of 8 slots, each token's slot from
    `slot_cases`, against the one-slot stack serving one checkpoint and the stack without
    adapters; the cases interleaved within each repeat. (CUDA graphs read the slot buffer in
    place.)"""
    cases = slot_cases(kernel)
    stacks = {
        (c, grouped): DecoderStack(shape, args.layers, "remix", dtype, device, kernel, c, grouped)
        for c, grouped in {(c, grouped) for c, grouped, _ in cases.values()}
    }
    plain = DecoderStack(shape, args.layers, "base", dtype, device, kernel)
    clock, rows = timer(device), []
    for tokens in tqdm(args.slot_tokens, desc=f"{shape} {mode} slots", leave=False):
        if not within_budget(args, f"{shape} {mode} slots {tokens} tokens"):
            continue
        x = torch.randn(tokens, SHAPES[shape][0], device=device, dtype=dtype)
        with torch.no_grad():
            calls = {key: runner(stack, x, mode) for key, stack in stacks.items()}
            base_call = runner(plain, x, mode)
            times: dict[str, list[float]] = {case: [] for case in ["base", *cases]}
            for _ in range(args.repeats):
                times["base"].append(clock(base_call))
                for case, (num_slots, grouped, cycle) in cases.items():
                    slots = torch.tensor([cycle[i % len(cycle)] for i in range(tokens)])
                    stacks[num_slots, grouped].token_slots.fill(slots.to(device))
                    calls[num_slots, grouped]()  # warm: a new mix may take another path
                    times[case].append(clock(calls[num_slots, grouped]))
        t = {case: statistics.median(runs) for case, runs in times.items()}
        one = t["one checkpoint, 1 slot"]
        for case in cases:
            rows.append({"shape": shape, "mode": mode, "tokens": tokens, "case": case,
                         "ms": t[case] * 1e3, "over_one_checkpoint": one / t[case],
                         "over_base": t["base"] / t[case]})  # fmt: skip
    return rows


def within_budget(args: argparse.Namespace, part: str) -> bool:
    """Whether the run's time budget (--budget-s) still allows a part; if not, it is noted
    as skipped."""
    if time.monotonic() < args.deadline:
        return True
    args.skipped.append(part)
    return False


def route_call(pool: RemixPool, tokens: int, config: dict) -> Callable[[], None]:
    """One launch of the routing kernel on random x with the pool's tensors, in a configuration
    of `route` (triton_route.CONFIGURATIONS)."""
    layout, a = pool.layout, pool.lora_a
    x = torch.randn(tokens, layout.in_features, device=a.device).to(a.dtype)
    out = x.new_empty(tokens, layout.in_features + layout.pool_width)
    return lambda: route(
        x, a, pool.router, None, out, pool.stats, pool.step_selected, pool.semaphore, None,
        None, N, R, K, layout.omega, False, **config,
    )  # fmt: skip


def sweep_configurations(args: argparse.Namespace, shape: str, device: str, dtype) -> list:
    """`route`'s configurations on one decoder layer's four projections: the routing kernel
    alone (captured in a CUDA graph on a GPU), configurations interleaved within each repeat;
    per token count, each one's time and the fastest."""
    pools = [
        random_pool(d_in, widths, dtype, device, "triton", seed)
        for seed, (d_in, widths) in enumerate(layer_projections(shape).values())
    ]
    clock, rows = timer(device), []
    for tokens in tqdm(args.sweep_tokens, desc=f"{shape} sweep", leave=False):
        if not within_budget(args, f"{shape} sweep {tokens} tokens"):
            continue
        calls = {}
        for name, config in CONFIGURATIONS.items():
            layer = [route_call(pool, tokens, config) for pool in pools]
            call = lambda layer=layer: [launch() for launch in layer]  # noqa: E731
            calls[name] = captured(call) if device == "cuda" else call
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                times[name].append(clock(call))
        us = {name: statistics.median(runs) * 1e6 for name, runs in times.items()}
        fastest = min(us, key=us.get)
        rows.append({"shape": shape, "tokens": tokens, "sweep_us": us, "fastest": fastest,
                     "default_over_fastest": us["default"] / us[fastest]})  # fmt: skip
    return rows


def plot(rows: list[dict], path) -> None:
    try:
        import matplotlib
    except ImportError:  # optional: no figure
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "mode" in r and "case" not in r]
    shapes = sorted({r["shape"] for r in timed})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for i, mode in enumerate(sorted({r["mode"] for r in timed if r["shape"] == shape})):
            sub = [r for r in timed if r["shape"] == shape and r["mode"] == mode]
            tokens = [r["tokens"] for r in sub]
            ax.plot(tokens, [r["remix_over_base"] for r in sub], "o-", color=f"C{i}",
                    label=f"ReMix, {mode}")  # fmt: skip
            ax.plot(tokens, [r["lora32_over_base"] for r in sub], "x:", color=f"C{i}",
                    label=f"rank-32 LoRA, {mode}")  # fmt: skip
        ax.axhline(0.85, color="grey", linewidth=0.8, linestyle="--")
        ax.set(xscale="log", xlabel="tokens", ylabel="base time / variant time", ylim=(0, 1.05),
               title=f"{shape}: n={N} k={K} r={R}")  # fmt: skip
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary(rows: list[dict], shape: str, mode: str, device_name: str, check: dict) -> dict:
    timed = {
        r["tokens"]: r
        for r in rows
        if r.get("shape") == shape and r.get("mode") == mode and "case" not in r
    }
    decode = timed[min(timed, key=lambda t: abs(t - 32))]
    prefill = timed[min(timed, key=lambda t: abs(t - 4096))]
    return {
        "device": device_name,
        "shape": shape,
        "mode": mode,
        "remix_over_base_decode": round(decode["remix_over_base"], 3),
        "decode_tokens": decode["tokens"],
        "remix_over_base_prefill": round(prefill["remix_over_base"], 3),
        "prefill_tokens": prefill["tokens"],
        "remix_over_lora32": round(min(r["remix_over_lora32"] for r in timed.values()), 3),
        "bf16_topk_disagreement": max(c["topk_disagreement"] for c in check.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--shapes", nargs="+")
    parser.add_argument(
        "--slot-tokens", type=int, nargs="+", default=[32, 256], help="checkpoint slots' part"
    )
    parser.add_argument(
        "--sweep-tokens", type=int, nargs="+", help="configurations' sweep (GPU default: --tokens)"
    )
    parser.add_argument("--budget-s", type=float, help="skip what would start after this")
    parser.add_argument("--quick", action="store_true", help=f"compiled+graph only, {QUICK}")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where results go")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = args.tokens or QUICK["tokens"], QUICK["repeats"]
        args.slot_tokens, args.budget_s = QUICK["slot_tokens"], args.budget_s or QUICK["budget_s"]
    args.deadline = time.monotonic() + (args.budget_s or float("inf"))
    args.skipped = []
    torch._dynamo.config.cache_size_limit = 64  # one compiled stack per variant and shape
    if torch.cuda.is_available():
        device, dtype, kernel = "cuda", torch.bfloat16, "triton"
        shapes, modes = (
            args.shapes or ["llama3-8b", "llama3.2-1b"],
            ["compiled+graph"] if args.quick else ["eager", "graph", "compiled+graph"],
        )
        args.tokens = args.tokens or [1, 8, 32, 128, 256, 512, 2048, 4096, 8192]
        args.sweep_tokens = args.sweep_tokens or args.tokens
        device_name = torch.cuda.get_device_name()
        check = check_fast_path(device, dtype, 4096, shapes[0])
        check_slots = check_fast_path(device, dtype, 4096, shapes[0], num_slots=8)
    else:
        print("bench-gpu: no GPU here; running the small CPU shape (eager, float32, torch kernel)"
              " and the Triton kernel's check in its interpreter", file=sys.stderr)  # fmt: skip
        device, dtype, kernel = "cpu", torch.float32, "torch"
        shapes, modes = args.shapes or ["cpu-small"], ["eager"]
        args.tokens = args.tokens or [1, 8, 32, 128, 512, 4096]
        args.repeats = min(args.repeats, 5)
        device_name = f"cpu ({machine()}): no GPU, small shape"
        check = check_fast_path("cpu", torch.bfloat16, 256, "cpu-small")
        # the interpreter runs each program in Python: one projection, one token per slot
        check_slots = check_fast_path("cpu", torch.bfloat16, 9, "cpu-small", 8, ("qkv",))
    print(f"check on {device}: {json.dumps(check)}; grouped, 8 slots: {json.dumps(check_slots)}",
          file=sys.stderr)  # fmt: skip
    rows = []
    for shape in shapes:
        rows += time_shape(args, shape, device, dtype, kernel, modes)
    sweep_rows = [r for shape in shapes if args.sweep_tokens
                  for r in sweep_configurations(args, shape, device, dtype)]  # fmt: skip
    # slots on CPU: the numba kernel, whose grouped products serve several slots there
    slot_kernel = kernel if device == "cuda" else "numba"
    slot_rows = time_slots(args, shapes[0], device, dtype, slot_kernel, modes[-1])
    rows += slot_rows
    for r in sweep_rows:
        print(f"{r['shape']:12s} sweep {r['tokens']:5d} tokens  fastest: {r['fastest']} "
              f"{r['sweep_us'][r['fastest']]:.1f} us, default {r['sweep_us']['default']:.1f} us",
              file=sys.stderr)  # fmt: skip
    for r in rows:
        if "case" in r:
            print(f"{r['shape']:12s} {r['mode']:15s} {r['tokens']:5d} tokens  {r['case']:36s} "
                  f"over one checkpoint {r['over_one_checkpoint']:.3f}  over base "
                  f"{r['over_base']:.3f}", file=sys.stderr)  # fmt: skip
        elif "mode" in r:
            print(f"{r['shape']:12s} {r['mode']:15s} {r['tokens']:5d} tokens  remix/base "
                  f"{r['remix_over_base']:.3f}  lora32/base {r['lora32_over_base']:.3f}  "
                  f"remix/lora32 {r['remix_over_lora32']:.3f}", file=sys.stderr)  # fmt: skip
        else:
            print(f"{r['shape']:12s} launches per layer {r}", file=sys.stderr)
    line = summary(rows, shapes[0], modes[-1], device_name, check)
    for r in slot_rows:  # at the decode-like token count
        if r["tokens"] == args.slot_tokens[0]:
            line[f"slots {r['case']} / one checkpoint"] = round(r["over_one_checkpoint"], 3)
    line["bf16_topk_disagreement_grouped_slots"] = max(
        c["topk_disagreement"] for c in check_slots.values()
    )
    line["fastest configuration"] = {
        f"{r['shape']} {r['tokens']}": r["fastest"] for r in sweep_rows
    }
    line["skipped (budget)"] = args.skipped
    results = {"summary": line, "check": check, "check_grouped_slots": check_slots,
               "rows": rows, "sweep": sweep_rows, "revision": git_revision(), "machine": machine(),
               "layers": args.layers, "pool": {"n": N, "k": K, "r": R}}  # fmt: skip
    path = save_results("gpu", results, args.results)
    plot(rows, path.with_suffix(".png"))
    print(f"results: {path} (+ .png)", file=sys.stderr)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
