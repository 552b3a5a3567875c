"""The Triton kernels (remix_infer/ops/triton_route.py, triton_grouped.py) called directly: the
split reduction with given products, tickets that a dead launch left behind, and the kernels'
configurations (each against the default). In Triton's interpreter where there is no GPU
(conftest.py), on CUDA tensors where there is one; small shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.tolerances import float32_products_atol, routing_stats_rtol

from remix_infer.ops import triton_route
from remix_infer.ops.slots import TokenSlots
from remix_infer.ops.triton_grouped import shrink_route
from remix_infer.ops.triton_route import CONFIGURATIONS, route, semaphore_size

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOKENS, D_IN, PARTS = 20, 200, 2  # d_in 200: four blocks of 64 (float32), so up to 4 splits
N, R, K, OMEGA = 6, 4, 2, 0.7


def tensors(seed: int = 0, slots: int = 1, parts: int = PARTS) -> dict[str, torch.Tensor]:
    """x and one pool's tensors (every slot's, slot-major), float32."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    return {
        "x": randn(TOKENS, D_IN),
        "lora_a": randn(slots * parts * N * R, D_IN, scale=D_IN**-0.5),
        "router": randn(slots * parts * N, D_IN, scale=D_IN**-0.5),
        "bias": randn(slots * parts, N),
    }


def run_route(
    t: dict,
    split: int,
    given: bool,
    semaphore: torch.Tensor | None = None,
    softmax: bool = True,
    **kw,
):
    """One launch of the dense routing kernel (one slot; t's parts): ([x | gated h], stats,
    selections)."""
    x, parts = t["x"], t["bias"].shape[0]
    out = x.new_zeros(TOKENS, D_IN + parts * N * R)
    stats = torch.zeros(parts, N + 3, dtype=torch.float64, device=DEVICE)
    selected = torch.zeros(TOKENS, parts, N, dtype=torch.uint8, device=DEVICE)
    if semaphore is None:
        semaphore = torch.zeros(semaphore_size(TOKENS, parts), dtype=torch.int32, device=DEVICE)
    lora_h = F.linear(x, t["lora_a"]) if given else None
    logits = F.linear(x, t["router"]) if given else None
    route(
        x, t["lora_a"], t["router"], t["bias"], out, stats, selected, semaphore, lora_h, logits,
        N, R, K, OMEGA, softmax, split=split, **kw,
    )  # fmt: skip
    return out, stats, selected


def assert_equal_results(got: tuple, want: tuple) -> None:
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("split", [2, 3, 4])
def test_given_products_are_counted_once_whatever_the_split(split):
    """Products given (a row-parallel group's sums): split programs copy their columns of x and
    add nothing to the products, so any split equals one program bit for bit (a split that
    loaded them all summed them `split` times)."""
    t = tensors()
    assert_equal_results(run_route(t, split, given=True), run_route(t, 1, given=True))


def test_tickets_left_by_a_dead_launch_do_not_matter():
    """A launch that died midway leaves its tickets counted; two streams share one pool's
    buffer. Each launch takes its own zeroed tickets, so a caller's semaphore full of stale
    counts changes nothing and is left as it was."""
    t = tensors(1)
    clean = run_route(t, 3, given=False)
    stale = torch.full((semaphore_size(TOKENS, PARTS),), 2, dtype=torch.int32, device=DEVICE)
    assert_equal_results(run_route(t, 3, given=False, semaphore=stale), clean)
    assert bool((stale == 2).all())


