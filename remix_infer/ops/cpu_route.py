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
from remix_infer.ops.stats import padding_mask


@numba.njit(cache=True, nogil=True)
def _route_rows(
    logits: np.ndarray,
    lora_h: np.ndarray,
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
) -> None:
    tokens, parts, n = logits.shape
    r = lora_h.shape[1] // (parts * n)
    chosen = np.zeros(n, np.bool_)
    gates = np.zeros(n, np.float64)
    row = np.zeros(n, np.float32)
    for t in range(tokens):
        slot = 0 if slots.shape[0] == 0 else slots[t]
        if slot < 0:  # a base-model token: no adapter, not counted, nothing to route
            hidden[:, t, :] = 0.0
            selected[t] = -1
            if t < step.shape[0]:
                step[t] = 0
            continue
        real = padding.shape[0] == 0 or not padding[t]
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
            for i in range(n):
                g = 0.0
                if chosen[i]:
                    g = omega * math.exp(row[i] - top) / chosen_total if softmax_gates else omega
                gates[i] = g
                weight_sum += g
                weight_sq += g * g
                for c in range(r):
                    hidden[s, t, i * r + c] = lora_h[t, (s * n + i) * r + c] * np.float32(g)
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
    n = stats.shape[1] - 3
    padding = padding_mask(tokens)
    no_bias = np.zeros((0, n), np.float32)
    _route_rows(
        logits.detach().numpy().reshape(tokens, parts, n),
        lora_h.detach().numpy(),
        router_bias.detach().numpy() if router_bias is not None else no_bias,
        top_k,
        omega,
        softmax_gates,
        hidden.numpy(),
        selected.numpy(),
        stats.numpy(),
        step_selected.numpy(),
        padding.numpy() if padding is not None else np.zeros(0, np.bool_),
        slots.numpy() if slots is not None else np.zeros(0, np.int64),
    )
