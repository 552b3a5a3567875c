"""The RLOO estimator of the router gradient, as a surrogate loss autograd can differentiate."""

from __future__ import annotations

import torch


def rloo_surrogate(losses: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Surrogate whose gradient is the ReMix training signal for one batch.

    losses: [B, M] SFT loss of each sequence under each of its M sampled selections (graph
    attached: LoRA weights get the SFT gradient averaged over the M selections).
    log_probs: [B, M] log Q(J_m), the Plackett-Luce log-probability of selection m summed over
    the sequence's tokens and adapted layers (graph attached to the routers only).

    Router gradient, per sequence: 1/(M-1) sum_m (L_m - mean(L)) grad log Q(J_m); this is
    the leave-one-out baseline in closed form. The result is averaged over the batch.
    """
    num_samples = losses.shape[-1]
    if num_samples < 2:
        raise ValueError("RLOO needs at least 2 selections per sequence (M >= 2)")
    advantage = (losses - losses.mean(-1, keepdim=True)).detach() / (num_samples - 1)
    return (losses.mean(-1) + (advantage * log_probs).sum(-1)).mean()