def test_grouped_tickets_left_by_a_dead_launch_do_not_matter():
    slots = 3
    t = tensors(2, slots)
    groups = TokenSlots(64, num_slots=slots, device=DEVICE)
    groups.fill(torch.arange(TOKENS, device=DEVICE) % (slots + 1) - 1)  # base model and each slot

    def launch(semaphore: torch.Tensor) -> list[torch.Tensor]:
        hidden = t["x"].new_empty(TOKENS, PARTS * N * R)
        stats = torch.zeros(slots * PARTS, N + 3, dtype=torch.float64, device=DEVICE)
        selected = torch.zeros(TOKENS, PARTS, N, dtype=torch.uint8, device=DEVICE)
        shrink_route(
            t["x"], groups.order, groups.counts, t["lora_a"], t["router"], t["bias"], None,
            hidden, None, stats, selected, semaphore, N, R, K, OMEGA, True, split=3,
        )  # fmt: skip
        return [hidden, stats, selected]

    size = slots * semaphore_size(TOKENS, PARTS)
    clean = launch(torch.zeros(size, dtype=torch.int32, device=DEVICE))
    stale = torch.full((size,), 1, dtype=torch.int32, device=DEVICE)
    assert_equal_results(launch(stale), clean)
    assert bool((stale == 1).all())


@pytest.mark.parametrize(
    "config",
    [*CONFIGURATIONS.values(), {"block_d": 16, "max_split": 64}],
    ids=[*CONFIGURATIONS, "block_d 16, max_split 64"],
)
def test_each_configuration_routes_as_the_default(config, monkeypatch):
    """`route`'s configurations (bench-gpu sweeps them) against the default, the split chosen
    for an H100's 264 programs (4 splits by default; 13 with blocks of 16 columns): the same
    selections and counts, and outputs within float32's reassociation bound: the d_in terms of
    each product summed in another order differ by at most d_in * eps * sum |terms|."""
    monkeypatch.setattr(triton_route, "_target_programs", lambda: 264)
    t = tensors(3)
    want = run_route(t, 0, given=False)
    got = run_route(t, 0, given=False, **config)
    assert torch.equal(got[2], want[2])  # selections
    assert torch.equal(got[1][:, : N + 1], want[1][:, : N + 1])  # counts and tokens
    bound = float32_products_atol(t["x"], t["lora_a"], OMEGA)
    assert bool(((got[0] - want[0])[:, D_IN:].abs() <= bound).all())
    assert torch.equal(got[0][:, :D_IN], t["x"])


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("split", [1, 3])
def test_x_once_routes_every_part_as_one_program_per_part_does(parts, split):
    """x_once: one program per token block takes every part (3 padded to 4: a part of masked
    rows), reading each x tile once. Against one program per part at the same split, base-model
    tokens (slot -1) among them: given products bit for bit (a part's columns taken out of the
    side-by-side layout exactly); computed products with the same selections and counts, and
    products and entropy within float32's reassociation bounds (helpers/tolerances.py: a wider
    tile may sum d_in in another order); constant gates (omega on both sides: no error of their
    own)."""
    t = tensors(4, parts=parts)
    kw = {"slots": (torch.arange(TOKENS) % 4 - 1).to(DEVICE), "softmax": False}
    given = [run_route(t, split, True, x_once=x_once, **kw) for x_once in (False, True)]
    assert_equal_results(given[1], given[0])
    want, got = (run_route(t, split, False, x_once=x_once, **kw) for x_once in (False, True))
    assert torch.equal(got[2], want[2])  # selections
    assert torch.equal(got[1][:, : N + 1], want[1][:, : N + 1])  # counts and tokens
    torch.testing.assert_close(got[1], want[1], rtol=routing_stats_rtol(D_IN, TOKENS), atol=0)
    bound = float32_products_atol(t["x"], t["lora_a"], OMEGA)
    assert bool(((got[0] - want[0])[:, D_IN:].abs() <= bound).all())
    assert torch.equal(got[0][:, :D_IN], t["x"])


def test_a_configuration_is_checked():
    t = tensors()
    with pytest.raises(ValueError, match="block_d 48"):
        run_route(t, 0, given=False, block_d=48)
    with pytest.raises(ValueError, match="router_precision"):
        run_route(t, 0, given=False, router_precision="tf32")
