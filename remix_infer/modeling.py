"""Reference PyTorch ReMix model: the training model and the oracle the serving layer is tested against.

`RemixLinear` wraps a frozen `nn.Linear` with a pool of n LoRAs and a router:

    y = W x + sum_{i in S(x)} g_i B_i A_i x  (+ B_0 A_0 x, the optional always-on LoRA)

S(x) is sampled (Gumbel-top-k, training) or the deterministic top-k (inference) of
softmax(P x); the gates g_i are omega (ReMix) or omega * softmax over the selected logits
(softmax_topk, MixLoRA-style). Adapter math runs in float32 whatever the base dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from remix_infer.checkpoint import TORCH_DTYPES, RemixCheckpoint, load_checkpoint
from remix_infer.config import (
    ALWAYS_A,
    ALWAYS_B,
    LORA_A,
    LORA_B,
    ROUTER_BIAS,
    ROUTER_WEIGHT,
    SHARED_ROUTER_BIAS,
    SHARED_ROUTER_WEIGHT,
    RemixConfig,
    tensor_name,
)
from remix_infer.routing import (
    dense_gates,
    gumbel_topk_sample,
    plackett_luce_log_prob,
    selection_weights,
    topk_select,
)


@dataclass
class Routing:
    """What one RemixLinear decided in its last forward, per token (leading dims of the input)."""

    logits: torch.Tensor  # [..., n] router logits, float32
    selected: torch.Tensor  # [..., k] chosen LoRA indices (ordered draw when sampled)
    weights: torch.Tensor  # [..., k] gate of each chosen LoRA
    log_prob: torch.Tensor | None  # [...] Plackett-Luce log-prob of a sampled draw, else None


class SharedRouting(nn.Module):
    """The shared routing scope's one router (MoR-LoRA): it reads the first layer's input (what
    layer 0's q/k/v projections read) and its decision is every module's routing for the token."""

    def __init__(self, d_model: int, config: RemixConfig, device: torch.device) -> None:
        super().__init__()
        self.router = nn.Linear(d_model, config.num_loras, bias=config.router_bias, device=device)
        self.last_routing: Routing | None = None


class RemixLinear(nn.Module):
    def __init__(
        self,
        base: nn.Linear,
        config: RemixConfig,
        shared: SharedRouting | None = None,
        routes_shared: bool = False,
        always_on: bool = True,
    ) -> None:
        """shared: the model's shared router (routing_scope "shared"), used instead of one of
        this module's own; routes_shared: this module's input is the first layer's input, so it
        runs the shared router for every module (the others reuse its decision); always_on:
        this module carries the config's always-on LoRA (if it has one)."""
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        n, r, d_in, d_out = config.num_loras, config.rank, base.in_features, base.out_features
        self.num_loras, self.top_k, self.rank = n, config.top_k, r
        self.omega, self.weighting = config.omega, config.weighting
        self.lora_a = nn.Parameter(torch.empty(n, r, d_in, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(n, d_out, r, device=base.weight.device))
        self.router = (
            nn.Linear(d_in, n, bias=config.router_bias, device=base.weight.device)
            if shared is None
            else None
        )
        self._shared = (shared,) if shared is not None else ()  # a tuple: not a submodule here
        self.routes_shared = routes_shared
        # The always-on LoRA (always_on: config.carries_always_on(this projection)): every
        # token, weight 1, beside the pool.
        r0 = config.always_on_rank if always_on else 0
        self.always_a = (
            nn.Parameter(torch.empty(r0, d_in, device=base.weight.device)) if r0 else None
        )
        self.always_b = (
            nn.Parameter(torch.zeros(d_out, r0, device=base.weight.device)) if r0 else None
        )
        # The trainer turns sampling off for methods that route deterministically while training.
        self.sample_in_training = config.weighting == "constant"
        # MoR-LoRA's straight-through estimator (the trainer turns it on): in training the gates
        # are the hard ones plus softmax(logits) - its detached copy, so the forward is the hard
        # selection and the backward is the router softmax's gradient.
        self.straight_through = False
        # Hard routing by domain (LoRA-Mixer's joint expert training; the trainer sets it per
        # batch): [B, 1, 1] LoRA indices that replace the routers' choice for those sequences.
        self.forced_selection: torch.Tensor | None = None
        # Routing outside training (INFERENCE_ROUTINGS; `inference_routing` sets it for a model):
        # the serving layer's deterministic top-k unless a study compares it with the others.
        self.inference_routing = "top_k"
        # The seed of training's Gumbel-top-k draws (`sampling_with` sets it for a model):
        # every forward draws afresh from it, so a recomputed forward (gradient checkpointing)
        # draws the same; None: torch's global RNG.
        self.sampling_seed: int | None = None
        self.last_routing: Routing | None = None
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self, generator: torch.Generator | None = None) -> None:
        """LoRA init as in PEFT (A uniform, B zero: the model starts as the base model).

        Values are drawn on the CPU (with `generator`, a CPU generator, if given) and copied to
        the parameters' device, so the same seed gives the same adapters on any device.
        """
        bound = 1.0 / math.sqrt(self.lora_a.shape[-1])
        lora_a = torch.empty(self.lora_a.shape).uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            self.lora_a.copy_(lora_a)
            self.lora_b.zero_()
            if self.routes_shared or self.router is not None:
                init_router(self.routing_router(), generator)
            if self.always_a is not None:
                shape = self.always_a.shape
                self.always_a.copy_(torch.empty(shape).uniform_(-bound, bound, generator=generator))
                self.always_b.zero_()

    def routing_router(self) -> nn.Linear:
        """The router this module's routing comes from: its own, or the shared one."""
        return self._shared[0].router if self._shared else self.router

    def route(self, x: torch.Tensor) -> Routing:
        """This module's routing of x: its own router's, or the shared scope's decision (made
        here when this module reads the first layer's input)."""
        if not self._shared:
            return self._decide(x, self.router)
        shared = self._shared[0]
        if self.routes_shared:
            shared.last_routing = self._decide(x, shared.router)
        return shared.last_routing

    def _decide(self, x: torch.Tensor, router: nn.Linear) -> Routing:
        # ReMix routers learn only from the RLOO estimator (through log Q), so the router input
        # is detached: the LoRA weights upstream then get exactly the SFT gradient.
        # softmax_topk routers learn through their gates, end to end.
        # Straight-through routers (MoR-LoRA) learn through their gates too.
        detach = self.weighting == "constant" and not self.straight_through
        router_in = x.detach() if detach else x
        bias = None if router.bias is None else router.bias.float()
        logits = F.linear(router_in.float(), router.weight.float(), bias)
        if self.forced_selection is not None:
            selected = self.forced_selection.expand(*logits.shape[:-1], 1)
            log_prob = None
        elif (self.training and self.sample_in_training) or (
            not self.training and self.inference_routing == "sampled"
        ):
            selected = gumbel_topk_sample(logits, self.top_k, self._sampling_generator(logits))
            log_prob = plackett_luce_log_prob(logits, selected)
        elif not self.training and self.inference_routing == "random":
            # k distinct LoRAs uniformly at random: Gumbel-top-k over equal logits
            selected, log_prob = gumbel_topk_sample(torch.zeros_like(logits), self.top_k), None
        else:
            selected, log_prob = topk_select(logits, self.top_k), None
        weights = selection_weights(logits, selected, self.omega, self.weighting)
        return Routing(logits, selected, weights, log_prob)

    def _sampling_generator(self, logits: torch.Tensor) -> torch.Generator | None:
        if self.sampling_seed is None:
            return None
        return torch.Generator(logits.device).manual_seed(self.sampling_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.route(x)
        self.last_routing = routing
        n, r = self.num_loras, self.rank
        gates = dense_gates(routing.selected, routing.weights, n)  # [..., n], zero if not chosen
        if self.training and self.straight_through:
            gates = straight_through_gates(gates, routing.logits)
        # All n LoRAs' A products as one matrix product, masked by the gates, then one B product.
        hidden = F.linear(x.float(), self.lora_a.reshape(n * r, -1))  # [..., n*r]
        hidden = (hidden.unflatten(-1, (n, r)) * gates.unsqueeze(-1)).flatten(-2)
        delta = F.linear(hidden, self.lora_b.permute(1, 0, 2).reshape(-1, n * r))  # [..., d_out]
        if self.always_a is not None:
            delta = delta + F.linear(F.linear(x.float(), self.always_a), self.always_b)
        return self.base(x) + delta.to(x.dtype)


INFERENCE_ROUTINGS = ("top_k", "sampled", "random")


@contextmanager
def inference_routing(model: nn.Module, routing: str) -> Iterator[None]:
    """Route a model's eval-mode forwards by `routing` inside the block: "top_k" (serving),
    "sampled" (Gumbel-top-k from the router, as in training) or "random" (any k, uniformly)."""
    if routing not in INFERENCE_ROUTINGS:
        raise ValueError(f"inference routing '{routing}': expected one of {INFERENCE_ROUTINGS}")
    modules = remix_modules(model).values()
    for m in modules:
        m.inference_routing = routing
    try:
        yield
    finally:
        for m in modules:
            m.inference_routing = "top_k"


@contextmanager
def sampling_with(model: nn.Module, seed: int) -> Iterator[None]:
    """Inside the block, each module of the model draws its sampled selections from its own
    generator seeded by `seed` and its place in the model: the draws depend on `seed` alone."""
    modules = remix_modules(model).values()
    for i, m in enumerate(modules):
        m.sampling_seed = (seed + i) % 2**63
    try:
        yield
    finally:
        for m in modules:
            m.sampling_seed = None


def init_router(router: nn.Linear, generator: torch.Generator | None = None) -> None:
    """Router init: weights N(0, 0.02^2) drawn on the CPU, zero bias."""
    weight = torch.empty(router.weight.shape).normal_(0.0, 0.02, generator=generator)
    with torch.no_grad():
        router.weight.copy_(weight)
        if router.bias is not None:
            router.bias.zero_()


def straight_through_gates(hard: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """hard + p - p.detach() with p = softmax(logits): the value of `hard` (p - p.detach() is
    exactly zero), the gradient of p (MoR-LoRA's straight-through estimator)."""
    probs = torch.softmax(logits, -1)
    return hard + (probs - probs.detach())


def remix_modules(model: nn.Module) -> dict[str, RemixLinear]:
    """Every adapted linear of a model, by HF module path (e.g. model.layers.0.self_attn.q_proj)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RemixLinear)}


def inject_remix(model: nn.Module, config: RemixConfig) -> dict[str, RemixLinear]:
    """Replace the config's target linears of a transformers Llama/Mistral/Qwen2 model in place.

    The base model is frozen; only adapter parameters (LoRA pools, routers) train.
    """
    model.requires_grad_(False)
    shared = None
    if config.routing_scope == "shared":  # the first module (layer 0's q, k or v) routes
        device = model.get_input_embeddings().weight.device
        shared = SharedRouting(model.config.hidden_size, config, device)
        model.remix_shared_router = shared
    for i, name in enumerate(config.module_names()):
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attr)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, expected nn.Linear")
        always_on = config.carries_always_on(attr)
        setattr(parent, attr, RemixLinear(base, config, shared, i == 0, always_on))
    return remix_modules(model)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters of an injected model, named as in the checkpoint file."""
    out = {}
    shared = getattr(model, "remix_shared_router", None)
    if shared is not None:
        out[SHARED_ROUTER_WEIGHT] = shared.router.weight
        if shared.router.bias is not None:
            out[SHARED_ROUTER_BIAS] = shared.router.bias
    for name, m in remix_modules(model).items():
        out[tensor_name(name, LORA_A)] = m.lora_a
        out[tensor_name(name, LORA_B)] = m.lora_b
        if m.router is not None:
            out[tensor_name(name, ROUTER_WEIGHT)] = m.router.weight
        if m.router is not None and m.router.bias is not None:
            out[tensor_name(name, ROUTER_BIAS)] = m.router.bias
        if m.always_a is not None:
            out[tensor_name(name, ALWAYS_A)] = m.always_a
            out[tensor_name(name, ALWAYS_B)] = m.always_b
    return out


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of an injected model, named as in the checkpoint file."""
    return {name: p.data for name, p in adapter_parameters(model).items()}


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into an injected model (shapes were checked at load time)."""
    params = adapter_tensors(model)
    if set(params) != set(tensors):
        raise ValueError(f"adapter names differ: {sorted(set(params) ^ set(tensors))[:3]}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


def load_remix_model(
    checkpoint: str | os.PathLike | RemixCheckpoint,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, RemixCheckpoint]:
    """Build the reference model of a checkpoint: base model + injected, loaded adapters, in eval mode.

    Base weights load in `dtype` (default: the checkpoint's dtype); adapters stay float32.
    """
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint if isinstance(checkpoint, RemixCheckpoint) else load_checkpoint(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(
        ckpt.base_model_path,
        revision=ckpt.config.base_model_revision,
        dtype=dtype or TORCH_DTYPES[ckpt.config.dtype],
    ).to(device)
    inject_remix(model, ckpt.config)
    load_adapter_tensors(model, {k: v.float() for k, v in ckpt.tensors.items()})
    return model.eval(), ckpt


def routing_selections(model: nn.Module) -> dict[str, torch.Tensor]:
    """Top-k (or sampled) indices each adapted module chose in the model's last forward."""
    return {
        name: m.last_routing.selected for name, m in remix_modules(model).items() if m.last_routing
    }
