"""The RLOO router-gradient estimator (remix_infer.train.rloo.rloo_surrogate)."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers.tolerances import float32_sum_rtol

from remix_infer.routing import gumbel_topk_sample, plackett_luce_log_prob
from remix_infer.train.rloo import rloo_surrogate

N, K = 4, 2
# Logits of the one-token problem: uneven, so every coordinate of the gradient is non-trivial.
THETA = torch.tensor([0.8, 0.2, -0.3, -0.6])
# Loss of a selection depends on the set {i, j} only, as the SFT loss under constant omega does.
SET_LOSS = {
    (0, 1): 1.0,
    (0, 2): 2.5,
    (0, 3): 0.2,
    (1, 2): 3.0,
    (1, 3): 0.5,
    (2, 3): 1.8,
}
DRAWS = torch.tensor(list(itertools.permutations(range(N), K)), dtype=torch.long)  # [12, 2]


def loss_table() -> torch.Tensor:
    """Loss of each ordered draw, indexed by code i * N + j."""
    table = torch.zeros(N * N)
    for i, j in DRAWS.tolist():
        table[i * N + j] = SET_LOSS[tuple(sorted((i, j)))]
    return table


def exact_gradient() -> torch.Tensor:
    """grad_theta E_{J ~ Q_theta}[L(J)] = grad of sum_J Q(J) L(J), by autograd over every draw."""
    theta = THETA.clone().requires_grad_(True)
    log_q = plackett_luce_log_prob(theta.expand(len(DRAWS), N), DRAWS)
    losses = loss_table()[DRAWS[:, 0] * N + DRAWS[:, 1]]
    # probabilities summing to one: len(DRAWS) roundings, plus each term's own few (exp, log)
    total_tol = float32_sum_rtol(len(DRAWS) + 4)
    torch.testing.assert_close(log_q.exp().sum(), torch.tensor(1.0), atol=total_tol, rtol=0)
    (log_q.exp() * losses).sum().backward()
    return theta.grad.clone()


def biased_surrogate(losses: torch.Tensor, log_probs: torch.Tensor, factor: float) -> torch.Tensor:
    """A wrong variant: (L_m - Lbar) scaled by `factor` instead of 1 / (M - 1)."""
    advantage = (losses - losses.mean(-1, keepdim=True)).detach() * factor
    return (losses.mean(-1) + (advantage * log_probs).sum(-1)).mean()


def per_replicate_estimates(
    num_replicates: int, num_samples: int, seed: int, surrogate=rloo_surrogate
) -> torch.Tensor:
    """[R, N]: one router-gradient estimate per replicate, each from M fresh selections.

    Every replicate has its own copy of the logits (a row of one leaf tensor), so the
    gradient of the batch-mean surrogate, times R, holds each replicate's estimate.
    """
    theta = THETA.expand(num_replicates, N).clone().requires_grad_(True)
    logits = theta.unsqueeze(1).expand(num_replicates, num_samples, N)
    draws = gumbel_topk_sample(logits, K, generator=torch.Generator().manual_seed(seed))
    log_probs = plackett_luce_log_prob(logits, draws)  # [R, M]
    losses = loss_table()[draws[..., 0] * N + draws[..., 1]]  # [R, M], no graph
    surrogate(losses, log_probs).backward()
    return theta.grad * num_replicates


def z_scores(estimates: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    mean = estimates.double().mean(0)
    stderr = estimates.double().std(0) / estimates.shape[0] ** 0.5
    return (mean - exact.double()) / stderr


@pytest.mark.parametrize("num_samples", [2, 4])
def test_rloo_gradient_is_unbiased_and_biased_variants_are_rejected(num_samples):
    exact = exact_gradient()
    assert exact.abs().min() > 0.05  # every coordinate carries signal
    replicates = 20_000

    estimates = per_replicate_estimates(replicates, num_samples, seed=1000 + num_samples)
    z = z_scores(estimates, exact)
    assert torch.all(z.abs() < 4), (z, estimates.mean(0), exact)

    # The same bound rejects estimators that are off by a constant factor: 1/M (the baseline
    # that includes the sample itself, averaged over M), and M/(M-1)^2 (the 1/(M-1) factor
    # put on the leave-one-out form sum_m (L_m - mean of the others), which is M/(M-1) times
    # sum_m (L_m - Lbar)).
    for factor in (1.0 / num_samples, num_samples / (num_samples - 1) ** 2):
        wrong = per_replicate_estimates(
            replicates,
            num_samples,
            seed=1000 + num_samples,
            surrogate=lambda lo, lp, f=factor: biased_surrogate(lo, lp, f),
        )
        wrong_z = z_scores(wrong, exact)
        assert wrong_z.abs().max() > 4, (factor, wrong_z)


def test_rloo_per_replicate_estimates_match_closed_form():
    """The gradient of the surrogate in one replicate is 1/(M-1) sum_m (L_m - Lbar) grad log Q_m."""
    num_samples = 3
    theta = THETA.expand(5, N).clone().requires_grad_(True)
    logits = theta.unsqueeze(1).expand(5, num_samples, N)
    draws = gumbel_topk_sample(logits, K, generator=torch.Generator().manual_seed(3))
    losses = loss_table()[draws[..., 0] * N + draws[..., 1]]
    rloo_surrogate(losses, plackett_luce_log_prob(logits, draws)).backward()
    for b in range(5):
        expected = torch.zeros(N)
        mean = losses[b].mean()
        for m in range(num_samples):
            t = THETA.clone().requires_grad_(True)
            (grad_log_q,) = torch.autograd.grad(plackett_luce_log_prob(t, draws[b, m]), t)
            expected += (losses[b, m] - mean) / (num_samples - 1) * grad_log_q
        torch.testing.assert_close(theta.grad[b] * 5, expected, atol=1e-5, rtol=1e-5)


def test_rloo_log_prob_gradient_is_leave_one_out_advantage():
    gen = torch.Generator().manual_seed(4)
    batch, num_samples = 3, 5
    losses = torch.rand(batch, num_samples, generator=gen) * 4
    log_probs = torch.randn(batch, num_samples, generator=gen).requires_grad_(True)
    rloo_surrogate(losses, log_probs).backward()
    # Leave-one-out form: (1/M) * (L_m - mean of the other M-1 losses), per sequence,
    # then averaged over the batch.
    others = (losses.sum(-1, keepdim=True) - losses) / (num_samples - 1)
    expected = (losses - others) / num_samples / batch
    torch.testing.assert_close(log_probs.grad, expected)
    # Advantages of a sequence sum to zero: a constant shift of the losses changes nothing.
    # the leave-one-out means add M losses, then the M advantages are added: 2M roundings of
    # at most the largest loss
    zero_tol = float32_sum_rtol(2 * num_samples) * float(losses.max())
    torch.testing.assert_close(log_probs.grad.sum(-1), torch.zeros(batch), atol=zero_tol, rtol=0)
    shifted = log_probs.detach().clone().requires_grad_(True)
    rloo_surrogate(losses + 100.0, shifted).backward()
    torch.testing.assert_close(shifted.grad, log_probs.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_samples", [0, 1])
def test_rloo_requires_two_samples(num_samples):
    with pytest.raises(ValueError, match="M >= 2"):
        rloo_surrogate(torch.ones(3, num_samples), torch.zeros(3, num_samples))


def test_rloo_lora_side_gets_mean_sft_gradient():
    """Losses' own graph (LoRA weights) gets the SFT gradient averaged over M and the batch."""
    gen = torch.Generator().manual_seed(5)
    batch, num_samples, dim = 2, 4, 6
    w = torch.randn(dim, generator=gen).requires_grad_(True)
    router = torch.randn(dim, generator=gen).requires_grad_(True)
    feats = torch.randn(batch, num_samples, dim, generator=gen)
    targets = torch.randn(batch, num_samples, generator=gen)

    losses = ((feats @ w) - targets) ** 2  # [B, M], each a differentiable function of w
    log_probs = torch.tanh(feats @ router) - 2.0  # non-zero, so a non-detached advantage shows
    value = rloo_surrogate(losses, log_probs)
    grad_w, grad_router = torch.autograd.grad(value, (w, router), retain_graph=True)

    expected_w = torch.zeros(dim)
    for b in range(batch):
        for m in range(num_samples):
            (g,) = torch.autograd.grad(losses[b, m], w, retain_graph=True)
            expected_w += g / (batch * num_samples)
    torch.testing.assert_close(grad_w, expected_w, atol=1e-5, rtol=1e-5)

    adv = (losses - losses.mean(-1, keepdim=True)).detach() / (num_samples - 1)
    (expected_router,) = torch.autograd.grad((adv * log_probs).sum() / batch, router)
    torch.testing.assert_close(grad_router, expected_router, atol=1e-5, rtol=1e-5)

    # The value is the mean loss plus the (zero-mean-weighted) log-prob term.
    expected_value = losses.mean() + (adv * log_probs).sum() / batch
    torch.testing.assert_close(value, expected_value)
