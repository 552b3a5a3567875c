"""Routing primitives shared by the reference model, the trainer and the serving layer.

All functions work on router logits of shape [..., n] and are vectorized over tokens.
"""

from __future__ import annotations

import torch


def topk_select(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic top-k indices [..., k], largest logit first, ties to the lower index.

    Softmax is monotone, so this is the top-k of the router probabilities. A stable sort
    keeps equal logits in index order, which torch.topk does not promise.
    """
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :k]


def gumbel_topk_sample(
    logits: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """An ordered draw of k distinct indices without replacement from softmax(logits).

    Gumbel-top-k: perturbing logits with i.i.d. Gumbel noise and taking the top k gives the
    same distribution as sampling one index at a time from the renormalised remainder.
    """
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = -torch.log((-torch.log(uniform.clamp_min(1e-20))).clamp_min(1e-20))
    return torch.topk(logits.detach().float() + gumbel, k, dim=-1).indices


def plackett_luce_log_prob(logits: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """log Q of ordered draws [..., k] under softmax(logits): sum_j log(q_ij / (1 - sum_{l<j} q_il)).

    Written with a log-sum-exp over the indices not yet drawn, which is the same quantity
    without the cancellation in 1 - sum q. Differentiable in logits.
    """
    logits = logits.float()
    taken = torch.zeros_like(logits, dtype=torch.bool)
    total = torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    for j in range(draws.shape[-1]):  # k is small; this loops over draw positions, not tokens
        index = draws[..., j : j + 1]
        remaining = logits.masked_fill(taken, float("-inf"))
        total = total + logits.gather(-1, index).squeeze(-1) - torch.logsumexp(remaining, dim=-1)
        taken = taken.scatter(-1, index, True)
    return total


def selection_weights(
    logits: torch.Tensor, selected: torch.Tensor, omega: float, weighting: str
) -> torch.Tensor:
    """Weights [..., k] given to the selected LoRAs.

    constant (ReMix): omega for every selected LoRA.
    softmax_topk (MixLoRA / LoRA-Mixer): omega times the softmax over the selected logits.
    """
    if weighting == "constant":
        return torch.full(selected.shape, omega, dtype=logits.dtype, device=logits.device)
    return omega * torch.softmax(logits.gather(-1, selected), dim=-1)


def dense_gates(selected: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """Scatter per-selection weights [..., k] into a dense [..., n] gate (zero = not selected)."""
    gates = torch.zeros(*selected.shape[:-1], n, dtype=weights.dtype, device=weights.device)
    return gates.scatter(-1, selected, weights)


def routing_gates(
    logits: torch.Tensor, selected: torch.Tensor, omega: float, weighting: str
) -> torch.Tensor:
    """Dense gates [..., n]: each selected LoRA's weight (see selection_weights), zero elsewhere."""
    if weighting == "constant":  # the common case in one scatter, no weight tensor
        return torch.zeros_like(logits).scatter_(-1, selected, omega)
    return dense_gates(
        selected, selection_weights(logits, selected, omega, weighting), logits.shape[-1]
    )


def effective_support_size(weights: torch.Tensor) -> torch.Tensor:
    """ESS(pi) = (sum pi)^2 / sum pi^2 over the last dim: k for k equal weights, 1 when one dominates."""
    weights = weights.float()
    return weights.sum(-1) ** 2 / (weights**2).sum(-1).clamp_min(1e-30)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last dim (0 log 0 = 0)."""
    probs = probs.float()
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


def effective_loras(counts: torch.Tensor) -> torch.Tensor:
    """Effective number of LoRAs in use: exp of the entropy of the selection-count distribution.

    n when every LoRA is chosen equally often, 1 when a single LoRA takes every selection.
    """
    counts = counts.float()
    return torch.exp(entropy(counts / counts.sum(-1, keepdim=True).clamp_min(1e-30)))
