"""remix_infer.ops, the serving layer's math, against the reference model (remix_infer.modeling).

Every kernel runs here: "torch" (plain torch ops, the oracle) and "numba" (its CPU routing
kernel) natively, "triton" under the Triton interpreter where there is no GPU (conftest.py sets
TRITON_INTERPRET), at small shapes. The same checks run on a GPU in `make bench-gpu` before it times anything.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.tolerances import float32_sum_rtol, routing_stats_rtol
from torch import nn

from remix_infer.config import RemixConfig
from remix_infer.modeling import RemixLinear, SharedRouting
from remix_infer.ops import (
    FusedRemixLinear,
    PoolLayout,
    RemixPool,
    SharedRouter,
    StatsRow,
    set_padding_provider,
)
from remix_infer.ops.slots import TokenSlots, pick_slot, slot_groups
from remix_infer.ops.stats import stats_width
from remix_infer.ops.triton_grouped import shrink, shrink_route
from remix_infer.ops.triton_route import route, semaphore_size
from remix_infer.routing import topk_select

KERNELS = ["torch", "numba", "triton"]
D_IN = 48
N, K, R = 6, 2, 4
MERGED = {  # parts of a merged projection (like qkv_proj) and which carry a pool
    "one part": ((40,), (0,)),
    "two parts": ((32, 24), (0, 1)),
    "three parts": ((32, 16, 16), (0, 1, 2)),
    "middle part not adapted": ((32, 16, 16), (0, 2)),
}


def config(weighting: str = "constant", router_bias: bool = True, always: int = 0) -> RemixConfig:
    return RemixConfig(
        base_model="test", architecture="llama", num_layers=1, target_modules=["q_proj"],
        num_loras=N, top_k=K, rank=R, omega=0.7, weighting=weighting, router_bias=router_bias,
        always_on_rank=always,
    )  # fmt: skip


def build(
    kernel, parts, adapted, weighting="constant", dtype=torch.float32, seed=0, always=0, **pool_kw
):
    """A FusedRemixLinear of random weights and, per adapted part, the reference RemixLinear
    holding the same tensors (over the same base rows); `always`: rank of an always-on LoRA."""
    gen = torch.Generator().manual_seed(seed)
    cfg = config(weighting, always=always)
    weight = torch.randn(sum(parts), D_IN, generator=gen) * D_IN**-0.5
    layout = PoolLayout.from_config(cfg, D_IN, list(parts), list(adapted))
    pool = RemixPool(layout, dtype, 256, router_bias=True, kernel=kernel, device="cpu", **pool_kw)
    references = load_references(pool, cfg, weight, parts, adapted, gen)
    return FusedRemixLinear(weight.to(dtype), pool), references, weight


def load_references(pool, cfg, weight, parts, adapted, gen, slot=0):
    """Random reference RemixLinears (config cfg) over the base rows of each adapted part,
    loaded into the pool's `slot`; {part: reference}."""
    references = {}
    starts = [sum(parts[:i]) for i in range(len(parts))]
    for part in adapted:
        base = nn.Linear(D_IN, parts[part], bias=False)
        base.weight.data = weight[starts[part] : starts[part] + parts[part]].clone()
        ref = RemixLinear(base, cfg).eval()
        with torch.no_grad():
            ref.lora_a.normal_(0, D_IN**-0.5, generator=gen)
            ref.lora_b.normal_(0, 0.3, generator=gen)
            ref.router.weight.normal_(0, 1.0, generator=gen)
            ref.router.bias.normal_(0, 0.5, generator=gen)
            if cfg.always_on_rank:
                ref.always_a.normal_(0, D_IN**-0.5, generator=gen)
                ref.always_b.normal_(0, 0.3, generator=gen)
        pool.load_part(
            part, ref.lora_a, ref.lora_b, ref.router.weight, ref.router.bias, ref.always_a,
            ref.always_b, slot=slot,
        )  # fmt: skip
        references[part] = ref
    return references


def reference_outputs(references, weight, parts, x):
    """The reference model's output of the whole projection, and its top-k per adapted part."""
    out = F.linear(x, weight).clone()
    starts = [sum(parts[:i]) for i in range(len(parts))]
    selected = []
    for part, ref in references.items():
        out[:, starts[part] : starts[part] + parts[part]] = ref(x)
        selected.append(ref.last_routing.selected)
    return out, torch.stack(selected, 1)  # [T, d_out], [T, S, k]


