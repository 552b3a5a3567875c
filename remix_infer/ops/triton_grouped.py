"""The grouped Triton path of a pool of several checkpoint slots (GPU; see pool.py for the math).

The dense path runs every slot's A, router and B products for every token (C slots: C times
the adapter FLOPs, base-model tokens included). Here, as punica's SGMV and vLLM's LoRA kernels
do, the step's tokens are grouped by slot once (TokenSlots.fill: their order and each slot's
count, static shapes, no host read of the counts, so CUDA graphs can capture it), and each slot's
products run on its own tokens only:

    shrink_route  for each token t of slot c (one program per block of c's tokens and part s):
                  h = x_t A_{c,s}^T, logits = x_t P_{c,s}^T (+ bias_{c,s}, float32), and with an
                  always-on LoRA h0 = x_t A0_{c,s}^T; routes as the one-slot kernel does
                  (`_route_block` of triton_route.py), writing the gated h into hidden [T, S*n*r]
                  and h0 into always_h [T, S*r0], the statistics into slot c's rows
    expand        out[t, columns of part s] += hidden[t, s] B_{c,s}^T (+ always_h[t, s] B0_{c,s}^T),
                  each output element written by one program (deterministic, no atomics)

after the base GEMM out = x W^T (the GEMM carries nothing of the pool's). Base-model tokens
(slot -1) are in no slot's group: zero hidden states, not counted, their output rows untouched.
Programs of a slot without tokens (or past its tokens) return at once. As in the routing kernel,
few tokens may split the reduction over d_in across programs (`_sum_splits`, deterministic).
A row-parallel shard runs `shrink` (its partial products only), sums them over the ranks and
has `shrink_route` route the sums.

Registered as custom ops (torch.ops.remix.grouped_shrink_route, .grouped_shrink,
.grouped_expand) so torch.compile and graph capture keep them. Runs on CPU under the Triton
interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from remix_infer.ops.custom_op import remix_op
from remix_infer.ops.stats import padding_mask
from remix_infer.ops.triton_route import (
    INTERPRETED,
    NOT_SPECIALIZED,
    _block_t,
    _dot,
    _pool_products,
    _product_slots,
    _route_block,
    _sum_splits,
    block_width,
    choose_split,
    semaphore_size,
    split_workspace,
)

BLOCK_OUT = 64  # output columns per expand program


@triton.jit
def _slot_span(counts_ptr, slot, C_PAD: tl.constexpr):
    """Where the slot's tokens start in the grouped order (after the base model's and those of
    the slots before it) and how many there are; counts [C + 1], counts[0] the base model's."""
    i = tl.arange(0, C_PAD)
    start = tl.sum(tl.load(counts_ptr + i, mask=i <= slot, other=0), axis=0)
    return start, tl.load(counts_ptr + slot + 1)


