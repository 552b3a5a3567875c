"""Routing primitives (remix_infer.routing) and the routing behaviour of RemixLinear."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from remix_infer.config import RemixConfig
from remix_infer.modeling import RemixLinear
from remix_infer.routing import (
    dense_gates,
    effective_loras,
    effective_support_size,
    gumbel_topk_sample,
    plackett_luce_log_prob,
    selection_weights,
    topk_select,
)

# ---------------------------------------------------------------------------------------------
# helpers


def chi2_critical(df: int, z: float = 4.75) -> float:
    """Upper chi-square quantile by Wilson-Hilferty; z = 4.75 is a one-sided p of about 1e-6."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def ordered_draws(n: int, k: int) -> torch.Tensor:
    """Every ordered draw of k distinct indices from n, as a [n!/(n-k)!, k] tensor."""
    return torch.tensor(list(itertools.permutations(range(n), k)), dtype=torch.long)


def draw_codes(draws: torch.Tensor, n: int) -> torch.Tensor:
    """Encode ordered draws [..., k] as integers base n (unique per ordered draw)."""
    k = draws.shape[-1]
    powers = n ** torch.arange(k - 1, -1, -1)
    return (draws * powers).sum(-1)


def naive_pl_log_prob(logits: torch.Tensor, draw: list[int]) -> torch.Tensor:
    """The formula of the design doc, written out: sum_j log(q_ij / (1 - sum_{l<j} q_il))."""
    q = torch.softmax(logits, dim=-1)
    total = logits.new_zeros(())
    used = logits.new_zeros(())
    for i in draw:
        total = total + torch.log(q[i] / (1.0 - used))
        used = used + q[i]
    return total


