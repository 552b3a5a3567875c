"""Tolerances that follow from float32 arithmetic, not from what one machine printed.

Two correct kernels may add the same float32 terms in other orders: BLAS blocks a dot product
by its vector width (AVX2, AVX-512 and AMX differ), Triton splits d_in across programs, numba
and inductor vectorise their loops their own way. Each order of n terms is within
(n - 1) * u * sum(|terms|) of the exact sum (u = eps / 2, Higham's bound for recursive
summation), so two orders differ by at most n * eps relative to that sum of magnitudes.
"""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2**-23


def float32_sum_rtol(terms: int) -> float:
    """Relative bound between two float32 sums of `terms` terms taken in different orders."""
    return terms * EPS32


def routing_stats_rtol(d_in: int, tokens: int) -> float:
    """Routing statistics (entropy and ESS sums) of two kernels: each token's router logits are
    d_in-term dot products, and the per-token entropies are then added over `tokens` in another
    order. Softmax, entropy and ESS are smooth of order one in the logits at these scales, so the
    logits' error carries through, and the two sums add theirs: (d_in + tokens) eps, whose
    factor 2 over u also covers exp and log's own last-bit errors. Selection and token counts
    are integers below 2**10, so any miscount is still far outside this bound."""
    return float32_sum_rtol(d_in + tokens)


def float32_products_atol(
    x: torch.Tensor, weight: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Elementwise bound between two float32 computations of scale * (x @ weight^T) whose d_in
    terms are summed in other orders (another split of d_in, another tile width for BLAS or
    the tensor cores): each sum is within (d_in - 1) u sum_i |x_i w_i| of the exact one, and
    the product by scale adds u of it on each side, so the two differ by at most
    d_in eps |scale| sum_i |x_i w_i|."""
    terms = torch.nn.functional.linear(x.abs(), weight.abs())
    return float32_sum_rtol(x.shape[-1]) * abs(scale) * terms