@triton.jit
def _slot_rows(order_ptr, start, count, block, T, BLOCK_T: tl.constexpr):
    """This program's block of the slot's tokens: their rows of x and out (below T: a grouping
    of more tokens than this call has must not write past them), and which are real."""
    offsets = block * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.load(order_ptr + start + offsets, mask=offsets < count, other=0)
    return rows, (offsets < count) & (rows < T)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _grouped_shrink_route_kernel(
    x_ptr, order_ptr, counts_ptr, a_ptr, router_ptr, bias_ptr, a0_ptr,
    hidden_ptr, always_ptr, h_ptr, logits_ptr, ws_ptr, sem_ptr, stats_ptr, step_ptr, pad_ptr,
    T, D, D_PER_SPLIT, stride_x, omega, max_step_rows, num_splits,
    N: tl.constexpr, R: tl.constexpr, K: tl.constexpr, S, R0: tl.constexpr,
    N_PAD: tl.constexpr, NR_PAD: tl.constexpr, R0_PAD: tl.constexpr, WIDTH: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_K: tl.constexpr,
    IEEE_A: tl.constexpr,
    softmax_gates, has_bias, has_padding,
    GIVEN: tl.constexpr, PRODUCTS_ONLY: tl.constexpr,
):  # fmt: skip
    """GIVEN: route the products in h_ptr, logits_ptr (summed over a row-parallel group)
    instead of computing them; PRODUCTS_ONLY: write the products there (float32, always-on
    ones into always_ptr) instead of routing them."""
    block, part = tl.program_id(0), tl.program_id(1)
    slot, split = tl.program_id(2) // num_splits, tl.program_id(2) % num_splits
    start, count = _slot_span(counts_ptr, slot, C_PAD)
    if block * BLOCK_T >= count:  # past this slot's tokens (or it has none)
        return
    rows, row_ok = _slot_rows(order_ptr, start, count, block, T, BLOCK_T)
    if GIVEN:
        h_at, h_ok, l_at, l_ok = _product_slots(rows, row_ok, part, N, R, S, N_PAD, NR_PAD)
        acc_h = tl.load(h_ptr + h_at, mask=h_ok, other=0.0)
        acc_l = tl.load(logits_ptr + l_at, mask=l_ok, other=0.0)
        _finish_block(
            acc_h, acc_l, acc_h, rows, row_ok, part, slot, bias_ptr, hidden_ptr, always_ptr,
            h_ptr, logits_ptr, stats_ptr, step_ptr, pad_ptr, omega, max_step_rows, N, R, K, S,
            R0, N_PAD, NR_PAD, R0_PAD, softmax_gates, has_bias, has_padding, PRODUCTS_ONLY,
        )  # fmt: skip
        return
    group = slot * S + part  # this slot's pool of this part, in the slot-major tensors
    acc_h, acc_l, acc_0 = _pool_products(
        x_ptr, a_ptr, router_ptr, a0_ptr, rows, row_ok, group * N * R, group * N, group * R0,
        split * D_PER_SPLIT, D_PER_SPLIT, D, stride_x, x_ptr, 0, row_ok,
        N, R, R0, N_PAD, NR_PAD, R0_PAD, BLOCK_T, BLOCK_D, IEEE_A, False, "ieee",
    )  # fmt: skip
    if not SPLIT_K:
        _finish_block(
            acc_h, acc_l, acc_0, rows, row_ok, part, slot, bias_ptr, hidden_ptr, always_ptr,
            h_ptr, logits_ptr, stats_ptr, step_ptr, pad_ptr, omega, max_step_rows, N, R, K, S,
            R0, N_PAD, NR_PAD, R0_PAD, softmax_gates, has_bias, has_padding, PRODUCTS_ONLY,
        )  # fmt: skip
    else:  # the workspace [num_splits, S * T, WIDTH]: the partials, by part and token
        ticket = (slot * tl.num_programs(0) + block) * S + part
        last, acc_h, acc_l, acc_0 = _sum_splits(
            acc_h, acc_l, acc_0, ws_ptr, sem_ptr, ticket, part * T + rows, row_ok, split,
            num_splits, S * T, NR_PAD, N_PAD, R0_PAD, R0, WIDTH,
        )  # fmt: skip
        if last:
            _finish_block(
                acc_h, acc_l, acc_0, rows, row_ok, part, slot, bias_ptr, hidden_ptr,
                always_ptr, h_ptr, logits_ptr, stats_ptr, step_ptr, pad_ptr, omega,
                max_step_rows, N, R, K, S, R0, N_PAD, NR_PAD, R0_PAD, softmax_gates, has_bias,
                has_padding, PRODUCTS_ONLY,
            )  # fmt: skip


