"""The routing kernel: one launch per adapted projection on the GPU (see pool.py for the math).

Each program takes a block of tokens and one adapted part (with `x_once`, every part: S padded to
a power of two, the parts' products side by side in one set of accumulators), reads x once for
all of its products (the n*r LoRA A rows in the serving dtype; the n router rows in float32,
IEEE or tf32x3 (`route`'s configurations), so bf16 and fp16 serving choose what the float32
reference chooses), then, for each of its parts,

    top-k of the logits, ties to the lower index (k rounds of argmax; argmax keeps the first)
    gates: omega on the chosen, or omega * softmax over the chosen logits
    writes [x | gated h] (x by part 0; gated h into the part's columns) for the one GEMM after
    adds selections, tokens, entropy and ESS of its real (non-padding) rows to `stats`
    writes the per-token selections into `step_selected`

Few tokens leave most of the GPU idle, so the reduction over d_in may be split across
num_splits programs per block; each writes its partial products to a workspace and takes a
ticket, and the last of them sums the partials in split order (deterministic) and routes. Each
launch takes fresh zeroed tickets from the caching allocator (one small memset), so a launch that
died midway, or launches on two streams over one pool, cannot leave another's tickets wrong;
allocation and memset are stream-ordered, so CUDA-graph capture keeps them.

The token and split counts, the number of parts, the padding, slot and bias buffers' presence
and the gate rule are runtime arguments that Triton does not specialise on (NOT_SPECIALIZED):
one compiled kernel serves every step of a block size and every checkpoint's routing rule, so
few specialisations reach the GPU (tests/test_aot_compile.py compiles them all). x_once
specialises on the parts per program (S rounded up to a power of two: its accumulators' width).

Registered as the custom op `torch.ops.remix.route` so torch.compile and graph capture keep it.
Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1), which the tests use.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from remix_infer.ops.custom_op import remix_op
from remix_infer.ops.stats import padding_mask

MIN_BLOCK_T = 16  # tl.dot needs at least 16 rows
# runtime values not specialised on: one compiled kernel for every token count, split,
# number of parts (S), padding or slot buffer, router bias and gate rule; the cost is a few
# integer multiplies and scalar branches
NOT_SPECIALIZED = [
    "T",
    "S",
    "max_step_rows",
    "num_splits",
    "has_padding",
    "has_slots",
    "has_bias",
    "softmax_gates",
]
# The interpreter's tl.dot misreads bf16 operands: there the A product runs in float32.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _route_block(
    acc_h, acc_l, rows, row_ok, part,
    bias_ptr, out_ptr, stats_ptr, step_ptr, pad_ptr, slots_ptr,
    stride_out, hidden_offset, omega, max_step_rows,
    N: tl.constexpr, R: tl.constexpr, K: tl.constexpr, S,
    N_PAD: tl.constexpr, NR_PAD: tl.constexpr,
    softmax_gates, has_bias, has_padding,
    has_slots, MULTI_SLOT: tl.constexpr,
):  # fmt: skip
    """Route one block of tokens of one part from its products (float32). With slots, each
    token's products are its own slot's; base-model tokens (slot -1) get zero gates and are
    not counted; with several slots, a token's hidden states go to its slot's columns and its
    statistics to its slot's row."""
    lcols = tl.arange(0, N_PAD)
    lcol_ok = lcols < N
    logits = acc_l
    if has_bias:
        logits += tl.load(bias_ptr + part * N + lcols, mask=lcol_ok, other=0.0)[None, :]
    logits = tl.where(lcol_ok[None, :], logits, float("-inf"))

    work = logits
    chosen = lcols[None, :] < 0  # all False, [1, N_PAD]; broadcasts on the first |
    for _ in tl.static_range(K):
        best = tl.argmax(work, axis=1, tie_break_left=True)
        hit = lcols[None, :] == best[:, None]
        chosen = chosen | hit
        work = tl.where(hit, float("-inf"), work)

    row_max = tl.max(logits, axis=1)
    shifted = tl.where(lcol_ok[None, :], logits - row_max[:, None], 0.0)
    ex = tl.where(lcol_ok[None, :], tl.exp(shifted), 0.0)
    total = tl.sum(ex, axis=1)
    entropy = tl.log(total) - tl.sum(ex * shifted, axis=1) / total
    if softmax_gates:  # the top logit is chosen, so exp(shifted) is the chosen softmax's numerator
        chosen_ex = tl.where(chosen, ex, 0.0)
        gates = omega * chosen_ex / tl.sum(chosen_ex, axis=1)[:, None]
        ess = tl.sum(gates, axis=1) * tl.sum(gates, axis=1) / tl.sum(gates * gates, axis=1)
    else:
        gates = tl.where(chosen, omega, 0.0)
        ess = tl.zeros_like(entropy) + K
    slot = tl.zeros_like(rows)
    if has_slots:
        slot = tl.load(slots_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
        gates = tl.where((slot >= 0)[:, None], gates, 0.0)
        chosen = chosen & (slot >= 0)[:, None]
        slot = tl.maximum(slot, 0)

    # Each hidden column c belongs to LoRA c // R: spread the n gates over the n*r columns.
    hcols = tl.arange(0, NR_PAD)
    owner = hcols // R
    col_gate = tl.zeros_like(acc_h)
    for j in tl.static_range(N):
        gate_j = tl.sum(tl.where(lcols[None, :] == j, gates, 0.0), axis=1)
        col_gate = tl.where(owner[None, :] == j, gate_j[:, None], col_gate)
    hidden = acc_h * col_gate
    out_cols = hidden_offset + part * N * R + hcols
    slot_cols = tl.zeros_like(rows)
    if MULTI_SLOT:
        slot_cols = slot * (S * N * R)
    tl.store(
        out_ptr + (rows * stride_out + slot_cols)[:, None] + out_cols[None, :],
        hidden.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (hcols < N * R)[None, :],
    )

    real = row_ok
    if has_padding:
        real = real & (tl.load(pad_ptr + rows, mask=row_ok, other=1) == 0)
    if has_slots:
        real = real & (tl.load(slots_ptr + rows, mask=row_ok, other=-1) >= 0)
    real_f = tl.where(real, 1.0, 0.0)
    if MULTI_SLOT:  # tokens of one block may belong to different slots: one row each
        token_rows = stats_ptr + (slot * S + part) * (N + 3)
        picked = tl.where(chosen & real[:, None], 1.0, 0.0).to(tl.float64)
        tl.atomic_add(
            token_rows[:, None] + lcols[None, :], picked, mask=real[:, None] & lcol_ok[None, :]
        )
        tl.atomic_add(token_rows + N, real_f.to(tl.float64), mask=real)
        tl.atomic_add(token_rows + N + 1, (entropy * real_f).to(tl.float64), mask=real)
        tl.atomic_add(token_rows + N + 2, (ess * real_f).to(tl.float64), mask=real)
    else:
        counts = tl.sum(tl.where(chosen & real[:, None], 1.0, 0.0), axis=0)
        stats_row = stats_ptr + part * (N + 3)
        tl.atomic_add(stats_row + lcols, counts.to(tl.float64), mask=lcol_ok)
        tl.atomic_add(stats_row + N, tl.sum(real_f, axis=0).to(tl.float64))
        tl.atomic_add(stats_row + N + 1, tl.sum(entropy * real_f, axis=0).to(tl.float64))
        tl.atomic_add(stats_row + N + 2, tl.sum(ess * real_f, axis=0).to(tl.float64))
    tl.store(
        step_ptr + (rows[:, None] * S + part) * N + lcols[None, :],
        chosen.to(tl.uint8),
        mask=(row_ok & (rows < max_step_rows))[:, None] & lcol_ok[None, :],
    )


@triton.jit
def _part_columns(WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, PARTS: tl.constexpr, parts):
    """Columns of PARTS parts' products side by side, each part padded to WIDTH_PAD: each
    column's part, its index within the part, and whether it holds a product (within WIDTH, of
    one of the `parts` that exist)."""
    cols = tl.arange(0, PARTS * WIDTH_PAD)
    part, within = cols // WIDTH_PAD, cols % WIDTH_PAD
    return part, within, (within < WIDTH) & (part < parts)


@triton.jit
def _one_part(acc, j, PARTS: tl.constexpr, WIDTH_PAD: tl.constexpr):
    """Part j's columns [BLOCK_T, WIDTH_PAD] of products laid out by `_part_columns`: a sum
    with zeros, exact (only a zero's sign may change)."""
    one = acc
    if PARTS > 1:
        by_part = tl.reshape(acc, (acc.shape[0], PARTS, WIDTH_PAD))
        index = tl.arange(0, PARTS)[None, :, None]
        one = tl.sum(tl.where(index == j, by_part, 0.0), axis=1)
    return one


@triton.jit
def _pool_products(
    x_ptr, a_ptr, router_ptr, a0_ptr, rows, row_ok, a_row0, p_row0, a0_row0,
    d_start, d_span, D, stride_x, copy_ptr, stride_copy, copy_x,
    N: tl.constexpr, R: tl.constexpr, R0: tl.constexpr,
    N_PAD: tl.constexpr, NR_PAD: tl.constexpr, R0_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, IEEE_A: tl.constexpr, COPY_X: tl.constexpr,
    ROUTER_PRECISION: tl.constexpr, parts=1, PARTS: tl.constexpr = 1,
):  # fmt: skip
    """One block of tokens (rows: their rows of x) times one pool's rows, over d_in columns
    [d_start, d_start + d_span): the n*r LoRA A rows from a_row0 (serving dtype, or float32
    IEEE), the n router rows from p_row0 (float32, IEEE) and, with R0 > 0, the r0 always-on
    rows from a0_row0, reading x once for all. With PARTS > 1, the next `parts` (at most PARTS)
    parts' A and router rows too, from the same x tiles (`_part_columns`' layout). COPY_X: also
    copy the x tile to copy_ptr where copy_x. Returns the float32 products
    [BLOCK_T, PARTS * NR_PAD], [BLOCK_T, PARTS * N_PAD], [BLOCK_T, R0_PAD]."""
    h_part, hcols, h_ok = _part_columns(N * R, NR_PAD, PARTS, parts)
    l_part, lcols, l_ok = _part_columns(N, N_PAD, PARTS, parts)
    ocols = tl.arange(0, R0_PAD)
    acc_h = tl.zeros([BLOCK_T, PARTS * NR_PAD], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK_T, PARTS * N_PAD], dtype=tl.float32)
    acc_0 = tl.zeros([BLOCK_T, R0_PAD], dtype=tl.float32)
    for d0 in range(0, d_span, BLOCK_D):
        dcols = d_start + d0 + tl.arange(0, BLOCK_D)
        d_ok = dcols < D
        x = tl.load(
            x_ptr + rows[:, None] * stride_x + dcols[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if COPY_X:
            tl.store(
                copy_ptr + rows[:, None] * stride_copy + dcols[None, :],
                x,
                mask=copy_x[:, None] & d_ok[None, :],
            )
        a = tl.load(
            a_ptr + (a_row0 + h_part * (N * R) + hcols)[:, None] * D + dcols[None, :],
            mask=h_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc_h += _dot(x, tl.trans(a), IEEE_A)
        p = tl.load(
            router_ptr + (p_row0 + l_part * N + lcols)[:, None] * D + dcols[None, :],
            mask=l_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc_l += tl.dot(x.to(tl.float32), tl.trans(p), input_precision=ROUTER_PRECISION)
        if R0 > 0:
            a0 = tl.load(
                a0_ptr + (a0_row0 + ocols)[:, None] * D + dcols[None, :],
                mask=(ocols < R0)[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc_0 += _dot(x, tl.trans(a0), IEEE_A)
    return acc_h, acc_l, acc_0


@triton.jit
def _product_slots(
    rows, row_ok, part, N: tl.constexpr, R: tl.constexpr, S,
    N_PAD: tl.constexpr, NR_PAD: tl.constexpr, PARTS: tl.constexpr = 1,
):  # fmt: skip
    """Where one block's products of parts part.. part + PARTS - 1 (those below S) lie in the
    products [T, S*n*r] and logits [T, S*n] that a caller gives (summed over a row-parallel
    group), in `_part_columns`' layout: offsets and masks."""
    h_part, hcols, h_ok = _part_columns(N * R, NR_PAD, PARTS, S - part)
    l_part, lcols, l_ok = _part_columns(N, N_PAD, PARTS, S - part)
    h_at = rows[:, None] * (S * N * R) + ((part + h_part) * (N * R) + hcols)[None, :]
    l_at = rows[:, None] * (S * N) + ((part + l_part) * N + lcols)[None, :]
    return h_at, row_ok[:, None] & h_ok[None, :], l_at, row_ok[:, None] & l_ok[None, :]


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32; IEEE: in float32 (float32 serving, and the interpreter)."""
    if IEEE:
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(a, b)
    return product


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _remix_route_kernel(
    x_ptr, a_ptr, router_ptr, bias_ptr, h_ptr, logits_ptr,
    out_ptr, ws_ptr, sem_ptr, stats_ptr, step_ptr, pad_ptr, slots_ptr,
    T, D, D_PER_SPLIT, stride_x, stride_out, omega, max_step_rows, num_splits,
    N: tl.constexpr, R: tl.constexpr, K: tl.constexpr, S,
    N_PAD: tl.constexpr, NR_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_K: tl.constexpr,
    FUSED: tl.constexpr, IEEE_A: tl.constexpr, ROUTER_PRECISION: tl.constexpr,
    softmax_gates, has_bias, has_padding,
    has_slots, MULTI_SLOT: tl.constexpr, PARTS: tl.constexpr,
):  # fmt: skip
    """Grid (token blocks, ceil(S / PARTS), splits): each program takes PARTS parts (1, or
    every part with x_once) of its block, so x is read once per PARTS parts."""
    block, group, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    part = group * PARTS  # this program's first part
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    copy_x = rows < tl.where(part == 0, T, 0)  # part 0's program copies x into the GEMM's input
    if FUSED:
        acc_h, acc_l, _ = _pool_products(
            x_ptr, a_ptr, router_ptr, a_ptr, rows, row_ok, part * N * R, part * N, 0,
            split * D_PER_SPLIT, D_PER_SPLIT, D, stride_x, out_ptr, stride_out, copy_x,
            N, R, 0, N_PAD, NR_PAD, 16, BLOCK_T, BLOCK_D, IEEE_A, True, ROUTER_PRECISION,
            S - part, PARTS,
        )  # fmt: skip
    else:  # products given (summed over a row-parallel group): copy this split's columns of
        for d0 in range(0, D_PER_SPLIT, BLOCK_D):  # x; split 0 alone holds the products
            dcols = split * D_PER_SPLIT + d0 + tl.arange(0, BLOCK_D)
            mask = copy_x[:, None] & (dcols < D)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + dcols[None, :], mask=mask)
            tl.store(out_ptr + rows[:, None] * stride_out + dcols[None, :], x, mask=mask)
        h_at, h_ok, l_at, l_ok = _product_slots(rows, row_ok, part, N, R, S, N_PAD, NR_PAD, PARTS)
        acc_h = tl.where(split == 0, tl.load(h_ptr + h_at, mask=h_ok, other=0.0), 0.0)
        acc_l = tl.where(split == 0, tl.load(logits_ptr + l_at, mask=l_ok, other=0.0), 0.0)

    last = True
    if SPLIT_K:  # the workspace [num_splits, groups * blocks * BLOCK_T, PARTS * (NR_PAD +
        blocks, groups = tl.num_programs(0), tl.num_programs(1)  # N_PAD)]: the partials
        last, acc_h, acc_l, _ = _sum_splits(
            acc_h, acc_l, acc_h, ws_ptr, sem_ptr, block * groups + group,
            group * blocks * BLOCK_T + rows, row_ok, split, num_splits,
            groups * blocks * BLOCK_T, PARTS * NR_PAD, PARTS * N_PAD, 16, 0,
            PARTS * (NR_PAD + N_PAD),
        )  # fmt: skip
    if last:
        for j in tl.static_range(PARTS):
            if part + j < S:
                _route_block(
                    _one_part(acc_h, j, PARTS, NR_PAD), _one_part(acc_l, j, PARTS, N_PAD),
                    rows, row_ok, part + j, bias_ptr, out_ptr, stats_ptr, step_ptr, pad_ptr,
                    slots_ptr, stride_out, D, omega, max_step_rows, N, R, K, S, N_PAD, NR_PAD,
                    softmax_gates, has_bias, has_padding, has_slots, MULTI_SLOT,
                )  # fmt: skip


@triton.jit
def _sum_splits(
    acc_h, acc_l, acc_0, ws_ptr, sem_ptr, ticket, ws_rows, ws_ok, split, num_splits, split_rows,
    NR_PAD: tl.constexpr, N_PAD: tl.constexpr, R0_PAD: tl.constexpr, R0: tl.constexpr,
    WIDTH: tl.constexpr,
):  # fmt: skip
    """The reduction over d_in split across num_splits programs: store this split's partial
    products (and, with R0 > 0, the always-on ones) in rows ws_rows of its part of the workspace
    [num_splits, split_rows, WIDTH] and take a ticket (the launch's own, zeroed: `_workspace`);
    the program that takes the last one gets the sums in split order (deterministic). Returns
    (whether last, the three sums)."""
    hcols = tl.arange(0, NR_PAD)
    lcols = tl.arange(0, N_PAD)
    ocols = tl.arange(0, R0_PAD)
    at = ws_ptr + ((split * split_rows + ws_rows) * WIDTH)[:, None]
    tl.store(at + hcols[None, :], acc_h, mask=ws_ok[:, None])
    tl.store(at + NR_PAD + lcols[None, :], acc_l, mask=ws_ok[:, None])
    if R0 > 0:
        tl.store(at + NR_PAD + N_PAD + ocols[None, :], acc_0, mask=ws_ok[:, None])
    tl.debug_barrier()
    last = tl.atomic_add(sem_ptr + ticket, 1, sem="acq_rel") == num_splits - 1
    if last:  # the last split of this block: sum all, in split order
        acc_h = tl.zeros_like(acc_h)
        acc_l = tl.zeros_like(acc_l)
        acc_0 = tl.zeros_like(acc_0)
        for j in range(num_splits):
            at = ws_ptr + ((j * split_rows + ws_rows) * WIDTH)[:, None]
            mask = ws_ok[:, None]
            acc_h += tl.load(at + hcols[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            acc_l += tl.load(
                at + NR_PAD + lcols[None, :], mask=mask, other=0.0, cache_modifier=".cg"
            )
            if R0 > 0:
                acc_0 += tl.load(
                    at + NR_PAD + N_PAD + ocols[None, :], mask=mask, other=0.0,
                    cache_modifier=".cg",
                )  # fmt: skip
    return last, acc_h, acc_l, acc_0


def _block_t(tokens: int) -> int:
    return MIN_BLOCK_T if tokens <= 256 else 64


def semaphore_size(max_tokens: int, num_parts: int) -> int:
    """Tickets for the largest grid: one per (block of MIN_BLOCK_T tokens, part). A caller's
    semaphore of this size bounds the tokens a launch takes (its tickets are the launch's own)."""
    return triton.cdiv(max(max_tokens, 1), MIN_BLOCK_T) * num_parts


def split_workspace(
    x: torch.Tensor, split: int, rows_width: tuple[int, int], num_tickets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split reduction's partials [split, rows, width] (float32) and this launch's own
    tickets, zeroed; with no split, placeholders (x: never read)."""
    if split == 1:
        return x, x
    tickets = torch.zeros(num_tickets, dtype=torch.int32, device=x.device)
    return x.new_empty(split, *rows_width, dtype=torch.float32), tickets


@functools.cache
def _target_programs() -> int:
    """Two programs per SM of the GPU; 0 without one (the interpreter: no split)."""
    if not torch.cuda.is_available():
        return 0
    return 2 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def choose_split(
    blocks: int, num_parts: int, in_features: int, block_d: int, max_split: int = 16
) -> int:
    """Enough programs to fill the GPU, never more splits than d_in has blocks, nor max_split."""
    target = _target_programs()
    return max(1, min(target // (blocks * num_parts), triton.cdiv(in_features, block_d), max_split))


ROUTER_PRECISIONS = ("ieee", "tf32x3")  # float32 (FMA units), float32-equivalent on tensor cores
# `route`'s configurations that `make bench-gpu` sweeps (the first: the defaults)
CONFIGURATIONS: dict[str, dict[str, int | str | bool]] = {
    "default": {},
    "max_split 64": {"max_split": 64},
    "block_d 64, max_split 64": {"block_d": 64, "max_split": 64},
    # tf32x3 holds three pieces of each float32 tile: 128 columns spill at decode and 64 take
    # 215-247 registers (make aot-compile); 32 take 122-168
    "router tf32x3, block_d 32": {"router_precision": "tf32x3", "block_d": 32},
    # x read once for all parts: S padded to a power of two of accumulators; 128 columns
    # spill at decode with 4 parts (make aot-compile), 64 do not
    "x once, block_d 64": {"x_once": True, "block_d": 64},
}


def block_width(dtype: torch.dtype, block_d: int) -> int:
    """Columns of d_in per step of the products' loop: block_d, or by default 128 (64 in
    float32, whose tiles are twice as wide in bytes); a power of two of at least 16 (tl.dot)."""
    width = block_d or (64 if dtype == torch.float32 else 128)
    if width < 16 or width & (width - 1):
        raise ValueError(f"block_d {block_d}: a power of two of at least 16")
    return width


@remix_op("route", mutates_args=("out", "stats", "step_selected", "semaphore"))
def route(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    router: torch.Tensor,
    router_bias: torch.Tensor | None,
    out: torch.Tensor,
    stats: torch.Tensor,
    step_selected: torch.Tensor,
    semaphore: torch.Tensor,
    lora_h: torch.Tensor | None,
    logits: torch.Tensor | None,
    num_loras: int,
    rank: int,
    top_k: int,
    omega: float,
    softmax_gates: bool,
    slots: torch.Tensor | None = None,
    num_slots: int = 1,
    split: int = 0,
    max_split: int = 16,
    block_d: int = 0,
    router_precision: str = "ieee",
    x_once: bool = False,
) -> None:
    """Launch the kernel (see the module docstring). lora_h [T, S*n*r] and logits [T, S*n],
    float32, when the products are given (each token's own slot's; always given with several
    slots); slots [T] int64 or None (all slot 0); split 0 = choose it here (products given:
    1); semaphore: sized by `semaphore_size`, it bounds the tokens (not written).

    Configurations (`make bench-gpu` sweeps them; the defaults are the measured-on-CPU-only
    originals): max_split, the most programs that share a block's reduction when the split is
    chosen here (more fill the GPU at few tokens); block_d, columns of d_in per step (0: 128,
    64 in float32; smaller gives more blocks to split); router_precision "ieee" (float32 on
    FMA units) or "tf32x3" (three TF32 products on tensor cores, float32-equivalent); x_once,
    one program per token block for all S parts, reading each x tile once for every part's
    products (S padded to a power of two: S accumulators in registers), instead of one per
    part (x read S times)."""
    tokens, d_in = x.shape
    num_parts = stats.shape[0] // num_slots
    if tokens == 0:
        return
    if semaphore.numel() < semaphore_size(tokens, num_parts):
        raise ValueError(f"{tokens} tokens: more than the pool's max_step_tokens")
    n_pad = max(16, triton.next_power_of_2(num_loras))
    nr_pad = max(16, triton.next_power_of_2(num_loras * rank))
    if router_precision not in ROUTER_PRECISIONS:
        raise ValueError(f"router_precision {router_precision!r}: one of {ROUTER_PRECISIONS}")
    block_t, block_d = _block_t(tokens), block_width(x.dtype, block_d)
    blocks = triton.cdiv(tokens, block_t)
    parts = triton.next_power_of_2(num_parts) if x_once else 1  # parts per program
    # blocks of 64 tokens: PARTS times the warps keep each thread's share of the accumulators
    # the default's (4 warps spill 8-768 B at 2 and 4 parts: make aot-compile)
    warps = 4 * parts if block_t > MIN_BLOCK_T else 4
    groups = triton.cdiv(num_parts, parts)  # programs per token block and split
    fused = lora_h is None
    split = split or (choose_split(blocks, groups, d_in, block_d, max_split) if fused else 1)
    d_per_split = triton.cdiv(triton.cdiv(d_in, block_d), split) * block_d
    workspace, tickets = split_workspace(
        x, split, (groups * blocks * block_t, parts * (nr_pad + n_pad)), blocks * groups
    )
    padding = padding_mask(tokens)
    _remix_route_kernel[(blocks, groups, split)](
        x, lora_a, router, router_bias if router_bias is not None else router,
        lora_h if lora_h is not None else x, logits if logits is not None else x,
        out, workspace, tickets, stats, step_selected,
        # absent: placeholders of the pointer's dtype, so that one specialisation serves both
        padding.view(torch.uint8) if padding is not None else step_selected,
        slots if slots is not None else stats.view(torch.int64),
        tokens, d_in, d_per_split, x.stride(0), out.stride(0), float(omega),
        step_selected.shape[0], split,
        N=num_loras, R=rank, K=top_k, S=num_parts, N_PAD=n_pad, NR_PAD=nr_pad,
        BLOCK_T=block_t, BLOCK_D=block_d, SPLIT_K=split > 1, FUSED=fused,
        IEEE_A=x.dtype == torch.float32 or INTERPRETED, ROUTER_PRECISION=router_precision,
        softmax_gates=softmax_gates, has_bias=router_bias is not None,
        has_padding=padding is not None, has_slots=slots is not None, MULTI_SLOT=num_slots > 1,
        PARTS=parts, num_warps=warps,
    )  # fmt: skip
