"""The routing kernel on CPU: one compiled call per projection instead of ~20 small torch ops.

At decode batch sizes the torch path's routing (sort, gates, gating, the statistics) costs
about 10 us per eager operation, more than the arithmetic. This numba kernel does the same per
token and part in one pass over the pool's products (the stacked GEMM's columns, or the grouped
path's narrow product, whose router bias it adds in float32 as torch would): top-k (largest
first, ties to the lower index), gates, the gated hidden states part-major ([S, T, n*r], where each B product
reads them), the statistics row (selections, tokens, entropy, ESS; padding rows excluded) and
the step's per-token selections. The plain-torch path (pool.py) stays the oracle it is tested
against. Registered as `torch.ops.remix.route_cpu` (custom_op.py) so vLLM's compiled graphs keep it.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from remix_infer.ops.custom_op import remix_op
from remix_infer.ops.slots import registered
from remix_infer.ops.stats import padding_mask


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
    tokens, parts, n = logits.shape
    r = lora_h.shape[1] // (parts * n)
    r0 = always_h.shape[1] // parts
    chosen = np.zeros(n, np.bool_)
    row = np.zeros(n, np.float32)
    # the B product of each token and part: its k*r gated rows and r0 always-on ones
    b_rows = np.zeros(k * r + r0, np.int64)
    b_weights = np.zeros(k * r + r0, np.float32)
    acc = np.zeros(out.shape[1], np.float32)
    for t in range(tokens):
        slot = 0 if slots.shape[0] == 0 else slots[t]
        if slot < 0:  # a base-model token: no adapter, not counted, nothing to route
            if hidden.shape[0]:
                hidden[:, t, :] = 0.0
            selected[t] = -1
            if t < step.shape[0]:
                step[t] = 0
            continue
        real = padding.shape[0] == 0 or not padding[t]
        b_start = 0  # where this part's [B | B0]^T starts in b_t
        for s in range(parts):
            for i in range(n):  # float32 sums, as torch adds the bias
                row[i] = logits[t, s, i]
                if bias.shape[0]:
                    row[i] += bias[slot * parts + s, i]
            chosen[:] = False
            for j in range(k):  # ties: a later index must be strictly larger to win
                best = -1
                for i in range(n):
                    if not chosen[i] and (best < 0 or row[i] > row[best]):
                        best = i
                chosen[best] = True
                selected[t, s, j] = best
            top = row[selected[t, s, 0]]
            total = 0.0
            chosen_total = 0.0
            for i in range(n):
                total += math.exp(row[i] - top)
                if chosen[i]:
                    chosen_total += math.exp(row[i] - top)
            entropy = 0.0
            for i in range(n):
                p = math.exp(row[i] - top) / total
                if p > 0.0:
                    entropy -= p * math.log(p)
            weight_sum = 0.0
            weight_sq = 0.0
            count = 0
            for i in range(n):
                g = 0.0
                if chosen[i]:
                    g = omega * math.exp(row[i] - top) / chosen_total if softmax_gates else omega
                weight_sum += g
                weight_sq += g * g
                for c in range(r):
                    h = lora_h[t, (s * n + i) * r + c] * np.float32(g)
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
            if b_t.shape[0]:  # out[t, part's columns] += its B product, summed in row order
                lo, hi = out_columns[2 * s], out_columns[2 * s + 1]
                part_acc = acc[: hi - lo]
                part_acc[:] = 0.0
                part_b = b_t[slot, b_start : b_start + (n * r + r0) * (hi - lo)]
                _add_rows(part_acc, part_b.reshape(n * r + r0, hi - lo), b_rows, b_weights, count)
                for col in range(hi - lo):
                    out[t, lo + col] += part_acc[col]
                b_start += (n * r + r0) * (hi - lo)
            if t < step.shape[0]:
                for i in range(n):
                    step[t, s, i] = 1 if chosen[i] else 0
            if real:
                at = slot * parts + s
                for i in range(n):
                    if chosen[i]:
                        stats[at, i] += 1.0
                stats[at, n] += 1.0
                stats[at, n + 1] += entropy
                # constant weights: exactly k, not k up to rounding
                stats[at, n + 2] += weight_sum * weight_sum / weight_sq if softmax_gates else k


# what the kernel is given for an argument it is not to use (it reads none of them)
_NONE_1D, _NO_ROWS = np.zeros(0, np.bool_), np.zeros(0, np.int64)
_NONE_2D, _NONE_3D = np.zeros((0, 0), np.float32), np.zeros((0, 0, 0), np.float32)

NumpyViews = dict[int, tuple[torch.Tensor, np.ndarray]]


def _persistent(tensor: torch.Tensor | None, none: np.ndarray, views: NumpyViews) -> np.ndarray:
    """The numpy view of a tensor that is only ever changed in place (`none` for None), made
    once and kept in `views` (its owner's: the view holds the tensor): a view costs about 2 us
    a call, more than the kernel at decode sizes."""
    if tensor is None:
        return none
    held = views.get(id(tensor))
    if held is None or held[0] is not tensor:
        held = views[id(tensor)] = (tensor, tensor.detach().numpy())
    return held[1]


def _padding(tokens: int) -> np.ndarray:
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
        _padding(tokens),
        slots.numpy() if slots is not None else _NO_ROWS,
        _NONE_2D,
        _NO_ROWS,
        _NONE_2D,
    )


@remix_op("route_add_cpu", mutates_args=("out", "hidden", "selected", "stats", "step_selected"))
def route_add_cpu(
    narrow: torch.Tensor,
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
) -> None:
    """The grouped path's routing and B products in one call. narrow [T, S*(n*r + r0 + n)]:
    each token's own slot's [A ; A0 ; P] product (router bias not added); slots [>= T] (the
    engine's whole slot buffer: its first T rows are read) ->
    selected [T, S, k], stats and step_selected as route_cpu; and, with b_t [C, (n*r + r0) *
    the adapted parts' widths summed] (each part's [B | B0]^T [n*r + r0, d_out_j] of each
    slot, flat, the parts one after the other: each row contiguous), out
    [T, d_out] += each token's B product in its part's columns (out_columns: the first and
    past-the-last of each part, flattened): gated rows then the always-on ones, in row order.
    hidden [S, T, n*r + r0] (None: not written) gets the gated hidden states then the always-on
    ones, for products run elsewhere. products: the path's registered index (ops/slots.py),
    which keeps the numpy views of the persistent tensors here."""
    views = registered(products).numpy_views
    tokens, parts = selected.shape[:2]
    products = narrow.detach().numpy()
    lora_end = parts * (stats.shape[1] - 3) * rank
    always_end = lora_end + parts * always_rank
    _route_rows(
        products[:, always_end:].reshape(tokens, parts, -1),
        products[:, :lora_end],
        products[:, lora_end:always_end],
        _persistent(router_bias, _NONE_2D, views),
        top_k,
        omega,
        softmax_gates,
        hidden.numpy() if hidden is not None else _NONE_3D,
        selected.numpy(),
        _persistent(stats, _NONE_2D, views),
        _persistent(step_selected, _NONE_3D, views),
        _padding(tokens),
        _persistent(slots, _NO_ROWS, views),
        _persistent(b_t, _NONE_2D, views),
        _persistent(out_columns, _NO_ROWS, views),
        out.detach().numpy(),
    )
