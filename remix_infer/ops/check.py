"""`make gpu-check` (`python -m remix_infer.ops.check`): the Triton kernels against the float32
torch path, with torch and Triton alone (plus numpy for the interpreter).

On a GPU: the dense routing kernel and the grouped shrink and expand kernels at Llama-3-8B and
Llama-3.2-1B widths, bf16 and fp16, T in {1, 7, 16, 33, 300, 2048}. Without one: the same checks
in Triton's interpreter at a small shape (`make test` runs it: tests/test_ops_check.py). Each
fast pool (the triton kernel, serving dtype) runs beside an oracle pool (the torch kernel,
float32) holding the same values; the last quarter of the rows are padding. Checks:

    selections  each real token's top-k equals the oracle's except on a true tie (TIE_MARGIN)
    outputs     ||fast - oracle|| / ||oracle|| <= 4 eps(dtype) over the untied rows
    counters    tokens and selections per slot and part exactly the oracle's (and padding
                rows not counted); entropy and ESS sums within float32 rounding
    splits      forced splits 1/2/3/7/16: every relaunch bit-identical to the first (50 on a
                GPU, 2 in the interpreter), tickets back to zero, each split within tolerance
                of split 1
    graph       (GPU) a CUDA-graph replay equal to eager
    compiled    (GPU) torch.compile(dynamic=True) then graph capture equal to eager

Grouped: 8-slot pools, the tokens cycling through the base model and every slot, on triton's
grouped path (shrink, expand) and its dense one. Prints one table, then one JSON verdict line;
exits non-zero on any failure. `quick_check` is the subset the engine runs at start for each
served geometry (vllm_plugin/kernel_check.py).

Tolerances, from the arithmetic. The fast path's inputs are the oracle's, rounded to the dtype
first (the oracle holds the same rounded values in float32). Logits are float32 on both sides,
summed in another order: a dot product of d terms is off by at most d * 2^-24 * sum |x_i p_i|
(first order), so two of them differ by at most TIE_MARGIN = 2 d 2^-24 sum_i |x_i| |p_i| (plus
the bias's rounding); a token whose k-th and (k+1)-th logits are closer than that is a true tie.
The output: the fast path rounds the hidden states and the output to the dtype (each at most
eps/2 relative) and accumulates in float32; 4 eps in norm leaves a factor of two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # chosen when a kernel is defined: before triton_route loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from remix_infer.ops.pool import FusedRemixLinear, PoolLayout, RemixPool  # noqa: E402
from remix_infer.ops.slots import TokenSlots, pick_slot  # noqa: E402
from remix_infer.ops.stats import padding_rows  # noqa: E402
from remix_infer.ops.triton_route import CONFIGURATIONS  # noqa: E402

N, K, R = 8, 4, 8  # the pool of `make bench-gpu`
OMEGA = 2.0 / (K * R)
SHAPES = {  # hidden, q width, kv width, intermediate
    "llama3-8b": (4096, 4096, 1024, 14336),
    "llama3.2-1b": (2048, 2048, 512, 8192),
    "small": (256, 256, 64, 384),  # the interpreter's: two blocks of d_in to split
}
GPU_TOKENS = (1, 7, 16, 33, 300, 2048)
SPLITS = (1, 2, 3, 7, 16)
SLOTS = 8
TIE_MARGIN = "2 * d_in * 2^-24 * sum_i |x_i| |p_i| per token (float32 dot products in any order)"


@dataclass(frozen=True)
class Geometry:
    """What a fast pool is checked at: its layout (this rank's shard), dtype, path."""

    name: str
    layout: PoolLayout
    dtype: torch.dtype
    grouped: bool = False
    config: str = "default"  # the routing kernel's (triton_route.CONFIGURATIONS; dense path)

    def label(self) -> str:
        lay = self.layout
        path = "grouped" if self.grouped else "dense"
        dtype = str(self.dtype).removeprefix("torch.")
        config = "" if self.config == "default" else f" [{self.config}]"
        return (
            f"{self.name} {dtype} d_in={lay.in_features} parts={list(lay.part_widths)} "
            f"n={lay.num_loras} k={lay.top_k} r={lay.rank} slots={lay.num_slots} {path}{config}"
        )


@dataclass
class Outcome:
    check: str
    geometry: str
    tokens: int | None
    passed: bool
    detail: str = ""


@dataclass
class Pair:
    """A fast pool and its float32 oracle over the same (dtype-rounded) weights."""

    fast: FusedRemixLinear
    oracle: FusedRemixLinear
    slots: tuple[TokenSlots, TokenSlots] | tuple[()] = ()
    weight: torch.Tensor = field(default=None)  # the base weight, float32 of the dtype's values


def llama_geometries(
    shape: str,
    dtype: torch.dtype,
    num_slots: int = 1,
    only: tuple[str, ...] = ("qkv", "o", "gate_up", "down"),
) -> list[Geometry]:
    """A decoder layer's four projections at `shape`, each with a pool on every part; with
    several slots both of triton's paths."""
    hidden, q, kv, inter = SHAPES[shape]
    projections = {
        "qkv": (hidden, (q, kv, kv)),
        "o": (q, (hidden,)),
        "gate_up": (hidden, (inter, inter)),
        "down": (inter, (hidden,)),
    }
    paths = (False,) if num_slots == 1 else (False, True)
    return [
        Geometry(
            f"{shape} {name}",
            PoolLayout(
                d_in, widths, tuple(range(len(widths))), N, R, K, OMEGA, "constant", 0, num_slots
            ),
            dtype,
            grouped,
        )  # fmt: skip
        for name, (d_in, widths) in projections.items()
        if name in only
        for grouped in paths
    ]


def build_pair(geometry: Geometry, device: str, max_tokens: int, seed: int = 7) -> Pair:
    """Random weights (a ReMix term about as large as the base product, so that a wrong term
    shows), loaded into a triton pool in the dtype and a torch pool in float32."""
    layout, dtype = geometry.layout, geometry.dtype
    gen = torch.Generator(device).manual_seed(seed)  # on the device: GPU widths are large
    d_in = layout.in_features

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale

    weight = rand(layout.out_features, d_in, scale=d_in**-0.5).to(dtype).float()
    slots = ()
    if layout.num_slots > 1:
        slots = (TokenSlots(max_tokens, layout.num_slots, device),) * 2
    pools = []
    for kernel, pool_dtype in (("triton", dtype), ("torch", torch.float32)):
        grouped = geometry.grouped if kernel == "triton" else None
        token_slots = slots[0] if slots else None
        pools.append(
            RemixPool(layout, pool_dtype, max_tokens, True, kernel, device=device,
                      slots=token_slots, grouped=grouped)
        )  # fmt: skip
    fast, oracle = pools
    if not fast.grouped:
        fast.path.route_config = CONFIGURATIONS[geometry.config]
    with torch.no_grad():
        fast.lora_a.copy_(rand(*fast.lora_a.shape, scale=d_in**-0.5))
        fast.router.copy_(rand(*fast.router.shape, scale=d_in**-0.5))
        fast.router_bias.copy_(rand(*fast.router_bias.shape, scale=0.5))
        for b in fast.lora_b:
            b.copy_(rand(*b.shape, scale=1.0))
        for mine, theirs in zip(oracle.parameters(), fast.parameters(), strict=True):
            mine.copy_(theirs.float())
    return Pair(
        FusedRemixLinear(weight.to(dtype), fast), FusedRemixLinear(weight, oracle), slots, weight
    )


def step_slots(tokens: int, num_slots: int) -> torch.Tensor | None:
    """Each token's slot: cycling through the base model (-1) and every slot."""
    if num_slots == 1:
        return None
    return torch.arange(tokens) % (num_slots + 1) - 1


def padding_of(tokens: int) -> torch.Tensor:
    """The last quarter of the rows pad the step (routed, not counted)."""
    padding = torch.zeros(tokens, dtype=torch.bool)
    padding[tokens - tokens // 4 :] = True
    return padding


def run(layer: FusedRemixLinear, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """One forward with this padding mask, its statistics from zero."""
    layer.pool.stats.zero_()
    with padding_rows(padding), torch.no_grad():
        return layer(x)


def tied_tokens(pair: Pair, x: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
    """[T] bool: some part's k-th and (k+1)-th float32 logits within TIE_MARGIN."""
    pool = pair.oracle.pool
    layout = pool.layout
    c, s, n, k = layout.num_slots, layout.num_parts, layout.num_loras, layout.top_k
    xf = x.float()
    logits = F.linear(xf, pool.router)
    bound = 2 * layout.in_features * 2.0**-24 * F.linear(xf.abs(), pool.router.abs())
    if c > 1:
        logits, bound = pick_slot(logits, slots, c), pick_slot(bound, slots, c)
    logits = (
        logits.unflatten(-1, (s, n))
        + pool.router_bias.view(c, s, n)[slots.clamp(min=0) if slots is not None else 0]
    )
    bound = bound.unflatten(-1, (s, n)).amax(-1) + 2.0**-23 * logits.abs().amax(-1)
    top = logits.sort(-1, descending=True).values
    return ((top[..., k - 1] - top[..., k]) <= bound).any(-1)


def compare(pair: Pair, geometry: Geometry, tokens: int, device: str) -> list[Outcome]:
    """Selections, outputs and counters of one step of `tokens` rows."""
    label, dtype = geometry.label(), geometry.dtype
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, geometry.layout.in_features, generator=gen, device="cpu")
    x = x.to(device, dtype)
    slots = step_slots(tokens, geometry.layout.num_slots)
    if slots is not None:
        slots = slots.to(device)
        pair.slots[0].fill(slots)
    padding = padding_of(tokens).to(device)
    got = run(pair.fast, x, padding).float()
    want = run(pair.oracle, x.float(), padding)
    real = ~padding if slots is None else ~padding & (slots >= 0)  # routed, counted tokens
    tied = tied_tokens(pair, x, slots) & real
    chosen = pair.fast.pool.step_selected[:tokens], pair.oracle.pool.step_selected[:tokens]
    differ = (chosen[0] != chosen[1]).flatten(1).any(-1) & real
    untied_differ = int((differ & ~tied).sum())
    keep = ~(differ & tied)
    error = ((got - want)[keep].norm() / want[keep].norm().clamp_min(1e-30)).item()
    tolerance = 4 * torch.finfo(dtype).eps
    outcomes = [
        Outcome("selections", label, tokens, untied_differ == 0,
                f"{untied_differ} untied tokens differ, {int(tied.sum())} tied"),
        Outcome("outputs", label, tokens, error <= tolerance,
                f"relative error {error:.2e} (<= {tolerance:.1e})"),
    ]  # fmt: skip
    outcomes.append(compare_counters(pair, label, tokens, slots, real, bool(tied.any())))
    return outcomes


def compare_counters(
    pair: Pair,
    label: str,
    tokens: int,
    slots: torch.Tensor | None,
    real: torch.Tensor,
    tied: bool,
) -> Outcome:
    """Tokens (real ones of each slot: padding and base-model rows not counted) and selections
    exactly; entropy and ESS sums within float32 rounding of logits within TIE_MARGIN."""
    layout = pair.oracle.pool.layout
    n, s, c = layout.num_loras, layout.num_parts, layout.num_slots
    got, want = pair.fast.pool.stats.cpu(), pair.oracle.pool.stats.cpu()
    owner = slots.cpu() if slots is not None else torch.zeros(tokens, dtype=torch.long)
    counted = torch.bincount(owner[real.cpu() & (owner >= 0)], minlength=c).double()
    expected_tokens = counted.repeat_interleave(s)
    problems = []
    if not torch.equal(got[:, n], expected_tokens):
        problems.append(f"tokens {got[:, n].tolist()} != {expected_tokens.tolist()}")
    if not tied and not torch.equal(got[:, :n], want[:, :n]):
        problems.append("selection counts differ")
    # per token: entropy moves by at most (1 + ln n) times the logits' change, ESS likewise
    slack = float(expected_tokens.max()) * (n * 2.0**-22 + 1e-5 * (1 + math.log(n)))
    worst = (got[:, n + 1 :] - want[:, n + 1 :]).abs().max().item()
    if not tied and worst > slack:
        problems.append(f"entropy/ESS sums differ by {worst:.2e} (> {slack:.1e})")
    return Outcome("counters", label, tokens, not problems, "; ".join(problems) or "equal")


def launch_split(pool: RemixPool, x: torch.Tensor, split: int) -> tuple[torch.Tensor, ...]:
    """One launch of the pool's routing kernel at a forced split: (its output, statistics,
    selections), copies."""
    from remix_infer.ops.triton_grouped import shrink_route
    from remix_infer.ops.triton_route import route

    layout = pool.layout
    pool.stats.zero_()
    args = (layout.num_loras, layout.rank, layout.top_k, layout.omega, False)
    if pool.grouped:
        out = x.new_empty(x.shape[0], layout.slot_width)
        groups = pool.slots
        shrink_route(
            x, groups.order, groups.counts, pool.lora_a, pool.router, pool.router_bias,
            pool.always_a, out, None, pool.stats, pool.step_selected, pool.path.semaphore,
            *args, split=split,
        )  # fmt: skip
    else:
        out = x.new_zeros(x.shape[0], layout.in_features + layout.pool_width)
        route(
            x, pool.lora_a, pool.router, pool.router_bias, out, pool.stats, pool.step_selected,
            pool.path.semaphore, None, None, *args, split=split, **pool.path.route_config,
        )  # fmt: skip
    return out.clone(), pool.stats.clone(), pool.step_selected[: x.shape[0]].clone()


def check_splits(
    pair: Pair,
    geometry: Geometry,
    tokens: int,
    device: str,
    splits: tuple[int, ...],
    relaunches: int,
) -> list[Outcome]:
    """Forced splits: each relaunch bit-identical to the first, tickets reset, each split's
    selections those of split 1 and its gated hidden states within the dtype's tolerance."""
    pool, label = pair.fast.pool, geometry.label()
    if pool.layout.num_slots > 1 and not pool.grouped:
        return []  # the dense kernel routes given products there: no reduction to split
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, pool.layout.in_features, generator=gen, device="cpu")
    x = x.to(device, geometry.dtype)
    slots = step_slots(tokens, pool.layout.num_slots)
    if slots is not None:
        pair.slots[0].fill(slots.to(device))
    first = launch_split(pool, x, splits[0])
    problems = []
    for split in splits:
        one = launch_split(pool, x, split)
        for _ in range(relaunches - 1):
            again = launch_split(pool, x, split)
            if not all(torch.equal(a, b) for a, b in zip(one, again, strict=True)):
                problems.append(f"split {split}: a relaunch differs")
                break
        if int(pool.path.semaphore.abs().sum()):
            problems.append(f"split {split}: tickets not reset")
        scale = first[0].float().norm().clamp_min(1e-30)
        error = ((one[0].float() - first[0].float()).norm() / scale).item()
        if error > 4 * torch.finfo(geometry.dtype).eps:
            problems.append(f"split {split}: {error:.2e} from split 1")
    detail = "; ".join(problems) or f"splits {list(splits)} x {relaunches} launches identical"
    return [Outcome("splits", label, tokens, not problems, detail)]


def check_graphs(pair: Pair, geometry: Geometry, tokens: int, device: str) -> list[Outcome]:
    """A CUDA graph of eager mode, and torch.compile(dynamic=True) captured in a graph, each
    replayed against eager (on a GPU only)."""
    if device != "cuda":
        return []
    layer, label = pair.fast, geometry.label()
    x = torch.randn(tokens, geometry.layout.in_features, device=device, dtype=geometry.dtype)
    with torch.no_grad():
        eager = layer(x).clone()
        chosen = layer.pool.step_selected[:tokens].clone()
        outcomes = []
        compiled = torch.compile(layer, dynamic=True)
        for name, fn in (("graph", layer), ("compiled", compiled)):
            replay, out = capture(fn, x)
            replay()
            torch.cuda.synchronize()
            same = torch.equal(layer.pool.step_selected[:tokens], chosen)
            error = ((out.float() - eager.float()).norm() / eager.float().norm()).item()
            exact = torch.equal(out, eager)
            passed = same and (exact or (name == "compiled" and error <= 4 * eps(geometry)))
            detail = f"selections {'equal' if same else 'differ'}, relative error {error:.1e}"
            outcomes.append(Outcome(name, label, tokens, passed, detail))
    return outcomes


def eps(geometry: Geometry) -> float:
    return torch.finfo(geometry.dtype).eps


def capture(fn: Callable, x: torch.Tensor) -> tuple[Callable[[], None], torch.Tensor]:
    """fn(x) captured in a CUDA graph after a warm-up on a side stream; (replay, its output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x)
    return graph.replay, out


def check_geometry(
    geometry: Geometry,
    device: str,
    tokens: tuple[int, ...],
    relaunches: int,
    split_tokens: tuple[int, ...] = (),
    graph_tokens: tuple[int, ...] = (),
    splits: tuple[int, ...] = SPLITS,
) -> list[Outcome]:
    """Every check of one geometry; a crash is a failed check, not a stack trace."""
    label = geometry.label()
    try:
        pair = build_pair(geometry, device, max(tokens + split_tokens + graph_tokens))
        outcomes = []
        for t in tokens:
            outcomes += compare(pair, geometry, t, device)
        for t in split_tokens:
            outcomes += check_splits(pair, geometry, t, device, splits, relaunches)
        for t in graph_tokens:
            outcomes += check_graphs(pair, geometry, t, device)
        return outcomes
    except Exception as error:  # noqa: BLE001 (reported as the geometry's failed check)
        return [Outcome("runs", label, None, False, f"{type(error).__name__}: {error}")]


def quick_check(
    layout: PoolLayout, dtype: torch.dtype, device: str, grouped: bool = False
) -> list[Outcome]:
    """The engine's start-up subset for one served geometry: selections, outputs and counters at
    1 token (on a GPU the split reduction) and 33 (several blocks, padding rows)."""
    return check_geometry(Geometry("served", layout, dtype, grouped), device, (1, 33), 1)


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.passed]


def full_check(device: str) -> list[Outcome]:
    """The whole check: GPU widths on a GPU; elsewhere the interpreter, which runs each program
    in Python, at the small shape: every path and dtype, fewer projections and token counts."""
    if device == "cuda":
        shapes, projections = ("llama3-8b", "llama3.2-1b"), ("qkv", "o", "gate_up", "down")
        return plan_check(
            device, shapes, projections, GPU_TOKENS, (33, 300), SPLITS, 50, (16,)
        ) + check_configurations(device, shapes, projections, (1, 33, 300), SPLITS, 50)
    return plan_check(
        device, ("small",), ("qkv",), (1, 33), (33,), (1, 2, 3), 2, ()
    ) + check_configurations(device, ("small",), ("qkv",), (1, 33), (1, 2, 3), 2)


def check_configurations(
    device: str,
    shapes: tuple[str, ...],
    projections: tuple[str, ...],
    tokens: tuple[int, ...],
    splits: tuple[int, ...],
    relaunches: int,
) -> list[Outcome]:
    """The routing kernel's other configurations (triton_route.CONFIGURATIONS: what `make
    bench-gpu` sweeps) through the one-slot dense pool, bf16: the same checks as the default's
    (selections, outputs, counters; forced splits at 33 tokens), no graphs."""
    outcomes = []
    for shape in shapes:
        for geometry in llama_geometries(shape, torch.bfloat16, 1, projections):
            for name in CONFIGURATIONS:
                if name != "default":
                    outcomes += check_geometry(
                        replace(geometry, config=name), device, tokens, relaunches, (33,),
                        (), splits,
                    )  # fmt: skip
    return outcomes


def plan_check(
    device: str,
    shapes: tuple[str, ...],
    projections: tuple[str, ...],
    tokens: tuple[int, ...],
    slot_tokens: tuple[int, ...],
    splits: tuple[int, ...],
    relaunches: int,
    graph_tokens: tuple[int, ...],
) -> list[Outcome]:
    """Every geometry of these shapes and projections in bf16 and fp16, one slot and SLOTS;
    splits at 33 tokens (bf16) and graphs at graph_tokens (`graphed`)."""
    outcomes = []
    for shape in shapes:
        for dtype in (torch.bfloat16, torch.float16):
            split_tokens = (33,) if dtype == torch.bfloat16 else ()
            for num_slots, step_tokens in ((1, tokens), (SLOTS, slot_tokens)):
                for geometry in llama_geometries(shape, dtype, num_slots, projections):
                    outcomes += check_geometry(
                        geometry, device, step_tokens, relaunches, split_tokens,
                        graph_tokens if graphed(geometry) else (), splits,
                    )  # fmt: skip
    return outcomes


def graphed(geometry: Geometry) -> bool:
    """Graph and compile checks: one-slot qkv only (each torch.compile costs seconds)."""
    return geometry.layout.num_slots == 1 and geometry.name.endswith("qkv")


def table(outcomes: list[Outcome]) -> str:
    """One row per check and geometry: its token counts, and the first failure's detail."""
    rows: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        rows.setdefault((o.check, o.geometry), []).append(o)
    lines = [f"{'check':<11} {'result':<6} {'tokens':<22} geometry / detail"]
    for (check, geometry), group in rows.items():
        bad = failures(group)
        tokens = ",".join(str(o.tokens) for o in group if o.tokens is not None) or "-"
        shown = bad[0].detail if bad else group[-1].detail
        lines.append(f"{check:<11} {'FAIL' if bad else 'ok':<6} {tokens:<22} {geometry}")
        lines.append(f"{'':<41} {shown}")
    return "\n".join(lines)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return "cpu (Triton interpreter)"


def triton_version() -> str:
    import triton

    return triton.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    outcomes = full_check(device)
    bad = failures(outcomes)
    print(table(outcomes), file=sys.stderr)
    verdict = {
        "verdict": "fail" if bad else "pass",
        "device": device_name(device),
        "triton": triton_version(),
        "torch": torch.__version__,
        "checks": len(outcomes),
        "failed": [f"{o.check} {o.geometry} T={o.tokens}: {o.detail}" for o in bad[:10]],
        "tie_margin": TIE_MARGIN,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(verdict))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
