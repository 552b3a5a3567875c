"""Routing regularisers of the baselines, over one module's routing of the real tokens.

logits [T, n] (float32, graph attached) and selected [T, k] (the chosen indices) of T tokens.
"""

from __future__ import annotations

import torch

from remix_infer.routing import entropy


def selection_shares(selected: torch.Tensor, n: int) -> torch.Tensor:
    """Share of the T*k selections that went to each LoRA, [n] (no gradient)."""
    counts = torch.bincount(selected.flatten(), minlength=n).float()
    return counts / counts.sum().clamp_min(1)


def switch_balance_loss(logits: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balance (mixlora): n * sum_i share_i * mean prob_i."""
    n = logits.shape[-1]
    return n * (selection_shares(selected, n) * torch.softmax(logits, -1).mean(0)).sum()


def rsl_loss(
    logits: torch.Tensor, selected: torch.Tensor, alpha: float, lam: float
) -> torch.Tensor:
    """LoRA-Mixer's Routing Specialization Balance loss, its eq. (5) as written:

        L_RSL = alpha * sum_i pbar_i * fbar_i  -  lambda * E_x[ H(p(x)) ]

    pbar_i: mean softmax probability of LoRA i over the tokens; fbar_i: its share of the top-k
    selections; H: the entropy (nats) of a token's routing distribution. The paper trains with
    alpha = 0.1, lambda = 0.5 (its appendix). Note: minimising -lambda * H raises the entropy,
    which is what the formula and the paper's convexity argument (appendix A.1) say, while its
    prose speaks of suppressing flat distributions; this follows the formula.
    """
    probs = torch.softmax(logits, -1)
    balance = (probs.mean(0) * selection_shares(selected, logits.shape[-1])).sum()
    return alpha * balance - lam * entropy(probs).mean()
