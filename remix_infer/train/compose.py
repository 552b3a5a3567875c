"""LoRAs people already have as a ReMix pool: `remix-train import-peft`, `compose`, `distill`.

Each PEFT LoRA (remix_infer.peft_adapter) becomes one LoRA of every module's pool: its scaling
is folded into B (so weight 1 reproduces it), ranks are zero-padded to the largest, and a module
it does not adapt gets a zero LoRA. import-peft writes one LoRA as a checkpoint of n = 1, k = 1,
omega = 1; compose freezes n of them (or a checkpoint's pools, --pool) and trains only the
routers (the trainer's `frozen` tensors); distill has each expert answer its domain's prompts, the
routers' training data when the experts' own data is gone.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from remix_infer.checkpoint import BaseModelShape, save_checkpoint
from remix_infer.config import (
    ALL_TARGET_MODULES,
    FAMILIES,
    LORA_A,
    LORA_B,
    ROUTER_WEIGHT,
    RemixConfig,
    tensor_name,
)
from remix_infer.peft_adapter import (
    CONFIG_FILE,
    PeftAdapterError,
    PeftLora,
    read_adapter_config,
    read_peft_lora,
)
from remix_infer.train.data import TokenizedData
from remix_infer.train.trainer import (
    TrainConfig,
    Trainer,
    default_device,
    load_base_model,
    portable_base_path,
)

log = logging.getLogger(__name__)


@dataclass
class FrozenPool:
    """A pool built from existing LoRAs: the checkpoint config and its LoRA tensors (A, B and
    zero routers, named as in the checkpoint file), float32. An always-on LoRA the config may
    ask for is not among them: it starts from the trainer's init (B = 0) and trains."""

    config: RemixConfig
    tensors: dict[str, torch.Tensor]

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """The pools' A and B: what stays frozen while the routers train."""
        return {n: t for n, t in self.tensors.items() if n.endswith((LORA_A, LORA_B))}


