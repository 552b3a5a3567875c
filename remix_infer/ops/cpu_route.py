"""The pools' CPU kernels (numba): ONE compiled call per projection instead of ~20 small torch ops.

At decode batch sizes a torch op costs a few microseconds in eager mode, more than its
arithmetic, so the routing (top-k, largest first, ties to the lower index; gates; the
statistics row: selections, tokens, entropy, ESS, padding rows excluded; the step's per-token
selections) runs per token and part in one call, in one of two ways:

- `remix_rows` (the grouped path's eager call, and `grouped_cpu` from x when compiled): from x
  itself, in blocks of up to 64 tokens of one slot. The router's n products first; then, per
  LoRA, the tokens that chose it: its r A rows (k*r products a token, not n*r) and its B rows,
  added straight into the base output: k/n of the adapter's dense FLOPs, in no GEMM at all.
  Products run in register tiles of four tokens (by four rows for A, eight for B: each weight
  loaded once for four tokens), every product by the same code, so a token's result does not
  depend on its batch.
- `route_cpu` and `grouped_cpu` otherwise: the products are given (the stacked GEMM's columns,
  or the grouped path's narrow product, summed over ranks for a row-parallel shard); routes them,
  writes the gated hidden states part-major ([S, T, n*r], where a B product reads them) or
  adds the B products itself.

The plain-torch path (pool.py) is the oracle they are tested against. Registered as torch
custom ops (custom_op.py) so that vLLM's compiled graphs keep them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
import torch

from remix_infer.ops.custom_op import remix_op
from remix_infer.ops.slots import registered
from remix_infer.ops.stats import padding_mask

# --- the kernels ----------------------------------------------------------------------------


# the products' sums: in vector lanes, reassociated (the order is the compiled code's, the same
# for every call on a machine, so a token's result does not depend on its batch)
_SUMS = {"reassoc", "nsz", "contract"}


TILE = 4  # tokens x rows per register tile of the A and router products; tokens of B's
B_ROWS = 8  # rows per register tile of the B products (a rank-8 LoRA's in one pass)
BLOCK_TOKENS = 64  # tokens of one slot routed and multiplied together (x, output rows in L2)


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _dot_tile(x0, x1, x2, x3, w0, w1, w2, w3, out):  # noqa: ANN001, ANN202 (a kernel's tile)
    """out[a, b] = x_a . w_b for four tokens and four rows: each load feeds four products."""
    s00, s01, s02, s03 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    s10, s11, s12, s13 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    s20, s21, s22, s23 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    s30, s31, s32, s33 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    for j in range(x0.shape[0]):
        a0, a1, a2, a3, b0, b1, b2, b3 = x0[j], x1[j], x2[j], x3[j], w0[j], w1[j], w2[j], w3[j]
        s00, s01, s02, s03 = s00 + a0 * b0, s01 + a0 * b1, s02 + a0 * b2, s03 + a0 * b3
        s10, s11, s12, s13 = s10 + a1 * b0, s11 + a1 * b1, s12 + a1 * b2, s13 + a1 * b3
        s20, s21, s22, s23 = s20 + a2 * b0, s21 + a2 * b1, s22 + a2 * b2, s23 + a2 * b3
        s30, s31, s32, s33 = s30 + a3 * b0, s31 + a3 * b1, s32 + a3 * b2, s33 + a3 * b3
    out[0, 0], out[0, 1], out[0, 2], out[0, 3] = s00, s01, s02, s03
    out[1, 0], out[1, 1], out[1, 2], out[1, 3] = s10, s11, s12, s13
    out[2, 0], out[2, 1], out[2, 2], out[2, 3] = s20, s21, s22, s23
    out[3, 0], out[3, 1], out[3, 2], out[3, 3] = s30, s31, s32, s33


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _add_tile(o0, o1, o2, o3, b, m, last, h):  # noqa: ANN001, ANN202 (a kernel's tile)
    """o_a += sum over j < 8 of h[a, j] * b[min(m + j, last)], in j's order, for four tokens'
    sums: each B element loaded once for four tokens, each sum loaded and stored once for
    eight rows (no reassociation: a token's sum is the same in any tile position)."""
    b0, b1, b2, b3 = b[m], b[min(m + 1, last)], b[min(m + 2, last)], b[min(m + 3, last)]
    b4, b5, b6, b7 = b[min(m + 4, last)], b[min(m + 5, last)], b[min(m + 6, last)], b[min(m + 7, last)]  # fmt: skip
    for c in range(o0.shape[0]):
        c0, c1, c2, c3, c4, c5, c6, c7 = b0[c], b1[c], b2[c], b3[c], b4[c], b5[c], b6[c], b7[c]
        o0[c] += (h[0, 0] * c0 + h[0, 1] * c1 + h[0, 2] * c2 + h[0, 3] * c3
                  + h[0, 4] * c4 + h[0, 5] * c5 + h[0, 6] * c6 + h[0, 7] * c7)  # fmt: skip
        o1[c] += (h[1, 0] * c0 + h[1, 1] * c1 + h[1, 2] * c2 + h[1, 3] * c3
                  + h[1, 4] * c4 + h[1, 5] * c5 + h[1, 6] * c6 + h[1, 7] * c7)  # fmt: skip
        o2[c] += (h[2, 0] * c0 + h[2, 1] * c1 + h[2, 2] * c2 + h[2, 3] * c3
                  + h[2, 4] * c4 + h[2, 5] * c5 + h[2, 6] * c6 + h[2, 7] * c7)  # fmt: skip
        o3[c] += (h[3, 0] * c0 + h[3, 1] * c1 + h[3, 2] * c2 + h[3, 3] * c3
                  + h[3, 4] * c4 + h[3, 5] * c5 + h[3, 6] * c6 + h[3, 7] * c7)  # fmt: skip


@numba.njit(cache=True, nogil=True)
def _route(
    logits: np.ndarray,
    k: int,
    omega: float,
    softmax_gates: bool,
    chosen: np.ndarray,
    gates: np.ndarray,
    selected: np.ndarray,
) -> tuple[float, float]:
    """One token's part: top-k of logits [n] into selected [k] and chosen [n], gates [n]
    (omega, or omega * softmax over the chosen; zero elsewhere) -> (entropy, ESS)."""
    n = logits.shape[0]
    chosen[:] = False
    for j in range(k):  # ties: a later index must be strictly larger to win
        best = -1
        for i in range(n):
            if not chosen[i] and (best < 0 or logits[i] > logits[best]):
                best = i
        chosen[best] = True
        selected[j] = best
    top = logits[selected[0]]
    total, chosen_total, tilted = 0.0, 0.0, 0.0
    for i in range(n):  # each exponential once: the engine routes every token and part
        e = math.exp(logits[i] - top)
        gates[i] = e  # kept for the gates below
        total += e
        if e > 0.0:
            tilted += e * (logits[i] - top)
        if chosen[i]:
            chosen_total += e
    # -sum p log p with p = e / total and log p = (logit - top) - log total
    entropy = math.log(total) - tilted / total
    weight_sum = 0.0
    weight_sq = 0.0
    for i in range(n):
        g = 0.0
        if chosen[i]:
            g = omega * gates[i] / chosen_total if softmax_gates else omega
        gates[i] = g
        weight_sum += g
        weight_sq += g * g
    # constant weights: exactly k, not k up to rounding
    return entropy, weight_sum * weight_sum / weight_sq if softmax_gates else float(k)


@numba.njit(cache=True, nogil=True)
def _record(
    stats: np.ndarray,
    step: np.ndarray,
    padding: np.ndarray,
    t: int,
    s: int,
    at: int,
    chosen: np.ndarray,
    entropy: float,
    ess: float,
) -> None:
    """Token t's part s: its selections into the step's rows, and, unless it is a padding row,
    into its statistics row stats[at] (selections, a token, entropy, ESS)."""
    n = chosen.shape[0]
    if t < step.shape[0]:
        for i in range(n):
            step[t, s, i] = 1 if chosen[i] else 0
    if padding.shape[0] and padding[t]:
        return
    for i in range(n):
        if chosen[i]:
            stats[at, i] += 1.0
    stats[at, n] += 1.0
    stats[at, n + 1] += entropy
    stats[at, n + 2] += ess


@numba.njit(cache=True, nogil=True)
def _add_rows(out: np.ndarray, b: np.ndarray, rows: np.ndarray, weights: np.ndarray, count: int):
    """out += sum over m < count of weights[m] * b[rows[m]], added in m's order, four rows per
    pass over out (one load and store of out per four rows instead of one per row)."""
    m = 0
    while m + 4 <= count:
        w0, w1, w2, w3 = weights[m], weights[m + 1], weights[m + 2], weights[m + 3]
        b0, b1, b2, b3 = b[rows[m]], b[rows[m + 1]], b[rows[m + 2]], b[rows[m + 3]]
        for col in range(out.shape[0]):
            out[col] = (((out[col] + w0 * b0[col]) + w1 * b1[col]) + w2 * b2[col]) + w3 * b3[col]
        m += 4
    while m < count:
        w0, b0 = weights[m], b[rows[m]]
        for col in range(out.shape[0]):
            out[col] += w0 * b0[col]
        m += 1


@numba.njit(cache=True, nogil=True)
def _add_b(
    out: np.ndarray,
    out_columns: np.ndarray,
    s: int,
    b_t: np.ndarray,
    start: int,
    height: int,
    rows: np.ndarray,
    weights: np.ndarray,
    count: int,
    acc: np.ndarray,
) -> int:
    """One token's part s: out[part's columns] += its hidden states (weights, at rows of
    [B | B0]^T) times [B | B0]^T (flat in b_t from `start`: height rows of the part's width),
    summed apart and then added, as a GEMM's result would be. -> the next part's start."""
    lo, hi = out_columns[2 * s], out_columns[2 * s + 1]
    width = hi - lo
    part_acc = acc[:width]
    part_acc[:] = 0.0
    part_b = b_t[start : start + height * width].reshape(height, width)
    _add_rows(part_acc, part_b, rows, weights, count)
    for col in range(width):
        out[lo + col] += part_acc[col]
    return start + height * width


@numba.njit(cache=True, nogil=True)
def _add_bias(logits: np.ndarray, bias: np.ndarray, at: int) -> None:
    """logits [n] += bias[at] (bias empty: none), in float32 as torch adds it."""
    if bias.shape[0]:
        for i in range(logits.shape[0]):
            logits[i] += bias[at, i]


@numba.njit(cache=True, nogil=True)
def _base_model_token(t: int, hidden: np.ndarray, selected: np.ndarray, step: np.ndarray):
    """A base-model token: no adapter, not counted, nothing routed."""
    if hidden.shape[0]:
        hidden[:, t, :] = 0.0
    selected[t] = -1
    if t < step.shape[0]:
        step[t] = 0


@numba.njit(cache=True, nogil=True)
def _route_rows(
    logits: np.ndarray,
    lora_h: np.ndarray,
    always_h: np.ndarray,
    bias: np.ndarray,
    k: int,
    omega: float,
    softmax_gates: bool,
    hidden: np.ndarray,
    selected: np.ndarray,
    stats: np.ndarray,
    step: np.ndarray,
    padding: np.ndarray,
    slots: np.ndarray,
    b_t: np.ndarray,
    out_columns: np.ndarray,
    out: np.ndarray,
) -> None:
    """The given products' routing (route_cpu, grouped_cpu)."""
    tokens, parts, n = logits.shape
    r = lora_h.shape[1] // (parts * n)
    r0 = always_h.shape[1] // parts
    chosen, gates = np.zeros(n, np.bool_), np.zeros(n, np.float64)
    row = np.zeros(n, np.float32)
    b_rows, b_weights = np.zeros(k * r + r0, np.int64), np.zeros(k * r + r0, np.float32)
    acc = np.zeros(out.shape[1], np.float32)
    for t in range(tokens):
        slot = 0 if slots.shape[0] == 0 else slots[t]
        if slot < 0:
            _base_model_token(t, hidden, selected, step)
            continue
        b_start = 0  # where this part's [B | B0]^T starts in b_t[slot]
        for s in range(parts):
            row[:] = logits[t, s]
            _add_bias(row, bias, slot * parts + s)
            entropy, ess = _route(row, k, omega, softmax_gates, chosen, gates, selected[t, s])
            count = 0
            for i in range(n):
                for c in range(r):
                    h = lora_h[t, (s * n + i) * r + c] * np.float32(gates[i])
                    if hidden.shape[0]:
                        hidden[s, t, i * r + c] = h
                    if chosen[i]:
                        b_rows[count], b_weights[count] = i * r + c, h
                        count += 1
            for c in range(r0):  # the always-on LoRA: after the gated ones, ungated
                if hidden.shape[0]:
                    hidden[s, t, n * r + c] = always_h[t, s * r0 + c]
                b_rows[count], b_weights[count] = n * r + c, always_h[t, s * r0 + c]
                count += 1
            if b_t.shape[0]:
                b_start = _add_b(
                    out[t], out_columns, s, b_t[slot], b_start, n * r + r0, b_rows, b_weights,
                    count, acc,
                )  # fmt: skip
            _record(stats, step, padding, t, s, slot * parts + s, chosen, entropy, ess)


@numba.njit(cache=True, nogil=True)
def _dots_block(x, block, local, count, w, row0, rows, out, col0, tile):  # noqa: ANN001, ANN202
    """out[a, col0 + m] = x[block[a]] . w[row0 + m] for the block's tokens a = local[:count] and
    m < rows, in 4 x 4 tiles (a short tile repeats its last token or row; the repeats' sums are
    dropped), so every product is summed by the same code whatever its tile-mates."""
    last = row0 + rows - 1
    for a0 in range(0, count, TILE):
        a1, a2, a3 = (local[min(a0 + 1, count - 1)], local[min(a0 + 2, count - 1)],
                      local[min(a0 + 3, count - 1)])  # fmt: skip
        x0, x1, x2, x3 = x[block[local[a0]]], x[block[a1]], x[block[a2]], x[block[a3]]
        for m0 in range(0, rows, TILE):
            m = row0 + m0
            w0, w1, w2, w3 = w[m], w[min(m + 1, last)], w[min(m + 2, last)], w[min(m + 3, last)]
            _dot_tile(x0, x1, x2, x3, w0, w1, w2, w3, tile)
            for i in range(min(TILE, count - a0)):
                for j in range(min(TILE, rows - m0)):
                    out[local[a0 + i], col0 + m0 + j] = tile[i, j]


@numba.njit(cache=True, nogil=True)
def _add_block(out, lo, block, spare, local, count, b, row0, rows, h, tile):  # noqa: ANN001, ANN202
    """out[block[a], lo : lo + width] += sum over m < rows of h[a, row0 + m] * b[row0 + m] for
    a = local[:count], in tiles of four tokens by eight rows, rows in order. A short tile's
    missing tokens add into the spare rows (each its own, so the tile's sums never overlap),
    its missing rows weigh 0."""
    hi, last = lo + b.shape[1], row0 + rows - 1
    for a0 in range(0, count, TILE):
        o0 = out[block[local[a0]], lo:hi]
        o1 = out[block[local[a0 + 1]], lo:hi] if a0 + 1 < count else spare[0]
        o2 = out[block[local[a0 + 2]], lo:hi] if a0 + 2 < count else spare[1]
        o3 = out[block[local[a0 + 3]], lo:hi] if a0 + 3 < count else spare[2]
        for m0 in range(0, rows, B_ROWS):
            tile[:] = 0.0
            for i in range(min(TILE, count - a0)):
                for j in range(min(B_ROWS, rows - m0)):
                    tile[i, j] = h[local[a0 + i], row0 + m0 + j]
            _add_tile(o0, o1, o2, o3, b, row0 + m0, last, tile)


@numba.njit(cache=True, nogil=True)
def _add_part_b(out, lo, block, count, rows_of, part_b, hidden, spare, tile):  # noqa: ANN001, ANN202
    """out[block's tokens, lo : lo + width] += their gated hidden states times the part's
    [B | B0]^T (part_b [n*r + r0, width]): each LoRA's rows for the tokens that chose it
    (rows_of: members, member_count, everyone, r, r0), then everyone's always-on rows, added
    into out in that order (the same for a token in any batch); spare: a short tile's rows."""
    members, member_count, everyone, r, r0 = rows_of
    spare_rows = spare[: (TILE - 1) * part_b.shape[1]].reshape(TILE - 1, -1)
    for i in range(members.shape[0]):
        _add_block(
            out, lo, block, spare_rows, members[i], member_count[i], part_b, i * r, r, hidden,
            tile,
        )  # fmt: skip
    _add_block(
        out, lo, block, spare_rows, everyone, count, part_b, members.shape[0] * r, r0, hidden, tile
    )


@numba.njit(cache=True, nogil=True)
def _by_slot(slots: np.ndarray, tokens: int) -> np.ndarray:
    """The tokens grouped by slot (stable; base-model tokens, slot -1, first); no slots: as
    they come."""
    if slots.shape[0] == 0:
        return np.arange(tokens)
    return np.argsort(slots[:tokens], kind="mergesort")


@numba.njit(cache=True, nogil=True)
def remix_rows(
    x: np.ndarray,
    out: np.ndarray,
    padding: np.ndarray,
    selected: np.ndarray,
    weights: np.ndarray,
    parts: int,
    n: int,
    r: int,
    r0: int,
    bias: np.ndarray,
    k: int,
    omega: float,
    softmax_gates: bool,
    stats: np.ndarray,
    step: np.ndarray,
    slots: np.ndarray,
    b_t: np.ndarray,
    out_columns: np.ndarray,
) -> None:
    """The whole adapter from x (grouped_cpu), a block of up to BLOCK_TOKENS tokens of one slot
    at a time, each weight row loaded once for four tokens: per part the router's n products
    and each token's top-k and gates, then per chosen LoRA its tokens' r A products (and every
    token's always-on r0), gated, times its B rows: k/n of the adapter's dense arithmetic."""
    tokens = x.shape[0]
    order = _by_slot(slots, tokens)
    height = n * r + r0  # rows of a part's [B | B0]^T
    widest = 0
    for s in range(parts):
        widest = max(widest, out_columns[2 * s + 1] - out_columns[2 * s])
    most = max(1, min(tokens, BLOCK_TOKENS))  # a block's tokens: the scratch's rows
    logits = np.zeros((most, n), np.float32)
    hidden = np.zeros((most, height), np.float32)
    gates = np.zeros((most, n), np.float32)
    members, member_count = np.zeros((n, most), np.int64), np.zeros(n, np.int64)
    spare = np.zeros((TILE - 1) * widest, np.float32)  # a short B tile's missing tokens
    everyone, tile = np.arange(most), np.zeros((TILE, TILE), np.float32)
    b_tile = np.zeros((TILE, B_ROWS), np.float32)
    chosen, token_gates = np.zeros(n, np.bool_), np.zeros(n, np.float64)
    row = np.zeros(n, np.float32)
    no_hidden = np.zeros((0, 0, 0), np.float32)
    start = 0
    while start < tokens:
        slot = 0 if slots.shape[0] == 0 else slots[order[start]]
        end = start + 1
        while (
            end < tokens
            and end - start < BLOCK_TOKENS
            and (slots.shape[0] == 0 or slots[order[end]] == slot)
        ):
            end += 1
        block, count = order[start:end], end - start
        start = end
        if slot < 0:
            for t in block:
                _base_model_token(t, no_hidden, selected, step)
            continue
        w, b_start = weights[slot], 0  # b_start: where this part's [B | B0]^T starts in b_t[slot]
        for s in range(parts):
            router_row = parts * height + s * n  # the part's P rows in w, after every [A ; A0]
            _dots_block(x, block, everyone, count, w, router_row, n, logits, 0, tile)
            member_count[:] = 0
            for a in range(count):
                row[:] = logits[a]
                _add_bias(row, bias, slot * parts + s)
                t = block[a]
                entropy, ess = _route(
                    row, k, omega, softmax_gates, chosen, token_gates, selected[t, s]
                )
                for i in range(n):
                    if chosen[i]:
                        members[i, member_count[i]] = a
                        member_count[i] += 1
                        gates[a, i] = token_gates[i]
                _record(stats, step, padding, t, s, slot * parts + s, chosen, entropy, ess)
            for i in range(n):
                ids, c = members[i], member_count[i]
                _dots_block(x, block, ids, c, w, (s * n + i) * r, r, hidden, i * r, tile)
                for m in range(c):  # the hidden state times its gate, in float32 as torch
                    for j in range(r):
                        hidden[ids[m], i * r + j] *= gates[ids[m], i]
            always_row = parts * n * r + s * r0
            _dots_block(x, block, everyone, count, w, always_row, r0, hidden, n * r, tile)
            if b_t.shape[0] == 0:  # B added elsewhere
                continue
            lo, hi = out_columns[2 * s], out_columns[2 * s + 1]
            part_b = b_t[slot][b_start : b_start + height * (hi - lo)].reshape(height, hi - lo)
            b_start += height * (hi - lo)
            rows_of = (members, member_count, everyone, r, r0)
            _add_part_b(out, lo, block, count, rows_of, part_b, hidden, spare, b_tile)


# --- the ops ---------------------------------------------------------------------------------

# what the kernels are given for an argument they are not to use (they read none of them)
_NONE_1D, _NO_ROWS = np.zeros(0, np.bool_), np.zeros(0, np.int64)
_NONE_2D, _NONE_3D = np.zeros((0, 0), np.float32), np.zeros((0, 0, 0), np.float32)

NumpyViews = dict[tuple, tuple[tuple, tuple[np.ndarray, ...]]]


def _persistent(tensors: tuple, nones: tuple, views: NumpyViews) -> tuple[np.ndarray, ...]:
    """The numpy views of tensors that are only ever changed in place (a None: its entry of
    `nones`), made once per set of tensors and kept in `views` (their owner's; the entry holds
    the tensors, so their ids stay theirs): a view costs about 2 us a call, and each Python
    call made between the GEMMs, whose caches are cold, several, more than the kernel at
    decode sizes."""
    key = tuple(map(id, tensors))
    held = views.get(key)
    if held is None:
        numpy = tuple(
            n if t is None else t.detach().numpy() for t, n in zip(tensors, nones, strict=True)
        )
        held = views[key] = (tensors, numpy)
    return held[1]


def padding_rows(tokens: int) -> np.ndarray:
    """The current forward's padding rows (empty: none), as the kernels read them."""
    padding = padding_mask(tokens)
    return padding.numpy() if padding is not None else _NONE_1D


@remix_op("route_cpu", mutates_args=("hidden", "selected", "stats", "step_selected"))
def route_cpu(
    logits: torch.Tensor,
    lora_h: torch.Tensor,
    router_bias: torch.Tensor | None,
    hidden: torch.Tensor,
    selected: torch.Tensor,
    stats: torch.Tensor,
    step_selected: torch.Tensor,
    top_k: int,
    omega: float,
    softmax_gates: bool,
    slots: torch.Tensor | None = None,
) -> None:
    """logits [T, S*n] float32 (rows may be strided), lora_h [T, S*n*r] (likewise; each token's
    own slot's), router_bias [C*S, n] (added to each token's own slot's logits; None: none) ->
    hidden [S, T, >= n*r] (gated, in the first n*r columns; zero for base-model tokens),
    selected [T, S, k] (int64, largest first; -1 for base-model tokens); stats [C*S, n+3] (into
    each token's slot's rows) and step_selected updated."""
    tokens, parts = selected.shape[:2]
    _route_rows(
        logits.detach().numpy().reshape(tokens, parts, -1),
        lora_h.detach().numpy(),
        _NONE_2D,
        router_bias.detach().numpy() if router_bias is not None else _NONE_2D,
        top_k,
        omega,
        softmax_gates,
        hidden.numpy(),
        selected.numpy(),
        stats.numpy(),
        step_selected.numpy(),
        padding_rows(tokens),
        slots.numpy() if slots is not None else _NO_ROWS,
        _NONE_2D,
        _NO_ROWS,
        _NONE_2D,
    )


@remix_op("grouped_cpu", mutates_args=("out", "hidden", "selected", "stats", "step_selected"))
def grouped_cpu(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    router_bias: torch.Tensor | None,
    slots: torch.Tensor,
    b_t: torch.Tensor | None,
    out_columns: torch.Tensor,
    out: torch.Tensor,
    hidden: torch.Tensor | None,
    selected: torch.Tensor,
    stats: torch.Tensor,
    step_selected: torch.Tensor,
    top_k: int,
    omega: float,
    softmax_gates: bool,
    rank: int,
    always_rank: int,
    products: int,
    from_x: bool,
) -> None:
    """The grouped path's adapter in one call; slots [>= T] (the engine's slot buffer: its
    first T rows are read), weights [C, S*(n*r + r0 + n), d_in] (each slot's [A ; A0 ; P]),
    b_t [C, (n*r + r0) * the adapted parts' widths summed] (each slot's [B | B0]^T of each part,
    [n*r + r0, d_out_j], flat, the parts one after the other), out_columns (the first and
    past-the-last output column of each part, flattened). -> selected [T, S, k], stats and
    step_selected as route_cpu, and out [T, d_out] += each token's B product (b_t None: not
    added here).

    from_x: inputs is x [T, d_in], a whole projection's input: the router's products, then
    only the k chosen LoRAs' A and B rows (hidden unused). Otherwise inputs is [T, S*(n*r + r0
    + n)], each token's own slot's [A ; A0 ; P] product (summed over ranks for a row-parallel
    shard); hidden [S, T, n*r + r0] (None: not written) gets the gated then the always-on
    hidden states, for B products run elsewhere. products: the path's registered index
    (ops/slots.py), which keeps the numpy views of the persistent tensors."""
    layout = remix_rows_layout(
        weights, router_bias, slots, b_t, out_columns, stats, step_selected, top_k, omega,
        softmax_gates, rank, always_rank, registered(products).numpy_views,
    )  # fmt: skip
    given, added = inputs.detach().numpy(), out.detach().numpy()
    tokens, parts = selected.shape[:2]
    if from_x:
        remix_rows(given, added, padding_rows(tokens), selected.numpy(), *layout)
        return
    lora_end = parts * rank * layout.n
    always_end = lora_end + parts * always_rank
    _route_rows(
        given[:, always_end:].reshape(tokens, parts, -1),
        given[:, :lora_end],
        given[:, lora_end:always_end],
        layout.bias,
        top_k,
        omega,
        softmax_gates,
        hidden.numpy() if hidden is not None else _NONE_3D,
        selected.numpy(),
        layout.stats,
        layout.step,
        padding_rows(tokens),
        layout.slots,
        layout.b_t,
        layout.out_columns,
        added,
    )


class KernelLayout(NamedTuple):
    """`remix_rows`'s arguments after x, out, padding and selected, in its order."""

    weights: np.ndarray
    parts: int
    n: int
    rank: int
    always_rank: int
    bias: np.ndarray
    top_k: int
    omega: float
    softmax_gates: bool
    stats: np.ndarray
    step: np.ndarray
    slots: np.ndarray
    b_t: np.ndarray
    out_columns: np.ndarray


def remix_rows_layout(
    weights: torch.Tensor,
    router_bias: torch.Tensor | None,
    slots: torch.Tensor,
    b_t: torch.Tensor | None,
    out_columns: torch.Tensor,
    stats: torch.Tensor,
    step_selected: torch.Tensor,
    top_k: int,
    omega: float,
    softmax_gates: bool,
    rank: int,
    always_rank: int,
    views: NumpyViews,
) -> KernelLayout:
    """The kernels' arguments that stay from call to call: numpy views of the persistent
    tensors (kept in `views`) and the layout's numbers; a path that holds them makes them
    once."""
    rows, bias, stats_v, step, slots_v, b_t_v, columns = _persistent(
        (weights, router_bias, stats, step_selected, slots, b_t, out_columns),
        (_NONE_3D, _NONE_2D, _NONE_2D, _NONE_3D, _NO_ROWS, _NONE_2D, _NO_ROWS),
        views,
    )
    parts, n = step_selected.shape[1], stats.shape[1] - 3
    routing = (bias, top_k, omega, softmax_gates)
    return KernelLayout(
        rows, parts, n, rank, always_rank, *routing, stats_v, step, slots_v, b_t_v, columns
    )