@triton.jit
def _finish_block(
    acc_h, acc_l, acc_0, rows, row_ok, part, slot, bias_ptr, hidden_ptr, always_ptr,
    h_ptr, logits_ptr, stats_ptr, step_ptr, pad_ptr, omega, max_step_rows,
    N: tl.constexpr, R: tl.constexpr, K: tl.constexpr, S, R0: tl.constexpr,
    N_PAD: tl.constexpr, NR_PAD: tl.constexpr, R0_PAD: tl.constexpr,
    softmax_gates, has_bias, has_padding,
    PRODUCTS_ONLY: tl.constexpr,
):  # fmt: skip
    """A block of one slot's tokens and one part, its products summed: write the always-on
    hidden states (ungated); then write the products (PRODUCTS_ONLY) or route them as the
    one-slot kernel does, with the slot's bias and statistics rows."""
    if R0 > 0:
        ocols = tl.arange(0, R0_PAD)
        tl.store(
            always_ptr + rows[:, None] * (S * R0) + part * R0 + ocols[None, :],
            acc_0.to(always_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (ocols < R0)[None, :],
        )
    if PRODUCTS_ONLY:
        h_at, h_ok, l_at, l_ok = _product_slots(rows, row_ok, part, N, R, S, N_PAD, NR_PAD)
        tl.store(h_ptr + h_at, acc_h, mask=h_ok)
        tl.store(logits_ptr + l_at, acc_l, mask=l_ok)
    else:
        _route_block(
            acc_h, acc_l, rows, row_ok, part, bias_ptr + slot * S * N, hidden_ptr,
            stats_ptr + slot * S * (N + 3), step_ptr, pad_ptr, pad_ptr, S * N * R, 0, omega,
            max_step_rows, N, R, K, S, N_PAD, NR_PAD, softmax_gates, has_bias, has_padding,
            False, False,
        )  # fmt: skip


@remix_op(
    "grouped_shrink_route",
    mutates_args=("hidden", "always_h", "stats", "step_selected", "semaphore"),
)
def shrink_route(
    x: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    lora_a: torch.Tensor,
    router: torch.Tensor,
    router_bias: torch.Tensor | None,
    always_a: torch.Tensor | None,
    hidden: torch.Tensor,
    always_h: torch.Tensor | None,
    stats: torch.Tensor,
    step_selected: torch.Tensor,
    semaphore: torch.Tensor,
    num_loras: int,
    rank: int,
    top_k: int,
    omega: float,
    softmax_gates: bool,
    split: int = 0,
    lora_h: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
) -> None:
    """x [T, d_in] -> each token's own slot's gated hidden states hidden [T, S*n*r] and
    always-on hidden states always_h [T, S*r0] (serving dtype; zero for base-model tokens),
    statistics into stats [C*S, n + 3] and selections into step_selected. order, counts:
    the step's tokens grouped by slot (TokenSlots). lora_a, router, router_bias, always_a:
    every slot's rows, slot-major. semaphore: `semaphore_size(max tokens, S) * C` elements, the
    bound on the tokens (not written: each launch takes its own tickets); split 0 = choose it here (how many programs share one block's reduction over d_in).
    lora_h [T, S*n*r], logits [T, S*n] (float32): each token's own slot's products, given
    (`shrink`, summed over a row-parallel group); then always_h is the caller's (None here)."""
    hidden.zero_()  # base-model tokens are in no group: their rows stay zero
    step_selected[: x.shape[0]].zero_()
    if always_h is not None:
        always_h.zero_()
    _launch(
        x, order, counts, lora_a, router, router_bias, always_a, hidden, always_h, lora_h,
        logits, stats, step_selected, semaphore, num_loras, rank, top_k, omega, softmax_gates,
        split, given=lora_h is not None, products_only=False,
    )  # fmt: skip


@remix_op("grouped_shrink", mutates_args=("lora_h", "logits", "always_h", "semaphore"))
def shrink(
    x: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    lora_a: torch.Tensor,
    router: torch.Tensor,
    always_a: torch.Tensor | None,
    lora_h: torch.Tensor,
    logits: torch.Tensor,
    always_h: torch.Tensor | None,
    semaphore: torch.Tensor,
    num_loras: int,
    rank: int,
    split: int = 0,
) -> None:
    """x [T, d_in] (a row-parallel shard's slice) -> each token's own slot's products, float32:
    lora_h [T, S*n*r], logits [T, S*n] (no bias), always_h [T, S*r0]; zero for base-model
    tokens. Summed over the ranks, they go to `shrink_route`."""
    for out in (lora_h, logits, always_h):
        if out is not None:
            out.zero_()
    _launch(
        x, order, counts, lora_a, router, None, always_a, lora_h, always_h, lora_h, logits,
        logits, logits, semaphore, num_loras, rank, 1, 0.0, False, split, given=False,
        products_only=True,
    )  # fmt: skip


def _launch(
    x: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    lora_a: torch.Tensor,
    router: torch.Tensor,
    router_bias: torch.Tensor | None,
    always_a: torch.Tensor | None,
    hidden: torch.Tensor,
    always_h: torch.Tensor | None,
    lora_h: torch.Tensor | None,
    logits: torch.Tensor | None,
    stats: torch.Tensor,
    step_selected: torch.Tensor,
    semaphore: torch.Tensor,
    num_loras: int,
    rank: int,
    top_k: int,
    omega: float,
    softmax_gates: bool,
    split: int,
    given: bool,
    products_only: bool,
) -> None:
    """Launch the shrink(-route) kernel over (token blocks, parts, slots x splits); stats and
    step_selected are not read when products_only."""
    tokens, d_in = x.shape
    num_slots = counts.shape[0] - 1
    num_parts = lora_a.shape[0] // (num_slots * num_loras * rank)
    r0 = always_h.shape[1] // num_parts if always_h is not None else 0
    if tokens == 0:
        return
    if semaphore.numel() < num_slots * semaphore_size(tokens, num_parts):
        raise ValueError(f"{tokens} tokens: more than the pool's max_step_tokens")
    block_t, block_d = _block_t(tokens), block_width(x.dtype, 0)
    blocks = triton.cdiv(tokens, block_t)
    # at most this many blocks have tokens (each slot's last may be partial): split for them
    active = min(blocks * num_slots, blocks + num_slots - 1)
    split = 1 if given else split or choose_split(active, num_parts, d_in, block_d)
    n_pad = max(16, triton.next_power_of_2(num_loras))
    nr_pad = max(16, triton.next_power_of_2(num_loras * rank))
    r0_pad = max(16, triton.next_power_of_2(r0))
    width = nr_pad + n_pad + (r0_pad if r0 else 0)
    workspace, tickets = split_workspace(
        x, split, (num_parts * tokens, width), num_slots * blocks * num_parts
    )
    padding = padding_mask(tokens)
    _grouped_shrink_route_kernel[(blocks, num_parts, num_slots * split)](
        x, order, counts, lora_a, router,
        router_bias if router_bias is not None else router,
        always_a if always_a is not None else lora_a,
        hidden, always_h if always_h is not None else hidden,
        lora_h if lora_h is not None else hidden, logits if logits is not None else hidden,
        workspace, tickets, stats, step_selected,
        padding.view(torch.uint8) if padding is not None else step_selected,  # dtype: see route
        tokens, d_in, triton.cdiv(triton.cdiv(d_in, block_d), split) * block_d, x.stride(0),
        float(omega), step_selected.shape[0], split,
        N=num_loras, R=rank, K=top_k, S=num_parts, R0=r0, N_PAD=n_pad, NR_PAD=nr_pad,
        R0_PAD=r0_pad, WIDTH=width, C_PAD=triton.next_power_of_2(num_slots + 1), BLOCK_T=block_t, BLOCK_D=block_d, SPLIT_K=split > 1,
        IEEE_A=x.dtype == torch.float32 or INTERPRETED, softmax_gates=softmax_gates,
        has_bias=router_bias is not None, has_padding=padding is not None, GIVEN=given,
        PRODUCTS_ONLY=products_only,
    )  # fmt: skip


@triton.jit
def _grouped_expand_kernel(
    out_ptr, order_ptr, counts_ptr, h_ptr, b_ptr, h0_ptr, b0_ptr,
    T, width, stride_out, stride_h, stride_b, stride_h0, stride_b0,
    NR: tl.constexpr, R0: tl.constexpr, NR_PAD: tl.constexpr, R0_PAD: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_OUT: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    block, column_block, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, count = _slot_span(counts_ptr, slot, C_PAD)
    if block * BLOCK_T >= count:  # past this slot's tokens (or it has none)
        return
    rows, row_ok = _slot_rows(order_ptr, start, count, block, T, BLOCK_T)
    cols = column_block * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    col_ok = cols < width
    k = tl.arange(0, NR_PAD)
    h = tl.load(
        h_ptr + rows[:, None] * stride_h + k[None, :],
        mask=row_ok[:, None] & (k < NR)[None, :],
        other=0.0,
    )
    b = tl.load(  # the slot's columns of B, transposed: [NR_PAD, BLOCK_OUT]
        b_ptr + cols[None, :] * stride_b + slot * NR + k[:, None],
        mask=(k < NR)[:, None] & col_ok[None, :],
        other=0.0,
    )
    acc = _dot(h, b, IEEE)
    if R0 > 0:
        k0 = tl.arange(0, R0_PAD)
        h0 = tl.load(
            h0_ptr + rows[:, None] * stride_h0 + k0[None, :],
            mask=row_ok[:, None] & (k0 < R0)[None, :],
            other=0.0,
        )
        b0 = tl.load(
            b0_ptr + cols[None, :] * stride_b0 + slot * R0 + k0[:, None],
            mask=(k0 < R0)[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += _dot(h0, b0, IEEE)
    at = out_ptr + rows[:, None] * stride_out + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    base = tl.load(at, mask=mask, other=0.0)
    tl.store(at, (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


@remix_op("grouped_expand", mutates_args=("out",))
def expand(
    out: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    hidden: torch.Tensor,
    lora_b: list[torch.Tensor],
    always_h: torch.Tensor | None,
    always_b: list[torch.Tensor],
    part_columns: list[int],
) -> None:
    """out [T, d_out] += each token's gated hidden states hidden [T, S*n*r] (and always-on
    ones always_h [T, S*r0]) times its own slot's B of each part, in place; base-model tokens
    untouched. lora_b[j] [d_out_j, C*n*r], always_b[j] [d_out_j, C*r0]: every slot's columns,
    slot-major; part_columns: the first and past-the-last output column of each part."""
    tokens, num_slots = out.shape[0], counts.shape[0] - 1
    if tokens == 0:
        return
    if out.stride(1) != 1:
        raise ValueError("the grouped expand writes rows of contiguous columns")
    nr = lora_b[0].shape[1] // num_slots
    r0 = always_h.shape[1] // len(lora_b) if always_h is not None else 0
    block_t = _block_t(tokens)
    for j, b in enumerate(lora_b):  # one launch per part: their widths and tensors differ
        start, stop = part_columns[2 * j], part_columns[2 * j + 1]
        h0 = always_h[:, j * r0 :] if always_h is not None else hidden
        b0 = always_b[j] if always_h is not None else b
        grid = (triton.cdiv(tokens, block_t), triton.cdiv(stop - start, BLOCK_OUT), num_slots)
        _grouped_expand_kernel[grid](
            out[:, start:], order, counts, hidden[:, j * nr :], b, h0, b0,
            tokens, stop - start, out.stride(0), hidden.stride(0), b.stride(0), h0.stride(0),
            b0.stride(0), NR=nr, R0=r0, NR_PAD=max(16, triton.next_power_of_2(nr)),
            R0_PAD=max(16, triton.next_power_of_2(r0)),
            C_PAD=triton.next_power_of_2(num_slots + 1), BLOCK_T=block_t, BLOCK_OUT=BLOCK_OUT,
            IEEE=out.dtype == torch.float32 or INTERPRETED,
        )  # fmt: skip