def brute_topk(row: list[float], k: int) -> list[int]:
    """Largest first, ties to the lower index."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]


def make_layer(
    *,
    n: int = 6,
    k: int = 2,
    r: int = 3,
    d_in: int = 16,
    d_out: int = 12,
    weighting: str = "constant",
    omega: float = 0.7,
    seed: int = 0,
) -> RemixLinear:
    torch.manual_seed(seed)
    config = RemixConfig(
        base_model="unused",
        architecture="llama",
        num_layers=1,
        target_modules=["q_proj"],
        num_loras=n,
        top_k=k,
        rank=r,
        omega=omega,
        weighting=weighting,
    )
    layer = RemixLinear(nn.Linear(d_in, d_out), config)
    with torch.no_grad():
        # Non-zero B (init is zero) and a router with well separated logits.
        layer.lora_b.normal_(0.0, 0.5)
        layer.router.weight.normal_(0.0, 1.0)
    return layer


def naive_layer_output(layer: RemixLinear, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """y = base(x) + sum_{i in S} g_i B_i A_i x, one token at a time, in float64."""
    W = layer.base.weight.double()
    b = layer.base.bias.double()
    P = layer.router.weight.double()
    A = layer.lora_a.double()
    B = layer.lora_b.double()
    flat_x = x.reshape(-1, x.shape[-1]).double()
    flat_sel = selected.reshape(-1, selected.shape[-1])
    out = []
    for t in range(flat_x.shape[0]):
        xt = flat_x[t]
        logits = P @ xt
        chosen = [int(i) for i in flat_sel[t]]
        if layer.weighting == "constant":
            gates = [layer.omega] * len(chosen)
        else:
            sel_logits = torch.stack([logits[i] for i in chosen])
            gates = (layer.omega * torch.softmax(sel_logits, dim=0)).tolist()
        y = W @ xt + b
        for g, i in zip(gates, chosen, strict=True):
            y = y + g * (B[i] @ (A[i] @ xt))
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# topk_select


def test_topk_select_ties_go_to_lower_index():
    logits = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],
            [0.0, 2.0, 2.0, 2.0],
            [3.0, 1.0, 3.0, 1.0],
            [-1.0, 5.0, -1.0, 5.0],
        ]
    )
    assert topk_select(logits, 2).tolist() == [[0, 1], [1, 2], [0, 2], [1, 3]]
    assert topk_select(logits, 3).tolist() == [[0, 1, 2], [1, 2, 3], [0, 2, 1], [1, 3, 0]]
    # Many equal values in a long row (beyond sizes where a naive sort happens to be stable).
    wide = torch.zeros(3, 257)
    wide[1, 200] = 1.0
    assert topk_select(wide, 4).tolist() == [[0, 1, 2, 3], [200, 0, 1, 2], [0, 1, 2, 3]]


def test_topk_select_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    for n, k in [(4, 1), (4, 2), (8, 4), (8, 8), (16, 3)]:
        # Coarse integer logits make ties frequent; random normals cover the general case.
        tied = torch.randint(0, 3, (200, n), generator=gen).float()
        normal = torch.randn(200, n, generator=gen)
        for logits in (tied, normal):
            got = topk_select(logits, k)
            assert got.shape == (200, k)
            expected = [brute_topk(row, k) for row in logits.tolist()]
            assert got.tolist() == expected


def test_topk_select_leading_dims_and_determinism():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 4, (3, 5, 8), generator=gen).float()
    first = topk_select(logits, 3)
    assert first.shape == (3, 5, 3)
    for _ in range(3):
        assert torch.equal(topk_select(logits, 3), first)
    assert torch.equal(first.reshape(15, 3), topk_select(logits.reshape(15, 8), 3))


# ---------------------------------------------------------------------------------------------
# gumbel_topk_sample and plackett_luce_log_prob


@pytest.mark.parametrize("n", [3, 4, 5])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_plackett_luce_probabilities_sum_to_one(n, k):
    logits = torch.randn(n, generator=torch.Generator().manual_seed(n * 10 + k)) * 1.5
    draws = ordered_draws(n, k)
    log_q = plackett_luce_log_prob(logits.expand(len(draws), n), draws)
    assert log_q.shape == (len(draws),)
    assert torch.all(log_q <= 0)
    torch.testing.assert_close(log_q.exp().sum(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_plackett_luce_full_permutations_sum_to_one():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    draws = ordered_draws(4, 4)
    total = plackett_luce_log_prob(logits.expand(len(draws), 4), draws).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [2, 3])
def test_gumbel_topk_frequencies_match_plackett_luce(k):
    n, num = 4, 200_000
    logits = torch.tensor([1.5, 0.5, 0.0, -1.0])
    gen = torch.Generator().manual_seed(100 + k)
    samples = gumbel_topk_sample(logits.expand(num, n), k, generator=gen)
    assert samples.shape == (num, k)
    assert samples.dtype == torch.long
    # Without replacement: k distinct indices in every row.
    assert torch.all(samples.sort(-1).values.diff(dim=-1) > 0)

    draws = ordered_draws(n, k)
    probs = plackett_luce_log_prob(logits.expand(len(draws), n), draws).double().exp()
    torch.testing.assert_close(
        probs.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0
    )

    counts = torch.bincount(draw_codes(samples, n), minlength=n**k).double()
    codes = draw_codes(draws, n)
    observed = counts[codes]
    assert observed.sum() == num  # no sample outside the ordered draws of distinct indices
    expected = num * probs
    # Per ordered draw: binomial count within 5 standard deviations.
    sd = torch.sqrt(num * probs * (1 - probs))
    assert torch.all((observed - expected).abs() < 5 * sd), (observed, expected)
    # Jointly: Pearson chi-square below the p ~ 1e-6 critical value.
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert stat < chi2_critical(len(draws) - 1), stat

    # The same bound rejects a subtly wrong sampler (sampling from softmax(logits / 1.25)),
    # so the check has the power to catch a wrong noise scale or a wrong distribution.
    wrong = gumbel_topk_sample(logits.expand(num, n) / 1.25, k, generator=gen)
    wrong_obs = torch.bincount(draw_codes(wrong, n), minlength=n**k).double()[codes]
    wrong_stat = float(((wrong_obs - expected) ** 2 / expected).sum())
    assert wrong_stat > chi2_critical(len(draws) - 1), wrong_stat


def test_gumbel_topk_seeded_and_ignores_grad():
    logits = torch.randn(64, 6, requires_grad=True)
    a = gumbel_topk_sample(logits, 3, generator=torch.Generator().manual_seed(7))
    b = gumbel_topk_sample(logits, 3, generator=torch.Generator().manual_seed(7))
    c = gumbel_topk_sample(logits, 3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not a.requires_grad


def test_gumbel_topk_follows_dominant_logit():
    # One logit far above the others is always drawn first.
    logits = torch.tensor([0.0, 0.0, 40.0, 0.0]).expand(1000, 4)
    samples = gumbel_topk_sample(logits, 2, generator=torch.Generator().manual_seed(3))
    assert torch.all(samples[:, 0] == 2)


def test_plackett_luce_matches_naive_formula():
    gen = torch.Generator().manual_seed(11)
    n, k = 6, 3
    logits = torch.randn(40, n, generator=gen) * 2
    draws = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(40)])
    got = plackett_luce_log_prob(logits, draws)
    expected = torch.stack(
        [naive_pl_log_prob(logits[t].double(), draws[t].tolist()) for t in range(40)]
    )
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # Leading dims are kept.
    got_3d = plackett_luce_log_prob(logits.reshape(4, 10, n), draws.reshape(4, 10, k))
    torch.testing.assert_close(got_3d, got.reshape(4, 10))


def test_plackett_luce_order_matters():
    logits = torch.tensor([2.0, 0.0, -1.0])
    a = plackett_luce_log_prob(logits, torch.tensor([0, 1]))
    b = plackett_luce_log_prob(logits, torch.tensor([1, 0]))
    q = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(
        a.double(), torch.log(q[0] * q[1] / (1 - q[0])), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        b.double(), torch.log(q[1] * q[0] / (1 - q[1])), rtol=1e-5, atol=1e-6
    )
    assert a > b


def test_plackett_luce_gradient():
    gen = torch.Generator().manual_seed(12)
    n = 5
    for draw in ([3], [1, 4], [0, 2, 4], [4, 3, 2, 1, 0]):
        base = torch.randn(n, generator=gen, dtype=torch.float64)
        logits = base.float().clone().requires_grad_(True)
        plackett_luce_log_prob(logits, torch.tensor(draw)).backward()
        got = logits.grad.double()

        ref_logits = base.clone().requires_grad_(True)
        naive_pl_log_prob(ref_logits, draw).backward()
        torch.testing.assert_close(got, ref_logits.grad, atol=1e-5, rtol=1e-5)

        # Central finite differences of the naive formula (float64).
        eps = 1e-6
        fd = torch.zeros(n, dtype=torch.float64)
        for i in range(n):
            step = torch.zeros(n, dtype=torch.float64)
            step[i] = eps
            fd[i] = (
                naive_pl_log_prob(base + step, draw) - naive_pl_log_prob(base - step, draw)
            ) / (2 * eps)
        torch.testing.assert_close(got, fd, atol=1e-4, rtol=1e-4)
        # Softmax logits are shift invariant, so the gradient sums to zero.
        assert abs(float(got.sum())) < 1e-5


# ---------------------------------------------------------------------------------------------
# selection weights, effective support size, usage


def test_effective_support_size_basic():
    for k in (1, 2, 4, 7):
        torch.testing.assert_close(
            effective_support_size(torch.full((k,), 0.3)), torch.tensor(k * 1.0)
        )
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(effective_support_size(one_hot), torch.tensor([1.0, 1.0]))
    # Between 1 and the number of non-zeros, scale invariant.
    w = torch.tensor([0.7, 0.2, 0.1])
    ess = effective_support_size(w)
    assert 1.0 < ess < 3.0
    torch.testing.assert_close(effective_support_size(10 * w), ess)
    torch.testing.assert_close(ess, torch.tensor(1.0 / (0.49 + 0.04 + 0.01)))


def test_selection_weights_and_ess():
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(50, 8, generator=gen) * 3
    selected = topk_select(logits, 4)
    const = selection_weights(logits, selected, 0.25, "constant")
    assert torch.all(const == 0.25)
    torch.testing.assert_close(effective_support_size(const), torch.full((50,), 4.0))

    soft = selection_weights(logits, selected, 0.25, "softmax_topk")
    torch.testing.assert_close(soft.sum(-1), torch.full((50,), 0.25))
    expected = 0.25 * torch.softmax(logits.gather(-1, selected), dim=-1)
    torch.testing.assert_close(soft, expected)
    ess = effective_support_size(soft)
    assert torch.all(ess <= 4.0 + 1e-5) and torch.all(ess >= 1.0 - 1e-5)
    assert torch.any(ess < 3.5)  # with spread logits the learned weights concentrate

    gates = dense_gates(selected, soft, 8)
    assert gates.shape == (50, 8)
    assert torch.all((gates != 0).sum(-1) == 4)
    torch.testing.assert_close(gates.gather(-1, selected), soft)


def test_effective_loras():
    for n in (1, 4, 8):
        torch.testing.assert_close(effective_loras(torch.full((n,), 17.0)), torch.tensor(n * 1.0))
    one_hot = torch.tensor([0.0, 0.0, 123.0, 0.0])
    torch.testing.assert_close(effective_loras(one_hot), torch.tensor(1.0))
    # Two equally used out of four: 2; batched rows kept separate.
    rows = torch.tensor([[5.0, 5.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(effective_loras(rows), torch.tensor([2.0, 4.0]))
    skewed = effective_loras(torch.tensor([10.0, 1.0, 1.0, 1.0]))
    assert 1.0 < skewed < 4.0


# ---------------------------------------------------------------------------------------------
# RemixLinear routing


def test_remix_linear_eval_weights_have_ess_k():
    layer = make_layer(n=8, k=3).eval()
    x = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        layer(x)
    routing = layer.last_routing
    assert routing.selected.shape == (4, 9, 3)
    assert routing.log_prob is None
    torch.testing.assert_close(effective_support_size(routing.weights), torch.full((4, 9), 3.0))
    assert torch.all(routing.weights == layer.omega)

    soft = make_layer(n=8, k=3, weighting="softmax_topk").eval()
    with torch.no_grad():
        soft(x)
    ess = effective_support_size(soft.last_routing.weights)
    assert torch.all(ess <= 3.0 + 1e-5)
    assert torch.any(ess < 2.9)


def test_remix_linear_eval_selects_topk_of_router_logits():
    layer = make_layer(n=8, k=3).eval()
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        layer(x)
        logits = x @ layer.router.weight.T
    torch.testing.assert_close(layer.last_routing.logits, logits)
    expected = [brute_topk(row, 3) for row in logits.tolist()]
    assert layer.last_routing.selected.tolist() == expected


def test_remix_linear_eval_is_batch_invariant_and_deterministic():
    layer = make_layer(n=8, k=2).eval()
    gen = torch.Generator().manual_seed(22)
    row = torch.randn(1, 16, generator=gen)
    with torch.no_grad():
        y_alone = layer(row)
        sel_alone = layer.last_routing.selected.clone()
        for size, pos in [(7, 0), (33, 17), (128, 127)]:
            batch = torch.randn(size, 16, generator=gen)
            batch[pos] = row[0]
            y_batch = layer(batch)
            assert torch.equal(layer.last_routing.selected[pos : pos + 1], sel_alone)
            torch.testing.assert_close(y_batch[pos : pos + 1], y_alone, atol=1e-5, rtol=1e-5)
        # Same input, same output, call after call.
        batch = torch.randn(3, 5, 16, generator=gen)
        first = layer(batch)
        first_sel = layer.last_routing.selected.clone()
        for _ in range(3):
            assert torch.equal(layer(batch), first)
            assert torch.equal(layer.last_routing.selected, first_sel)


@pytest.mark.parametrize("weighting", ["constant", "softmax_topk"])
def test_remix_linear_matches_naive_loop(weighting):
    layer = make_layer(n=6, k=3, weighting=weighting).eval()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        y = layer(x)
    expected_sel = torch.tensor(
        [
            brute_topk(row, 3)
            for row in (x.reshape(-1, 16).double() @ layer.router.weight.double().T).tolist()
        ]
    ).reshape(2, 7, 3)
    assert torch.equal(layer.last_routing.selected, expected_sel)
    expected = naive_layer_output(layer, x, expected_sel)
    assert y.shape == (2, 7, 12)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    # The adapters actually contribute (B is non-zero), so the check is not vacuous.
    assert (y - layer.base(x)).abs().max() > 1e-2


def test_remix_linear_train_constant_samples():
    torch.manual_seed(24)
    layer = make_layer(n=8, k=3).train()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(24))
    y1 = layer(x)
    r1 = layer.last_routing
    y2 = layer(x)
    r2 = layer.last_routing
    assert not torch.equal(r1.selected, r2.selected)  # sampled, not the fixed top-k
    assert not torch.equal(r1.selected, topk_select(r1.logits, 3))
    for r in (r1, r2):
        assert r.log_prob is not None and r.log_prob.shape == (64,)
        assert torch.all(r.selected.sort(-1).values.diff(dim=-1) > 0)
        torch.testing.assert_close(r.log_prob, plackett_luce_log_prob(r.logits, r.selected))
        assert torch.all(r.weights == layer.omega)
    # The output uses the sampled selection.
    torch.testing.assert_close(
        y1.detach().double(), naive_layer_output(layer, x, r1.selected), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        y2.detach().double(), naive_layer_output(layer, x, r2.selected), atol=1e-5, rtol=1e-5
    )
    # The router learns only through log Q: no gradient through y, and log Q reaches it.
    y1.sum().backward()
    assert layer.router.weight.grad is None or torch.all(layer.router.weight.grad == 0)
    assert layer.lora_a.grad is not None and layer.lora_b.grad is not None
    r2.log_prob.sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_remix_linear_router_input_detached_in_constant_mode():
    layer = make_layer(n=8, k=3).train()
    x = torch.randn(10, 16, requires_grad=True)
    layer(x)
    layer.last_routing.log_prob.sum().backward()
    assert x.grad is None


def test_remix_linear_train_softmax_topk_is_deterministic():
    layer = make_layer(n=8, k=3, weighting="softmax_topk").train()
    assert layer.sample_in_training is False
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(25))
    y1 = layer(x)
    r1 = layer.last_routing
    y2 = layer(x)
    r2 = layer.last_routing
    assert r1.log_prob is None and r2.log_prob is None
    assert torch.equal(r1.selected, r2.selected)
    assert torch.equal(r1.selected, topk_select(r1.logits, 3))
    torch.testing.assert_close(y1, y2)
    # Learned gates: the router gets its gradient through y.
    y1.sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# MoR-LoRA's straight-through estimator and LoRA-Mixer's RSL loss, against hand computation


def test_straight_through_forward_is_hard_and_gradient_is_the_softmax_one():
    """n = 3 LoRAs of rank 1 on a 2 -> 1 linear, hard top-1 at unit scale, loss = y. By hand:
    c_i = B_i (A_i . x) is LoRA i's output; the forward adds c of the argmax only; the router
    logit gradient is dL/dl_j = p_j (c_j - sum_i p_i c_i) and dL/dP_j = dL/dl_j * x."""
    config = RemixConfig(
        base_model="test", architecture="llama", num_layers=1, target_modules=["q_proj"],
        num_loras=3, top_k=1, rank=1, omega=1.0,
    )  # fmt: skip
    layer = RemixLinear(nn.Linear(2, 1, bias=False), config).train()
    layer.sample_in_training, layer.straight_through = False, True
    with torch.no_grad():
        layer.base.weight.fill_(0.25)
        layer.lora_a.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]))
        layer.lora_b.copy_(torch.tensor([[[2.0]], [[-1.0]], [[0.5]]]))
        layer.router.weight.copy_(torch.tensor([[0.1, 0.2], [0.3, -0.1], [0.0, 0.0]]))
    x = [1.0, 2.0]
    y = layer(torch.tensor([x]))
    logits = [0.1 * 1 + 0.2 * 2, 0.3 * 1 - 0.1 * 2, 0.0]  # 0.5, 0.1, 0: LoRA 0 is chosen
    c = [2.0 * 1, -1.0 * 2, 0.5 * 3]
    assert y.item() == pytest.approx(0.25 * 3 + c[0], abs=1e-6)  # hard: c_0 at weight 1
    y.sum().backward()
    z = sum(math.exp(v) for v in logits)
    p = [math.exp(v) / z for v in logits]
    mean_c = sum(pi * ci for pi, ci in zip(p, c, strict=True))
    expected = [[p[j] * (c[j] - mean_c) * xi for xi in x] for j in range(3)]
    torch.testing.assert_close(layer.router.weight.grad, torch.tensor(expected), atol=1e-6, rtol=0)
    assert layer.lora_a.grad is not None  # the LoRAs see the hard forward's gradient too


def test_rsl_loss_matches_hand_computation():
    """Two tokens, n = 3, k = 1: L = alpha * sum_i pbar_i fbar_i - lambda * mean_t H(p_t)."""
    from remix_infer.train.losses import rsl_loss
    from remix_infer.train.trainer import TrainConfig

    e = math.e
    p1 = [e**2 / (e**2 + 2), 1 / (e**2 + 2), 1 / (e**2 + 2)]  # softmax of [2, 0, 0]
    p2 = [1 / (e + 2), e / (e + 2), 1 / (e + 2)]  # softmax of [0, 1, 0]
    pbar = [(a + b) / 2 for a, b in zip(p1, p2, strict=True)]
    fbar = [0.5, 0.5, 0.0]  # token 1 chose LoRA 0, token 2 LoRA 1
    entropy_mean = (-sum(q * math.log(q) for q in p1) - sum(q * math.log(q) for q in p2)) / 2
    config = TrainConfig()
    alpha, lam = config.rsl_alpha, config.rsl_lambda
    assert (alpha, lam) == (0.1, 0.5)  # the paper's values (LoRA-Mixer, appendix)
    expected = alpha * sum(a * b for a, b in zip(pbar, fbar, strict=True)) - lam * entropy_mean
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    got = rsl_loss(logits, torch.tensor([[0], [1]]), alpha, lam)
    assert got.item() == pytest.approx(expected, abs=1e-6)