def as_mask(selected: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*selected.shape[:-1], N, dtype=torch.uint8).scatter_(-1, selected, 1)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("weighting", ["constant", "softmax_topk"])
@pytest.mark.parametrize("merged", list(MERGED))
def test_pool_matches_reference(kernel, weighting, merged):
    parts, adapted = MERGED[merged]
    layer, references, weight = build(kernel, parts, adapted, weighting)
    layer.pool.capture_selections = True
    x = torch.randn(37, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(x)
        want, selected = reference_outputs(references, weight, parts, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.pool.step_selected[:37], as_mask(selected))
    if kernel != "triton":  # the ordered top-k, largest first
        assert torch.equal(layer.pool.captured[0], selected)
    stats = layer.pool.stats
    for j, ref in enumerate(references.values()):
        row = StatsRow.parse(stats[j].tolist())
        assert row.selections == torch.bincount(selected[:, j].flatten(), minlength=N).tolist()
        assert row.tokens == 37
        probs = torch.softmax(ref.last_routing.logits, -1)
        assert row.entropy_sum == pytest.approx(torch.special.entr(probs).sum().item(), rel=1e-5)
        weights = ref.last_routing.weights
        ess = (weights.sum(-1) ** 2 / (weights**2).sum(-1)).sum().item()
        assert row.ess_sum == pytest.approx(ess, rel=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("merged", ["one part", "middle part not adapted"])
def test_always_on_lora_matches_reference(kernel, merged):
    """An always-on LoRA beside the pool (weight 1, every token): the reference's output and
    routing, and a term that matters (dropping it changes the output)."""
    parts, adapted = MERGED[merged]
    layer, references, weight = build(kernel, parts, adapted, always=3)
    x = torch.randn(29, D_IN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = layer(x)
        want, selected = reference_outputs(references, weight, parts, x)
        for ref in references.values():
            ref.always_b.zero_()
        without, _ = reference_outputs(references, weight, parts, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - without).abs().max() > 0.1
    assert torch.equal(layer.pool.step_selected[:29], as_mask(selected))


@pytest.mark.parametrize("weighting", ["constant", "softmax_topk"])
@pytest.mark.parametrize("kernel", ["numba", "triton"])
def test_kernel_equals_torch_kernel(kernel, weighting):
    """Same weights through a kernel and the plain-torch path: same selections, statistics and
    outputs."""
    parts, adapted = MERGED["three parts"]
    layers = [build(name, parts, adapted, weighting)[0] for name in ("torch", kernel)]
    x = torch.randn(70, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outs = [layer(x) for layer in layers]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        layers[1].pool.stats, layers[0].pool.stats, rtol=routing_stats_rtol(D_IN, 70), atol=1e-9
    )
    assert torch.equal(layers[1].pool.step_selected, layers[0].pool.step_selected)


def test_split_reduction_is_deterministic_and_resets_its_tickets():
    """Splitting d_in across programs gives bit-identical results to one program."""
    parts, adapted = MERGED["two parts"]
    pool = build("triton", parts, adapted)[0].pool
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(3))
    results = []
    for split in (1, 3, 1):
        pool.stats.zero_()
        out = x.new_empty(40, D_IN + pool.layout.pool_width)
        route(
            x, pool.lora_a, pool.router, pool.router_bias, out, pool.stats, pool.step_selected,
            pool.path.semaphore, None, None, N, R, K, 0.7, False, split=split,
        )  # fmt: skip
        results.append((out, pool.stats.clone()))
        assert int(pool.path.semaphore.abs().sum()) == 0
    for out, stats in results[1:]:
        assert torch.equal(out, results[0][0])
        assert torch.equal(stats, results[0][1])
    assert torch.equal(results[0][0][:, :D_IN], x)  # x copied for the one GEMM


@pytest.mark.parametrize("kernel", KERNELS)
def test_padding_rows_are_not_counted(kernel):
    parts, adapted = MERGED["one part"]
    layer = build(kernel, parts, adapted)[0]
    x = torch.randn(20, D_IN, generator=torch.Generator().manual_seed(4))
    padding = torch.zeros(20, dtype=torch.bool)
    padding[13:] = True
    set_padding_provider(lambda: padding)
    try:
        with torch.no_grad():
            layer(x)
    finally:
        set_padding_provider(lambda: None)
    row = StatsRow.parse(layer.pool.stats[0].tolist())
    assert row.tokens == 13
    assert sum(row.selections) == 13 * K
    assert row.ess_sum == pytest.approx(13 * K)
    unpadded = build(kernel, parts, adapted)[0]
    with torch.no_grad():
        unpadded(x[:13])
    torch.testing.assert_close(
        layer.pool.stats, unpadded.pool.stats, rtol=routing_stats_rtol(D_IN, 20), atol=1e-9
    )


@pytest.mark.parametrize("kernel", KERNELS)
def test_ties_go_to_the_lower_index(kernel):
    """Equal logits (zero routers, equal biases, as in a router that was never trained): the
    lower-indexed LoRAs win."""
    parts, adapted = MERGED["one part"]
    layer = build(kernel, parts, adapted)[0]
    with torch.no_grad():
        layer.pool.router.zero_()
        layer.pool.router_bias.fill_(0.25)
        layer.refold(torch.zeros(40, D_IN))
        layer(torch.randn(5, D_IN))
    assert layer.pool.step_selected[:5, 0].tolist() == [[1] * K + [0] * (N - K)] * 5


@pytest.mark.parametrize("always", [0, 2])
@pytest.mark.parametrize("kernel", KERNELS)
def test_row_parallel_shards_sum_to_the_whole(kernel, always):
    """Two ranks of a row-parallel layer: each sees half of d_in, sums its partial pool products
    with the other's (the all-reduce), and only rank 0 adds B's term; the sum of their outputs
    (vLLM's all-reduce) is the unsharded layer's output, with the same routing on both."""
    parts, adapted = MERGED["one part"]
    whole, _, weight = build(kernel, parts, adapted, always=always)
    x = torch.randn(24, D_IN, generator=torch.Generator().manual_seed(5))
    half = D_IN // 2
    shards = []
    for rank, cols in enumerate((slice(0, half), slice(half, D_IN))):
        layout = PoolLayout.from_config(config(always=always), half, list(parts), list(adapted))
        pool = RemixPool(layout, torch.float32, 64, True, kernel, count_b=rank == 0, device="cpu")
        src = whole.pool
        pool.load_part(
            0,
            src.lora_a.view(N, R, D_IN)[:, :, cols],
            src.lora_b[0].view(-1, N, R).permute(1, 0, 2),
            src.router[:, cols],
            src.router_bias[0],
            src.always_a[:, cols] if always else None,
            src.always_b[0] if always else None,
        )
        shards.append((FusedRemixLinear(weight[:, cols], pool), x[:, cols]))

    def partial_products(layer, xs):  # what the other rank contributes to the all-reduce
        pool = layer.pool
        always = [F.linear(xs, pool.always_a).float()] if pool.always_a is not None else []
        return [F.linear(xs, pool.lora_a).float(), F.linear(xs.float(), pool.router)] + always

    outs = []
    with torch.no_grad():
        for rank, (layer, xs) in enumerate(shards):
            other = partial_products(*shards[1 - rank])
            folded = layer.folded
            outs.append(layer.pool(xs, lambda z, w=folded: F.linear(z, w), None, _adder(other)))
        torch.testing.assert_close(outs[0] + outs[1], whole(x), atol=1e-5, rtol=1e-5)
    for layer, _ in shards:
        assert torch.equal(layer.pool.step_selected[:24], whole.pool.step_selected[:24])


def _adder(others: list[torch.Tensor]):
    """A stand-in all-reduce: adds the other rank's partials, in the order the pool asks."""
    queue = list(others)

    def reduce(t: torch.Tensor) -> torch.Tensor:
        other = queue.pop(0)
        return t + other.to(t.dtype).reshape(t.shape)

    return reduce


def test_bf16_chooses_what_float32_chooses():
    """Router logits are float32 on every path: a bf16 layer's top-k equals the float32
    reference's (these random logits have no near-ties at float32 resolution)."""
    parts, adapted = MERGED["three parts"]
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(6)).bfloat16()
    masks = []
    for kernel, dtype in (("torch", torch.float32), ("torch", torch.bfloat16), ("triton", torch.bfloat16)):  # fmt: skip
        layer = build(kernel, parts, adapted, dtype=dtype)[0]
        with torch.no_grad():
            layer(x.to(dtype))
        masks.append(layer.pool.step_selected[:64].clone())
    assert torch.equal(masks[1], masks[0])
    assert torch.equal(masks[2], masks[0])


def test_stats_row_names_the_columns():
    row = StatsRow.parse([3.0, 1.0, 0.0, 2.0, 3.5, 6.0])
    assert (row.selections, row.tokens, row.entropy_sum, row.ess_sum) == ([3, 1, 0], 2, 3.5, 6)
    assert stats_width(3) == 6


@pytest.mark.parametrize("grouped", [False, True])
def test_triton_kernel_survives_torch_compile(grouped):
    """The kernels are registered custom ops (the routing kernel; grouped slots: the shrink-
    route and expand kernels): a compiled layer (one graph, dynamic shapes) runs them, gives
    the eager layer's output and still updates the statistics."""
    if grouped:
        layer, _, _, slots = build_slots("triton grouped", *MERGED["two parts"], always=2)
        slots.fill(torch.tensor(SLOT_OF_TOKEN))
    else:
        layer = build("triton", *MERGED["three parts"])[0]
    x = torch.randn(len(SLOT_OF_TOKEN), D_IN, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        eager = layer(x)
        stats = layer.pool.stats.clone()
        compiled = torch.compile(layer, dynamic=True, fullgraph=True)
        # inductor may sum in another order: the tolerance of the other kernels' outputs
        torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)
        assert torch.equal(layer.pool.stats, 2 * stats)
        if grouped:  # the engine fills each step's slots before it runs
            slots.fill(torch.tensor(SLOT_OF_TOKEN[:13]))
        assert compiled(x[:13]).shape == (13, layer.pool.layout.out_features)


def test_more_tokens_than_the_pool_was_sized_for_are_refused():
    parts, adapted = MERGED["one part"]
    layer = build("triton", parts, adapted)[0]  # sized for 256 tokens per step
    with pytest.raises(ValueError, match="max_step_tokens"):
        layer(torch.randn(300, D_IN))


@pytest.mark.parametrize("kernel", KERNELS)
def test_shared_router_routes_every_pool_from_the_first_input(kernel):
    """Shared routing scope: the pool on the first layer's input (here a merged two-part one)
    runs the one router; a later pool, on another input, takes the same choice. Oracle: the
    reference model's shared scope (SharedRouting and RemixLinears that reuse its decision)."""
    gen = torch.Generator().manual_seed(8)
    cfg = config().model_copy(update={"routing_scope": "shared"})
    reference_router = SharedRouting(D_IN, cfg, torch.device("cpu"))
    router = SharedRouter(N, D_IN, 256, bias=True, device="cpu")
    layers, references = [], []
    for first, parts in ((True, (32, 24)), (False, (40,))):
        weight = torch.randn(sum(parts), D_IN, generator=gen) * D_IN**-0.5
        layout = PoolLayout.from_config(cfg, D_IN, list(parts), list(range(len(parts))))
        pool = RemixPool(layout, torch.float32, 256, kernel=kernel, device="cpu", shared=router,
                         routes_shared=first)  # fmt: skip
        refs = []
        for part, rows in enumerate(weight.split(list(parts))):
            base = nn.Linear(D_IN, parts[part], bias=False)
            base.weight.data = rows.clone()
            ref = RemixLinear(base, cfg, reference_router, routes_shared=first and part == 0).eval()
            with torch.no_grad():
                ref.lora_a.normal_(0, D_IN**-0.5, generator=gen)
                ref.lora_b.normal_(0, 0.3, generator=gen)
            pool.load_part(part, ref.lora_a, ref.lora_b, None)
            refs.append(ref)
        layers.append(FusedRemixLinear(weight, pool))
        references.append(refs)
    with torch.no_grad():  # after the RemixLinears, whose init draws the shared router
        reference_router.router.weight.normal_(0, 1.0, generator=gen)
        reference_router.router.bias.normal_(0, 0.5, generator=gen)
        router.weight.copy_(reference_router.router.weight)
        router.bias.copy_(reference_router.router.bias)
    x1, x2 = (torch.randn(21, D_IN, generator=gen) for _ in range(2))
    with torch.no_grad():
        got = [layers[0](x1), layers[1](x2)]
        want = [torch.cat([ref(x1) for ref in references[0]], -1), references[1][0](x2)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    chosen = topk_select(F.linear(x1, router.weight, router.bias), K)  # from x1, not x2
    assert torch.equal(references[1][0].last_routing.selected, chosen)
    expected = as_mask(chosen)
    assert torch.equal(layers[0].pool.step_selected[:21], torch.stack([expected] * 2, 1))
    assert torch.equal(layers[1].pool.step_selected[:21, 0], expected)


# Checkpoint slots (ops/slots.py): several checkpoints' pools in one, chosen per token.
SLOT_OF_TOKEN = [0, 2, -1, 2, 0, 0, -1, 2, 1, 0, 2, 2, -1, 0, 2, 0, 2, 0, 0, 2, 1]


# the kernels of pools of several slots: "triton grouped" is triton with grouped=True; numba's
# pools with slots are grouped, "numba, B apart" with B's products outside the routing kernel
# (what it does past NumbaGroupedPath.kernel_max_tokens tokens)
SLOT_KERNELS = [*KERNELS, "triton grouped", "numba, B apart"]


def kind(kernel: str) -> dict:
    """RemixPool's arguments for one of SLOT_KERNELS."""
    if kernel == "triton grouped":
        return {"kernel": "triton", "grouped": True}
    return {"kernel": kernel.removesuffix(", B apart")}


def build_slots(kernel, parts, adapted, always=0, slot_ranks=(R, R - 2), weighting="constant"):
    """A FusedRemixLinear of 3 slots: slot 0 and 2 hold random references (slot 2 with a lower
    rank, zero-padded), slot 1 is loaded then cleared; {slot: references}, the base weight,
    and the token slots it reads. kernel: one of SLOT_KERNELS."""
    gen = torch.Generator().manual_seed(11)
    cfg = config(weighting, always=always)
    weight = torch.randn(sum(parts), D_IN, generator=gen) * D_IN**-0.5
    layout = PoolLayout.from_config(cfg, D_IN, list(parts), list(adapted), num_slots=3)
    slots = TokenSlots(256, num_slots=3, device="cpu")
    pool = RemixPool(layout, torch.float32, 256, True, device="cpu", slots=slots, **kind(kernel))
    if kernel == "numba, B apart":
        pool.path.kernel_max_tokens = 0
    references = {}
    for slot, rank in zip((0, 1, 2), (slot_ranks[0], R, slot_ranks[1]), strict=True):
        slot_cfg = cfg.model_copy(update={"rank": rank})
        references[slot] = load_references(pool, slot_cfg, weight, parts, adapted, gen, slot)
    pool.clear_slot(1)
    del references[1]
    return FusedRemixLinear(weight, pool), references, weight, slots


def slot_reference(references, weight, parts, x, slot_of_token):
    """Per token, its slot's reference output (the base model's for -1) and top-k."""
    want = F.linear(x, weight).clone()
    selected = torch.full((x.shape[0], len(next(iter(references.values()))), K), -1)
    for slot, refs in references.items():
        rows = (slot_of_token == slot).nonzero().flatten()
        out, sel = reference_outputs(refs, weight, parts, x[rows])
        want[rows], selected[rows] = out, sel
    return want, selected


@pytest.mark.parametrize("kernel", SLOT_KERNELS)
@pytest.mark.parametrize("merged", ["one part", "middle part not adapted"])
@pytest.mark.parametrize("always", [0, 2])
def test_slots_route_each_token_through_its_own_checkpoint(kernel, merged, always):
    """Tokens of two checkpoints and of the base model in one call: each gets its own
    reference's output and top-k, the statistics land in each slot's rows (none for base-model
    tokens or the cleared slot), and a slot loaded in place afterwards is used."""
    parts, adapted = MERGED[merged]
    layer, references, weight, slots = build_slots(kernel, parts, adapted, always)
    layer.pool.capture_selections = True
    slot_of_token = torch.tensor(SLOT_OF_TOKEN)
    slots.fill(slot_of_token)
    x = torch.randn(len(SLOT_OF_TOKEN), D_IN, generator=torch.Generator().manual_seed(12))
    slot_of_token[slot_of_token == 1] = -1  # slot 1 is empty: the caller sends its tokens as base
    slots.fill(slot_of_token)
    with torch.no_grad():
        got = layer(x)
    want, selected = slot_reference(references, weight, parts, x, slot_of_token)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    mask = as_mask(selected.clamp(min=0)) * (slot_of_token >= 0)[:, None, None]
    assert torch.equal(layer.pool.step_selected[: len(x)], mask.to(torch.uint8))
    if not kernel.startswith("triton"):
        assert torch.equal(layer.pool.captured[0], selected)
    s = len(adapted)
    stats = layer.pool.stats.view(3, s, -1)
    assert stats[1].abs().sum() == 0
    for slot in (0, 2):
        mine = slot_of_token == slot
        for j in range(s):
            row = StatsRow.parse(stats[slot, j].tolist())
            assert row.tokens == int(mine.sum())
            assert (
                row.selections == torch.bincount(selected[mine, j].flatten(), minlength=N).tolist()
            )
    # load slot 1 in place and refresh the folded weight in place (the engine's compiled mode
    # relies on that: tests/test_multi_checkpoint_engine.py)
    folded = layer.folded
    with torch.no_grad():
        gen = torch.Generator().manual_seed(13)
        cfg = config(always=always)
        references[1] = load_references(layer.pool, cfg, weight, parts, adapted, gen, slot=1)
        layer.refresh()
        slot_of_token = torch.tensor(SLOT_OF_TOKEN)
        slots.fill(slot_of_token)
        got = layer(x)
    assert layer.folded is folded
    want, _ = slot_reference(references, weight, parts, x, slot_of_token)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("merged", ["two parts", "middle part not adapted"])
def test_numba_kernel_answers_a_token_alike_in_any_batch(merged):
    """The numba kernel on a step of 83 tokens over two slots and the base model (blocks of up
    to 32 tokens of one slot, 4 x 4 tiles that repeat a token or row to fill up): every token
    gets its reference's adapter output and choices, and, bit for bit, what it gets alone. The
    base product is zero while the layer runs: a GEMM's last bits depend on its batch."""
    parts, adapted = MERGED[merged]
    layer, references, weight, slots = build_slots("numba", parts, adapted, always=2)
    layer.pool.capture_selections = True
    layer.pool.path.kernel_max_tokens = 1 << 30  # the kernel at every size, whatever the threads
    gen = torch.Generator().manual_seed(21)
    slot_of_token = torch.tensor([0, 2, -1])[torch.randint(0, 3, (83,), generator=gen)]
    x = torch.randn(83, D_IN, generator=gen)
    want, selected = slot_reference(references, weight, parts, x, slot_of_token)
    want -= F.linear(x, weight)  # the adapter's part
    weight.zero_()  # the layer's own (the numba path keeps the base weight as it is)
    with torch.no_grad():
        slots.fill(slot_of_token)
        whole, chosen = layer(x), layer.pool.captured[-1].clone()
        alone = []
        for t in range(83):
            slots.fill(slot_of_token[t : t + 1])
            alone.append((layer(x[t : t + 1]), layer.pool.captured[-1].clone()))
    torch.testing.assert_close(whole, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(chosen, selected)
    assert torch.equal(whole, torch.cat([out for out, _ in alone]))
    assert torch.equal(chosen, torch.cat([sel for _, sel in alone]))


def test_slot_groups_gather_each_slots_tokens():
    """The grouped path's groups, found once per step when the slots are filled: each slot with
    tokens, its rows in order; base-model tokens and padding rows in none; a step wholly one
    slot's needs no gather (rows None)."""
    slots = TokenSlots(16, num_slots=3, device="cpu")

    def groups(step):
        slots.fill(torch.tensor(step))
        found = slot_groups(slots.order, slots.counts)
        return [(slot, rows if rows is None else rows.tolist()) for slot, rows in found]

    assert groups([2, -1, 0, 2, 2, -1, 0]) == [(0, [2, 6]), (2, [0, 3, 4])]
    assert groups([1, 1, 1]) == [(1, None)]
    assert groups([-1, -1]) == []
    assert slots.index[3:].eq(-1).all()  # the rows past the step are the base model's


@pytest.mark.parametrize("kernel", ["numba", "numba, B apart", "triton grouped"])
@pytest.mark.parametrize("step", [[2] * 9, [-1] * 9])
def test_grouped_step_of_one_slot_or_only_the_base_model(step, kernel):
    """The grouped paths (several slots) when a step is wholly one slot's or wholly the base
    model's: each token still gets its own reference's output, and only that slot's
    statistics move."""
    parts, adapted = MERGED["middle part not adapted"]
    layer, references, weight, slots = build_slots(kernel, parts, adapted)
    assert layer.pool.grouped
    slot_of_token = torch.tensor(step)
    slots.fill(slot_of_token)
    x = torch.randn(len(step), D_IN, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        got = layer(x)
    want, _ = slot_reference(references, weight, parts, x, slot_of_token)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    counted = layer.pool.stats.view(3, len(adapted), -1)[:, :, N].sum(1)  # tokens, per slot
    assert counted.tolist() == ([0, 0, 9 * len(adapted)] if step[0] == 2 else [0, 0, 0])


@pytest.mark.parametrize("kernel", ["numba", "triton grouped"])
def test_grouped_row_parallel_shards_sum_to_the_whole(kernel):
    """Several slots on the grouped path, split over two row-parallel ranks: each rank's
    partial products of each token's own slot, summed with the other's, route as the whole
    layer does, and the two outputs sum to the whole layer's (with an always-on LoRA)."""
    parts, adapted = MERGED["one part"]
    whole, _, weight, slots = build_slots(kernel, parts, adapted, always=2)
    slot_of_token = torch.tensor(SLOT_OF_TOKEN)
    slot_of_token[slot_of_token == 1] = -1
    slots.fill(slot_of_token)
    x = torch.randn(len(SLOT_OF_TOKEN), D_IN, generator=torch.Generator().manual_seed(16))
    half, src = D_IN // 2, whole.pool
    shards = []
    for rank, cols in enumerate((slice(0, half), slice(half, D_IN))):
        layout = PoolLayout.from_config(
            config(always=2), half, list(parts), list(adapted), num_slots=3
        )
        pool = RemixPool(
            layout, torch.float32, 256, True, count_b=rank == 0, device="cpu", slots=slots,
            **kind(kernel),
        )  # fmt: skip
        with torch.no_grad():
            pool.lora_a.copy_(src.lora_a[:, cols])
            pool.router.copy_(src.router[:, cols])
            pool.router_bias.copy_(src.router_bias)
            pool.lora_b[0].copy_(src.lora_b[0])
            pool.always_a.copy_(src.always_a[:, cols])
            pool.always_b[0].copy_(src.always_b[0])
        shards.append((FusedRemixLinear(weight[:, cols], pool), x[:, cols]))

    def partial_products(layer, xs):  # what the other rank contributes to the all-reduce
        own = slots.current(xs.shape[0])  # each token's own slot's, zero for the base model
        rows = (layer.pool.lora_a, layer.pool.router, layer.pool.always_a)
        products = [pick_slot(F.linear(xs, w), own, 3) * (own >= 0)[:, None] for w in rows]
        if kernel == "numba":  # one all-reduce of the narrow product's [A | A0 | P] columns
            return [torch.cat([products[0], products[2], products[1]], 1)]
        return products

    with torch.no_grad():
        outs = [
            layer.pool(xs, lambda z, w=layer.folded: F.linear(z, w), None, _adder(partial_products(*shards[1 - rank])))
            for rank, (layer, xs) in enumerate(shards)
        ]  # fmt: skip
        torch.testing.assert_close(outs[0] + outs[1], whole(x), atol=1e-5, rtol=1e-5)
    for layer, _ in shards:
        tokens = len(SLOT_OF_TOKEN)
        assert torch.equal(layer.pool.step_selected[:tokens], whole.pool.step_selected[:tokens])


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_slot_with_base_model_tokens(kernel):
    """One slot (today's path) plus base-model tokens: those get the base output and are not
    counted; the others are as without slots."""
    parts, adapted = MERGED["two parts"]
    slots = TokenSlots(256, device="cpu")
    layer, references, weight = build(kernel, parts, adapted, slots=slots)
    plain = build(kernel, parts, adapted)[0]
    slot_of_token = torch.tensor([0, -1, 0, 0, -1] * 4)
    slots.fill(slot_of_token)
    x = torch.randn(20, D_IN, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        got, unslotted = layer(x), plain(x[slot_of_token >= 0])
    torch.testing.assert_close(got[slot_of_token < 0], F.linear(x, weight)[slot_of_token < 0])
    torch.testing.assert_close(got[slot_of_token >= 0], unslotted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        layer.pool.stats, plain.pool.stats, rtol=routing_stats_rtol(D_IN, 20), atol=1e-9
    )


def test_grouped_is_chosen_per_kernel_and_refused_where_it_cannot_run():
    """None: numba groups an engine's slots (one or several: the pool has the token slots),
    triton stays dense (untimed on a GPU), numba without the token slots is stacked;
    grouped=True on the torch kernel, on triton with one slot or without slots is refused."""
    slots = TokenSlots(16, num_slots=3, device="cpu")
    for count in (1, 3):
        layout = PoolLayout.from_config(config(), D_IN, [40], [0], num_slots=count)
        for kernel, grouped in (("numba", True), ("triton", False)):
            pool = RemixPool(layout, torch.float32, 16, kernel=kernel, slots=slots)
            assert pool.grouped == grouped
    one = PoolLayout.from_config(config(), D_IN, [40], [0])
    assert not RemixPool(one, torch.float32, 16, kernel="numba").grouped
    for kernel, slot_count, given in (
        ("torch", 3, slots),
        ("triton", 1, slots),
        ("numba", 1, None),
    ):
        layout = PoolLayout.from_config(config(), D_IN, [40], [0], num_slots=slot_count)
        with pytest.raises(ValueError, match="grouped products need the token slots"):
            RemixPool(layout, torch.float32, 16, kernel=kernel, slots=given, grouped=True)


def test_grouped_split_reduction_is_deterministic_and_resets_its_tickets():
    """The grouped kernel's reduction over d_in split across programs (d_in 200: 4 blocks of
    64, 2 per split): the same result twice, one program's up to rounding, tickets reset; and
    its products alone (`shrink`) are each token's own slot's, zero for base-model tokens."""
    gen = torch.Generator().manual_seed(19)
    slots, parts, d_in, r0, tokens = 3, 2, 200, 2, len(SLOT_OF_TOKEN)
    x = torch.randn(tokens, d_in, generator=gen)
    lora_a = torch.randn(slots * parts * N * R, d_in, generator=gen) * d_in**-0.5
    router = torch.randn(slots * parts * N, d_in, generator=gen) * d_in**-0.5
    bias = torch.randn(slots * parts, N, generator=gen)
    always_a = torch.randn(slots * parts * r0, d_in, generator=gen) * d_in**-0.5
    groups = TokenSlots(256, num_slots=slots, device="cpu")
    groups.fill(torch.tensor(SLOT_OF_TOKEN))
    order, counts = groups.order, groups.counts
    semaphore = torch.zeros(slots * semaphore_size(tokens, parts), dtype=torch.int32)
    tol = float32_sum_rtol(d_in)  # products of unit scale, d_in terms summed per split
    results = []
    for split in (1, 3, 3):
        hidden, always_h = x.new_empty(tokens, parts * N * R), x.new_empty(tokens, parts * r0)
        stats = torch.zeros(slots * parts, N + 3, dtype=torch.float64)
        selected = torch.zeros(tokens, parts, N, dtype=torch.uint8)
        shrink_route(
            x, order, counts, lora_a, router, bias, always_a, hidden, always_h, stats,
            selected, semaphore, N, R, K, 0.7, True, split=split,
        )  # fmt: skip
        assert int(semaphore.abs().sum()) == 0
        results.append((hidden, always_h, stats, selected))
    for one, split in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(split, one, rtol=routing_stats_rtol(d_in, tokens), atol=tol)
    for first, again in zip(results[1], results[2], strict=True):
        assert torch.equal(first, again)
    assert results[0][1][2].abs().sum() == 0 and results[0][1][0].abs().sum() > 0  # base, slot 0
    # the products alone (a row-parallel shard's, before the all-reduce): each token's own slot's
    own = torch.tensor(SLOT_OF_TOKEN)
    for split in (1, 3):
        products = [torch.empty(tokens, w) for w in (parts * N * R, parts * N, parts * r0)]
        shrink(x, order, counts, lora_a, router, always_a, *products, semaphore, N, R, split)
        for got, rows in zip(products, (lora_a, router, always_a), strict=True):
            want = F.linear(x, rows).unflatten(1, (slots, -1))[
                torch.arange(tokens), own.clamp(min=0)
            ]
            torch.testing.assert_close(got, want * (own >= 0)[:, None], rtol=tol, atol=tol)


@pytest.mark.parametrize(("weighting", "always"), [("constant", 0), ("softmax_topk", 2)])
def test_grouped_triton_equals_the_torch_kernel(weighting, always):
    """The grouped triton path (three adapted parts, three slots with router biases) against
    the torch kernel's pool of the same tensors over three steps: mixed slots with base-model
    and padding tokens, a step wholly one slot's, one wholly the base model's. Same outputs,
    statistics per slot and selections after each; nothing of the pool's in the GEMM."""
    parts, adapted = MERGED["three parts"]
    built = [build_slots(k, parts, adapted, always, weighting=weighting) for k in ("torch", "triton grouped")]  # fmt: skip
    (oracle, _, weight, oracle_slots), (layer, _, _, layer_slots) = built
    assert torch.equal(layer.folded, weight)  # the base weight alone
    mixed = torch.tensor(SLOT_OF_TOKEN)
    mixed[mixed == 1] = -1
    gen = torch.Generator().manual_seed(17)
    padding = torch.zeros(len(mixed), dtype=torch.bool)
    padding[-3:] = True  # the last rows pad the step: routed, not counted
    for step, pad in ((mixed, padding), (torch.zeros(13, dtype=torch.long), None), (torch.full((13,), -1), None)):  # fmt: skip
        x = torch.randn(len(step), D_IN, generator=gen)
        outs = []
        set_padding_provider(lambda pad=pad: pad)
        try:
            for pool_layer, slots in ((oracle, oracle_slots), (layer, layer_slots)):
                slots.fill(step)
                with torch.no_grad():
                    outs.append(pool_layer(x))
        finally:
            set_padding_provider(lambda: None)
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
        stats_rtol = routing_stats_rtol(D_IN, len(step))
        torch.testing.assert_close(layer.pool.stats, oracle.pool.stats, rtol=stats_rtol, atol=1e-9)
        real = slice(len(step) - (3 if pad is not None else 0))  # padding rows' choices differ
        assert torch.equal(layer.pool.step_selected[real], oracle.pool.step_selected[real])
    assert layer.pool.stats.view(3, 3, -1)[2, :, N].tolist() == [7, 7, 7]  # 8 of slot 2, 1 pads
