"""The Triton kernels compiled ahead of time for NVIDIA GPUs, on a machine without one.

    python -m remix_infer.ops.aot_compile [--json]

The launchers (`route`, `shrink_route`, `expand`) run on meta tensors with their kernels
replaced by a recorder, for every launch that the engine and `make bench-gpu` make at the
Llama-3-8B and Llama-3.2-1B geometries (LAUNCHES; the bench pool n=8, k=4, r=8; the split each
launcher chooses on an A100 or an H100); every distinct specialisation is compiled by Triton's
own compiler and its bundled ptxas for sm_80 (A100) and sm_90 (H100). Prints one row per
(target, kernel specialisation): registers and spills (the cubin's resource usage), shared
memory against the target's limit, and which launches use it. Needs torch and Triton only; Triton's interpreter
must be off (TRITON_INTERPRET unset): it replaces the kernels by Python functions.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from remix_infer.ops import stats as stats_module
from remix_infer.ops import triton_grouped, triton_route
from remix_infer.ops.shapes import BENCH_POOL, LLAMA_SHAPES, projection_shapes

META = torch.device("meta")
N, K, R = BENCH_POOL["num_loras"], BENCH_POOL["top_k"], BENCH_POOL["rank"]
MAX_TOKENS = 8192  # the engine's and bench-gpu's largest step
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass(frozen=True)
class Target:
    name: str
    capability: int
    sms: int  # of the GPU the split is chosen for
    max_shared: int  # bytes of shared memory one program may use


TARGETS = (Target("sm_80", 80, 108, 166912), Target("sm_90", 90, 132, 232448))  # A100, H100


def every_block_count() -> list[int]:
    """One token count per block count up to MAX_TOKENS: the token count itself is not
    specialised (triton_route.NOT_SPECIALIZED), the block size and the split are."""
    return [16 * b for b in range(1, 17)] + [64 * b for b in range(5, MAX_TOKENS // 64 + 1)]


BENCH_TOKENS = [1, 8, 32, 128, 256, 512, 2048, 4096, 8192]  # bench_gpu's default token counts


@dataclass(frozen=True)
class Launches:
    """One way the kernels are launched: the path, dtypes, slots, and token counts."""

    use: str
    path: str  # "dense" (products in the kernel), "dense given" (products given), "grouped"
    dtypes: tuple[torch.dtype, ...]
    tokens: tuple[int, ...]
    num_slots: int = 1
    with_slots: bool = True  # a slot buffer (the engine's pools always have one)
    padding: bool = False  # a padding mask covers the rows (the engine's CUDA-graph padding)
    configs: tuple[dict, ...] = ({},)  # `route`'s configurations (the default: {})


LAUNCHES = (
    Launches("engine, 1 checkpoint", "dense", (torch.bfloat16, torch.float16),
             tuple(every_block_count()), padding=True),
    Launches("engine, 8 checkpoints", "dense given", (torch.bfloat16, torch.float16),
             tuple(every_block_count()), num_slots=8, padding=True),
    Launches("bench-gpu stack", "dense", (torch.bfloat16,), tuple(BENCH_TOKENS), with_slots=False),
    Launches("bench-gpu slots, 1 slot", "dense", (torch.bfloat16,), (32, 256)),
    Launches("bench-gpu slots, 8 dense", "dense given", (torch.bfloat16,), (32, 256), 8),
    Launches("bench-gpu slots, 8 grouped", "grouped", (torch.bfloat16,), (32, 256, 4096), 8),
    Launches("bench-gpu sweep", "dense", (torch.bfloat16,), tuple(BENCH_TOKENS), with_slots=False,
             configs=tuple(triton_route.CONFIGURATIONS.values())),
)  # fmt: skip


@dataclass
class Compiled:
    """One kernel specialisation compiled for one target."""

    target: str
    kernel: str
    config: str  # the constexprs that tell specialisations apart
    registers: int
    stack_bytes: int  # per thread: ptxas' spills
    shared: int
    fits: bool  # shared memory within the target's limit
    decode: bool  # a block of 16 tokens: the decode configurations
    uses: list[str] = field(default_factory=list)


@contextlib.contextmanager
def recorded(target: Target) -> Iterator[list[tuple]]:
    """Within: the kernels' launches are recorded as (kernel, args, kwargs), not run, and the
    launchers choose their split for the target's GPU."""
    launches: list[tuple] = []

    class Recorder:
        def __init__(self, kernel: triton.JITFunction) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: tuple) -> Callable[..., None]:
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    kernels = [
        (triton_route, "_remix_route_kernel"),
        (triton_grouped, "_grouped_shrink_route_kernel"),
        (triton_grouped, "_grouped_expand_kernel"),
    ]
    with contextlib.ExitStack() as stack:
        for module, name in kernels:
            stack.enter_context(mock.patch.object(module, name, Recorder(getattr(module, name))))
        stack.enter_context(
            mock.patch.object(triton_route, "_target_programs", lambda: 2 * target.sms)
        )
        yield launches