def read_base_model(base_model: str | os.PathLike) -> tuple[BaseModelShape, str]:
    """Shape and architecture (a FAMILIES key) of a local base model directory."""
    cfg_file = Path(base_model) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{base_model}: base model directory with config.json not found")
    try:
        shape = BaseModelShape.from_hf_config(json.loads(cfg_file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_file}: not a decoder-only model config ({e})") from None
    family = next((a for a, f in FAMILIES.items() if f.hf_model_type == shape.model_type), None)
    if family is None:
        raise ValueError(f"{cfg_file}: model_type '{shape.model_type}' is not Llama/Mistral/Qwen2")
    return shape, family


def build_pool(
    base_model: str,
    experts: list[PeftLora],
    shape: BaseModelShape,
    architecture: str,
    top_k: int = 1,
    omega: float = 1.0,
    method: str = "peft",
    always_on_rank: int = 0,
    weighting: str = "constant",
    routing_scope: str = "module",
) -> FrozenPool:
    """Stack the experts into one pool per module (expert e is LoRA e everywhere)."""
    adapted = set().union(*(e.projections() for e in experts))
    config = RemixConfig(
        base_model=base_model,
        architecture=architecture,
        num_layers=shape.num_layers,
        target_modules=[m for m in ALL_TARGET_MODULES if m in adapted],
        num_loras=len(experts),
        top_k=top_k,
        rank=max(e.max_rank for e in experts),
        omega=omega,
        method=method,
        always_on_rank=always_on_rank,
        weighting=weighting,
        routing_scope=routing_scope,
    )
    n, rank = config.num_loras, config.rank
    tensors = {}
    for module in config.module_names():
        d_in, d_out = shape.linear_shape(module.rsplit(".", 1)[1])
        lora_a, lora_b = torch.zeros(n, rank, d_in), torch.zeros(n, d_out, rank)
        for e, expert in enumerate(experts):
            if module in expert.modules:  # else a zero LoRA: this expert leaves the module alone
                a, b = expert.modules[module]
                lora_a[e, : a.shape[0]], lora_b[e, :, : a.shape[0]] = a, b
        tensors[tensor_name(module, LORA_A)] = lora_a
        tensors[tensor_name(module, LORA_B)] = lora_b
        tensors[tensor_name(module, ROUTER_WEIGHT)] = torch.zeros(n, d_in)
    return FrozenPool(config, tensors)


def checkpoint_pool(
    path: Path, base_model: str, shape: BaseModelShape, **routing: object
) -> FrozenPool:
    """The LoRA pools of ReMix checkpoint `path` as a frozen pool over `base_model`, with the
    routing settings `routing` (the checkpoint's routers are not kept)."""
    from remix_infer.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.base_shape != shape:
        raise ValueError(
            f"{path}: its base model {ckpt.base_model_path} is not --base-model's shape"
        )
    if ckpt.config.always_on_rank:
        raise ValueError(
            f"{path}: field 'always_on_rank': a pool with an always-on LoRA is not composed"
        )
    fields = {**ckpt.config.model_dump(), "base_model": base_model, "router_bias": False, **routing}
    config = RemixConfig.model_validate(fields)
    tensors = {n: t.float() for n, t in ckpt.tensors.items() if n.endswith((LORA_A, LORA_B))}
    return FrozenPool(config, tensors)


def read_experts(folders: list[Path], shape: BaseModelShape) -> list[PeftLora]:
    return [read_peft_lora(folder, shape) for folder in folders]


def recorded_base_model(folder: Path) -> str:
    """The base model a PEFT adapter names, for import-peft without --base-model."""
    recorded = read_adapter_config(folder).get("base_model_name_or_path")
    if not recorded or not (Path(recorded) / "config.json").is_file():
        raise PeftAdapterError(
            f"{folder / CONFIG_FILE}: field 'base_model_name_or_path' ({recorded!r}) is not a local "
            "model directory; pass --base-model"
        )
    return recorded


def import_peft(
    folder: str | os.PathLike, out: str | os.PathLike, base_model: str | None = None
) -> Path:
    """Write one PEFT LoRA as a ReMix checkpoint (n = 1, k = 1, weight 1) in `out`."""
    folder, out = Path(folder), Path(out)
    base_model = base_model or recorded_base_model(folder)
    shape, architecture = read_base_model(base_model)
    lora = read_peft_lora(folder, shape)
    pool = build_pool(portable_base_path(base_model, out), [lora], shape, architecture)
    log.info(
        "%s: %d adapted modules, rank up to %d -> %s", folder, len(lora.modules), lora.max_rank, out
    )
    return save_checkpoint(out, pool.config, pool.tensors)


def with_always_on_modules(pool: FrozenPool, train_config: TrainConfig) -> FrozenPool:
    """The pool's config with the modules that carry the always-on LoRA, which depend on the
    modules the pool adapts (mor's default: its attention projections)."""
    listed = train_config.resolved_always_on_modules(pool.config.target_modules)
    fields = {**pool.config.model_dump(), "always_on_modules": listed}
    return FrozenPool(RemixConfig.model_validate(fields), pool.tensors)


# Router training over the frozen pool (see TrainConfig.method): remix (RLOO, constant weight
# omega), mor (hard top-1, weight 1, straight-through), mixer (softmax top-k, RSL loss).
COMPOSE_METHODS = ("remix", "mor", "mixer")


def compose(
    base_model: str,
    experts: list[Path] | None,
    out: str | os.PathLike,
    train_config: TrainConfig,
    train_data: TokenizedData,
    eval_data: TokenizedData | None = None,
    omega: float = 1.0,
    pool_checkpoint: Path | None = None,
) -> Path:
    """Freeze the experts (PEFT folders), or the pool of a ReMix checkpoint (e.g. one trained
    with --domain-routing), as one pool and train only its routers with `train_config.method`;
    writes the checkpoint (and the trainer's state and log) to `out`."""
    if train_config.method not in COMPOSE_METHODS:
        raise ValueError(f"--method {train_config.method}: compose trains {list(COMPOSE_METHODS)}")
    out = Path(out)
    shape, architecture = read_base_model(base_model)
    method = train_config.method
    routing = dict(
        top_k=1 if method == "mor" else train_config.top_k,
        omega=1.0 if method == "mor" else omega,
        method=f"compose-{method}",
        weighting="softmax_topk" if method == "mixer" else "constant",
        routing_scope=train_config.resolved_routing_scope(),
        always_on_rank=train_config.always_on_rank,
    )
    base_reference = portable_base_path(base_model, out)
    if pool_checkpoint is not None:
        pool = checkpoint_pool(pool_checkpoint, base_reference, shape, **routing)
    else:
        pool = build_pool(
            base_reference, read_experts(experts, shape), shape, architecture, **routing
        )
    pool = with_always_on_modules(pool, train_config)
    log.info(
        "pool of %d experts, rank %d, on %s; training the routers (%s, %d steps)",
        pool.config.num_loras, pool.config.rank, pool.config.target_modules,
        train_config.method, train_config.max_steps,
    )  # fmt: skip
    trainer = Trainer(
        train_config, base_model, train_data, eval_data,
        remix_config=pool.config, frozen=pool.lora_tensors(),
    )  # fmt: skip
    trainer.train(out, base_reference=pool.config.base_model)
    return out


@dataclass
class DomainPrompt:
    prompt: str
    expert: int  # index into the experts


def read_domain_prompts(path: str | os.PathLike, experts: list[Path]) -> list[DomainPrompt]:
    """JSONL of {"prompt": str, "domain": D}: D is an expert's index in `experts` (0-based) or
    its folder name. Errors name the file, the line and the field."""
    from remix_infer.train.data import jsonl_records

    names = {folder.name: i for i, folder in enumerate(experts)}
    out = []
    for where, record in jsonl_records(path, "'prompt' and 'domain'"):
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{where}: field 'prompt' must be a string")
        domain = record.get("domain")
        index = domain if isinstance(domain, int) and not isinstance(domain, bool) else None
        index = names.get(domain) if isinstance(domain, str) else index
        if index is None or not 0 <= index < len(experts):
            raise ValueError(
                f"{where}: field 'domain' is {domain!r}; expected an expert index "
                f"0..{len(experts) - 1} or one of {sorted(names)}"
            )
        out.append(DomainPrompt(record["prompt"], index))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def distill(
    base_model: str,
    experts: list[Path],
    prompts: list[DomainPrompt],
    max_new_tokens: int = 64,
    progress: bool = True,
) -> list[dict]:
    """MoR-LoRA's traces when the experts' data is gone: each expert answers the prompts of its
    domain greedily (BOS + prompt, as the trainer tokenizes, until EOS or max_new_tokens).
    Returns {"prompt", "completion", "domain"} records, the router's training set."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from remix_infer.modeling import inject_remix, load_adapter_tensors
    from remix_infer.train.evaluate import greedy_complete

    shape, architecture = read_base_model(base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    device = default_device()
    records: list[dict | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="distill", unit="prompt", disable=not progress)
    # one expert at a time: its prompts in left-padded batches (evaluate.greedy_complete)
    for e, folder in enumerate(experts):
        pool = build_pool(base_model, [read_peft_lora(folder, shape)], shape, architecture)
        model = load_base_model(base_model, pool.config.dtype, device)
        inject_remix(model, pool.config)
        load_adapter_tensors(model, pool.tensors)
        model.eval()
        mine = [i for i, item in enumerate(prompts) if item.expert == e]
        answers = greedy_complete(
            model, tokenizer, [prompts[i].prompt for i in mine], max_new_tokens
        )
        for i, completion in zip(mine, answers, strict=True):
            records[i] = {"prompt": prompts[i].prompt, "completion": completion, "domain": e}
        bar.update(len(mine))
    bar.close()
    return records