def launch(
    spec: Launches, dtype: torch.dtype, d_in: int, widths: list[int], tokens: int, config: dict
) -> None:
    """Call the launchers as a pool of this projection does (meta tensors)."""
    s, c = len(widths), spec.num_slots

    def empty(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device=META)

    x = empty(tokens, d_in)
    lora_a, router = empty(c * s * N * R, d_in), empty(c * s * N, d_in, dtype=torch.float32)
    stats = empty(c * s, N + 3, dtype=torch.float64)
    selected = empty(MAX_TOKENS, s, N, dtype=torch.uint8)
    semaphore = empty(c * triton_route.semaphore_size(MAX_TOKENS, s), dtype=torch.int32)
    slots = empty(tokens, dtype=torch.int64) if spec.with_slots else None
    padding = empty(tokens, dtype=torch.bool) if spec.padding else None
    route_args = (N, R, K, 2.0 / (K * R), False)
    with mock.patch.object(stats_module, "_padding_provider", lambda: padding):
        if spec.path == "grouped":
            order, counts = empty(MAX_TOKENS, dtype=torch.int64), empty(c + 1, dtype=torch.int64)
            hidden = empty(tokens, s * N * R)
            triton_grouped.shrink_route(
                x, order, counts, lora_a, router, None, None, hidden, None, stats, selected,
                semaphore, *route_args,
            )  # fmt: skip
            bounds = [i for w in range(s) for i in (sum(widths[:w]), sum(widths[: w + 1]))]
            b = [empty(w, c * N * R) for w in widths]
            triton_grouped.expand(
                empty(tokens, sum(widths)), order, counts, hidden, b, None, [], bounds
            )
            return
        given = spec.path == "dense given"
        lora_h = empty(tokens, s * N * R, dtype=torch.float32) if given else None
        logits = empty(tokens, s * N, dtype=torch.float32) if given else None
        out = empty(tokens, d_in + c * s * N * R)
        triton_route.route(
            x, lora_a, router, None, out, stats, selected, semaphore, lora_h, logits,
            *route_args, slots, c, **config,
        )  # fmt: skip


def specialisations(target: Target) -> dict[str, tuple[ASTSource, dict, list[str]]]:
    """Every distinct specialisation the LAUNCHES launch on the target: its hash and warps ->
    (source, compile options, the launches that use it)."""
    backend = make_backend(GPUTarget("cuda", target.capability, 32))
    found: dict[str, tuple[ASTSource, dict, list[str]]] = {}
    binders: dict[str, Callable] = {}
    for spec in LAUNCHES:
        with recorded(target) as launches:
            for shape in LLAMA_SHAPES.values():
                for d_in, widths in projection_shapes(*shape).values():
                    for dtype, tokens, config in itertools.product(
                        spec.dtypes, spec.tokens, spec.configs
                    ):
                        launch(spec, dtype, d_in, widths, tokens, config)
        for kernel, args, kwargs in launches:
            name = kernel.__name__
            if name not in binders:
                binders[name] = create_function_from_signature(
                    kernel.signature, kernel.params, backend
                )
            bound, spec_values, options = binders[name](*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(
                backend, kwargs, bound, spec_values, options
            )
            source = ASTSource(kernel, signature, constexprs, attrs)
            key = f"{source.hash()} {options.num_warps}"  # the source's hash has no options
            entry = found.setdefault(key, (source, options.__dict__, []))
            if spec.use not in entry[2]:
                entry[2].append(spec.use)
    return found


SHOWN = ("BLOCK_D", "ROUTER_PRECISION", "BLOCK_T", "SPLIT_K", "FUSED", "MULTI_SLOT", "NR")


def describe(source: ASTSource, options: dict) -> tuple[str, bool]:
    """The constexprs that tell this kernel's specialisations apart (PARTS and the warps where
    not 1 and 4), its pointer dtype, and whether it is a decode configuration (blocks of 16
    tokens)."""
    names = source.fn.arg_names
    values = {names[i[0]]: v for i, v in source.constants.items()}
    dtype = source.signature[names[0]].lstrip("*")  # x (or out): the serving dtype
    shown = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in values.items() if k in SHOWN]
    shown += [f"PARTS={values['PARTS']}"] if values.get("PARTS", 1) > 1 else []
    shown += [f"warps={options['num_warps']}"] if options["num_warps"] != 4 else []
    return f"{dtype} " + " ".join(shown), values["BLOCK_T"] == triton_route.MIN_BLOCK_T


def compile_one(source: ASTSource, options: dict, target: Target) -> tuple[int, int, int]:
    """Compile for the target (or take it from Triton's cache): (registers, stack frame bytes,
    shared memory bytes). Registers and stack frame come from the cubin (the bundled
    cuobjdump); ptxas puts its spills in the stack frame, which these kernels use for nothing
    else (a spilling build showed 728 B of stack for 732 B of spill stores)."""
    kernel = triton.compile(
        source, target=GPUTarget("cuda", target.capability, 32), options=options
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return int(registers), int(stack), kernel.metadata.shared


def compile_all(targets: tuple[Target, ...] = TARGETS) -> list[Compiled]:
    rows = []
    for target in targets:
        for source, options, uses in specialisations(target).values():
            registers, spills, shared = compile_one(source, options, target)
            config, decode = describe(source, options)
            rows.append(
                Compiled(
                    target.name, source.fn.__name__.strip("_"), config, registers, spills,
                    shared, shared <= target.max_shared, decode, uses,
                )
            )  # fmt: skip
    return rows


def table(rows: list[Compiled]) -> str:
    """A Markdown table, one row per (target, specialisation)."""
    lines = [
        "| target | kernel | specialisation | registers | spills (stack B) | shared memory | used by |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.target, r.kernel, r.config)):
        lines.append(
            f"| {r.target} | {r.kernel} | {r.config} | {r.registers} | {r.stack_bytes} | "
            f"{r.shared} B{'' if r.fits else ' (too much)'} | {'; '.join(r.uses)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    parser.add_argument("--target", choices=[t.name for t in TARGETS], help="default: all")
    args = parser.parse_args()
    if triton_route.INTERPRETED:
        sys.exit("aot_compile: TRITON_INTERPRET=1 replaces the kernels by Python; unset it")
    rows = compile_all(tuple(t for t in TARGETS if args.target in (None, t.name)))
    print(json.dumps([asdict(r) for r in rows]) if args.json else table(rows))


if __name__ == "__main__":
    main()
