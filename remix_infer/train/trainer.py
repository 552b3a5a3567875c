"""Fine-tune a base causal LM into a ReMix checkpoint (or a LoRA / MixLoRA baseline).

remix:   n LoRAs per module, k sampled per token (Gumbel-top-k) with constant weight omega;
         M selections per sequence; routers learn from the RLOO estimator, LoRAs from SFT.
mixlora: same pools, deterministic top-k with softmax weights learned end to end, plus a
         Switch-style load-balance loss (the baseline whose routing weights collapse).
lora:    one LoRA of rank R (stored as a pool of n=1, k=1).
mor:     MoR-LoRA's hard top-1 with unit scale (k = 1, omega = 1), deterministic in training;
         the router learns through the straight-through estimator (modeling.straight_through_gates).
mixer:   LoRA-Mixer's softmax top-k gates, end to end, plus its RSL loss (losses.rsl_loss).

With `frozen` adapter tensors (compose.py: a pool of existing LoRAs) those load and stay
fixed; the rest (the routers, an always-on LoRA) train.

Under a launcher (parallel.py) N processes train one model with DDP: each runs its shards of
the step's global batch and rank 0 evaluates, logs and saves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from remix_infer.checkpoint import TORCH_DTYPES, read_config, save_checkpoint
from remix_infer.config import (
    ALL_TARGET_MODULES,
    ATTENTION_PROJECTIONS,
    FAMILIES,
    RemixConfig,
    resolve_omega,
)
from remix_infer.modeling import (
    adapter_parameters,
    adapter_tensors,
    inject_remix,
    load_adapter_tensors,
    remix_modules,
    sampling_with,
)
from remix_infer.routing import effective_loras, effective_support_size, entropy
from remix_infer.train.data import TokenizedData, sequence_losses
from remix_infer.train.losses import rsl_loss, switch_balance_loss
from remix_infer.train.memory import check_fits, device_memory, estimate_memory, read_hf_config
from remix_infer.train.parallel import (
    current_ranks,
    mean_over_ranks,
    process_device,
    shard_seed,
)
from remix_infer.train.rloo import rloo_surrogate
from remix_infer.train.watch import TensorBoardLog

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
SNAPSHOTS_DIR = "steps"  # the checkpoints of a run with save_every, one folder per save
ARCHITECTURES = {family.hf_model_type for family in FAMILIES.values()}  # base model_types
SOFTMAX_METHODS = ("mixlora", "mixer")  # trained with softmax_topk gates


@dataclass
class TrainConfig:
    method: Literal["remix", "mixlora", "lora", "mor", "mixer"] = "remix"
    num_loras: int = 8
    top_k: int = 4
    rank: int = 8
    lora_rank: int | None = None  # rank R of the `lora` baseline; default top_k * rank
    alpha: float = 16.0
    omega_rule: Literal["lora", "rslora"] = "lora"
    num_samples: int = 4  # M, selections per sequence (remix)
    target_modules: list[str] = field(default_factory=lambda: list(ALL_TARGET_MODULES))
    router_bias: bool = False
    always_on_rank: int = 0  # r0 of an always-on LoRA per module beside the pool; 0: none
    # the target modules that carry it; default: all of them (mor: the attention projections)
    always_on_modules: list[str] | None = None
    routing_scope: Literal["auto", "module", "shared"] = "auto"  # auto: shared for mor
    learning_rate: float = 2e-3
    router_learning_rate: float | None = None  # default: learning_rate
    weight_decay: float = 0.0
    warmup_steps: int | None = 10  # None: 10% of max_steps
    max_steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 64
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    eval_every: int = 50  # 0: only at the end
    # 0: only at the end; N: also every N steps, each save kept in out/steps/step-NNNNNN
    save_every: int = 0
    balance_coef: float = 0.01  # mixlora load-balance loss weight
    # route each training sequence to LoRA `domain` (its data's field) and train the pools only:
    # LoRA-Mixer's joint expert training; then `compose --pool` trains the routers
    domain_routing: bool = False
    rsl_alpha: float = 0.1  # mixer: LoRA-Mixer's RSL balance weight (the paper's alpha)
    rsl_lambda: float = 0.5  # mixer: RSL entropy weight (the paper's lambda)
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward
    fsdp: bool = False  # shard the base and the adapters over the processes (FSDP2)

    def resolved_warmup(self) -> int:
        """Warm-up steps: as given, else a tenth of the run."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 10)

    def resolved_routing_scope(self) -> str:
        """module or shared: 'auto' is MoR-LoRA's shared router for mor, one per module else."""
        if self.routing_scope != "auto":
            return self.routing_scope
        return "shared" if self.method == "mor" else "module"

    def resolved_always_on_modules(self, target_modules: list[str]) -> list[str] | None:
        """The modules with an always-on LoRA (None: all targeted): as given, else for mor
        MoR-LoRA's small attention LoRA (the targeted q, k, v, o), else all."""
        if self.always_on_modules is not None or not self.always_on_rank:
            return self.always_on_modules
        if self.method != "mor":
            return None
        attention = [m for m in ATTENTION_PROJECTIONS if m in target_modules]
        return attention or None  # no attention projection targeted: on all of them

    def remix_config(self, base_model: str, architecture: str, num_layers: int) -> RemixConfig:
        """The checkpoint config this training run produces."""
        if self.method == "lora":
            n, k, r = 1, 1, self.lora_rank or self.top_k * self.rank
        else:
            n, k, r = self.num_loras, 1 if self.method == "mor" else self.top_k, self.rank
        # softmax gates (mixlora, mixer) sum to 1, so their per-LoRA scale is alpha/r (k = 1 in
        # the rule): with equal gates it matches ReMix's omega = alpha/(k r).
        softmax = self.method in SOFTMAX_METHODS
        omega = resolve_omega(self.omega_rule, self.alpha, 1 if softmax else k, r)
        if self.method == "mor":
            omega = 1.0  # MoR-LoRA's unit scale
        return RemixConfig(
            base_model=base_model,
            architecture=architecture,
            num_layers=num_layers,
            target_modules=self.target_modules,
            num_loras=n,
            top_k=k,
            rank=r,
            omega=omega,
            weighting="softmax_topk" if softmax else "constant",
            router_bias=self.router_bias,
            always_on_rank=self.always_on_rank,
            always_on_modules=self.resolved_always_on_modules(self.target_modules),
            routing_scope=self.resolved_routing_scope(),
            dtype=self.dtype,
            method=self.method,
        )


def default_device() -> torch.device:
    """This process's GPU (its local rank's under a launcher), else the CPU."""
    return process_device(current_ranks())


def load_base_model(path: str, dtype: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype]).to(device)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class RoutingStats:
    """Per-module routing figures over the real (non-padding) tokens of the forwards it saw."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}  # selections per LoRA
        self.ess_sum: dict[str, float] = {}  # summed ESS of the gate weights
        self.entropy_sum: dict[str, float] = {}  # summed router entropy (nats)
        self.tokens = 0

    def add(self, model: torch.nn.Module, mask: torch.Tensor) -> None:
        keep = mask.bool()
        self.tokens += int(keep.sum())
        for name, m in remix_modules(model).items():
            r = m.last_routing
            sel, weights = r.selected[keep], r.weights[keep].detach()
            counts = torch.bincount(sel.flatten(), minlength=m.num_loras).cpu()
            self.counts[name] = self.counts.get(name, 0) + counts
            self.ess_sum[name] = self.ess_sum.get(name, 0.0) + float(
                effective_support_size(weights).sum()
            )
            probs = torch.softmax(r.logits[keep].detach(), -1)
            self.entropy_sum[name] = self.entropy_sum.get(name, 0.0) + float(entropy(probs).sum())

    def summary(self) -> dict:
        """Per module: usage counts, effective LoRAs in use, mean ESS, mean router entropy."""
        t = max(self.tokens, 1)
        return {
            name: {
                "counts": self.counts[name].tolist(),
                "effective_loras": float(effective_loras(self.counts[name])),
                "mean_ess": self.ess_sum[name] / t,
                "mean_router_entropy": self.entropy_sum[name] / t,
            }
            for name in self.counts
        }

    def mean_ess(self) -> float:
        return sum(self.ess_sum.values()) / max(self.tokens * len(self.ess_sum), 1)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        base_model: str,
        train_data: TokenizedData,
        eval_data: TokenizedData | None = None,
        device: torch.device | None = None,
        remix_config: RemixConfig | None = None,
        frozen: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """remix_config: the checkpoint config to train (default: the one `config` gives);
        frozen: adapter tensors by checkpoint name (e.g. existing LoRAs as the pools) that load
        and stay fixed while the others train."""
        if config.method == "remix" and config.num_samples < 2:
            raise ValueError("remix training needs --num-samples (M) >= 2")
        self.config, self.train_data, self.eval_data = config, train_data, eval_data
        self.ranks = current_ranks()
        self.device = device or default_device()
        self.base_model = base_model
        self._check_memory(remix_config)
        torch.manual_seed(config.seed)
        self.model = load_base_model(base_model, config.dtype, self.device)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable({"use_reentrant": False})
        hf = self.model.config
        if hf.model_type not in ARCHITECTURES:
            raise ValueError(
                f"{base_model}: model_type '{hf.model_type}' is not Llama/Mistral/Qwen2"
            )
        self.remix_config = remix_config or config.remix_config(
            base_model, hf.model_type, hf.num_hidden_layers
        )
        self.modules = inject_remix(self.model, self.remix_config)
        generator = torch.Generator().manual_seed(config.seed)
        for m in self.modules.values():
            m.reset_adapter_parameters(generator)
        self._load_frozen(frozen or {})
        if config.method == "mor":  # hard top-1, straight-through gradient, no sampling
            for m in self.modules.values():
                m.sample_in_training, m.straight_through = False, True
        self.model.train()
        # Before the optimizer: FSDP replaces the parameters with sharded ones.
        self.forward_model = self._data_parallel(self.model)
        routers = {id(r): r for r in (m.routing_router() for m in self.modules.values())}
        router_params = [p for r in routers.values() for p in r.parameters()]
        groups = [
            {"params": router_params, "lr": config.router_learning_rate or config.learning_rate}
        ]
        # LoRA pools (unless frozen) and always-on LoRAs learn at the LoRA learning rate.
        lora_params = [
            p
            for m in self.modules.values()
            for p in (m.lora_a, m.lora_b, m.always_a, m.always_b)
            if p is not None and p.requires_grad
        ]
        if lora_params:
            groups.insert(0, {"params": lora_params, "lr": config.learning_rate})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, config.resolved_warmup(), config.max_steps)
        )
        self.step = 0
        self.history: list[dict] = []
        self.step_routing = RoutingStats()  # of the last training forward

    def _check_memory(self, remix_config: RemixConfig | None) -> None:
        """Log the estimated memory per device; refuse a run that cannot fit (memory.py)."""
        hf = read_hf_config(self.base_model)
        if hf is None:
            return
        cfg = self.config
        remix = remix_config or cfg.remix_config(
            self.base_model, hf.get("model_type", ""), hf["num_hidden_layers"]
        )
        copies = cfg.num_samples if cfg.method == "remix" else 1
        estimate = estimate_memory(
            hf, remix, cfg.batch_size * copies * cfg.max_length, cfg.dtype,
            shards=self.ranks.world_size if cfg.fsdp else 1,
            checkpointing=cfg.gradient_checkpointing,
        )  # fmt: skip
        if self.ranks.is_main:
            log.info("memory estimate: %s", estimate.describe())
        check_fits(estimate, device_memory(self.device))

    def _load_frozen(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `tensors` into their adapter parameters and freeze those."""
        params = adapter_parameters(self.model)
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise ValueError(f"frozen tensors that the model does not have: {unknown[:3]}")
        for name, tensor in tensors.items():
            with torch.no_grad():
                params[name].copy_(tensor)
            params[name].requires_grad_(False)

    def _data_parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the training forwards run through: under several processes DDP, or
        with --fsdp the model itself, each decoder layer and then the rest sharded in place."""
        if self.config.fsdp and self.ranks.world_size == 1:
            raise ValueError("--fsdp shards over several processes: start them with torchrun")
        if self.ranks.world_size == 1:
            return model
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            return fully_shard(model)
        from torch.nn.parallel import DistributedDataParallel

        # Routers that get no gradient (lora's pool of one; domain routing) are unused.
        unused = self.config.method == "lora" or self.config.domain_routing
        return DistributedDataParallel(model, find_unused_parameters=unused)

    # -- a step's global batch is shards_per_step micro-batches ("shards", parallel.py) --
    @property
    def shards_per_step(self) -> int:
        return self.ranks.world_size * self.config.grad_accum

    def _my_shards(self) -> range:
        """The shards of every step that this process runs."""
        first = self.ranks.rank * self.config.grad_accum
        return range(first, first + self.config.grad_accum)

    def _routing_draws(self, shard: int) -> AbstractContextManager:
        """Where this shard's sampled selections come from: with several shards a step,
        generators seeded by (seed, step, shard), so any split of the same global batch over
        processes and accumulation draws the same; one shard a step draws from torch's RNG,
        seeded by --seed at start and saved for resume, as single-process runs always have."""
        if self.shards_per_step == 1:
            return nullcontext()
        return sampling_with(self.model, shard_seed(self.config.seed, self.step, shard))

    def _gradient_sync(self, last: bool) -> AbstractContextManager:
        """DDP reduces the gradients once, on a step's last backward."""
        if last or self.forward_model is self.model:
            return nullcontext()
        return self.forward_model.no_sync()

    # -- data order: a pure function of (seed, micro-batch number), so resuming is exact --
    def _batch_indices(self, micro: int) -> torch.Tensor:
        size, n = self.config.batch_size, len(self.train_data)
        per_epoch = max(1, n // size)
        epoch, pos = divmod(micro, per_epoch)
        perm = torch.randperm(
            n, generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
        )
        return perm[pos * size : (pos + 1) * size]

    def _forward_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Training objective of one micro-batch and what to log about it."""
        cfg = self.config
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if cfg.domain_routing:
            return self._domain_routed_loss(batch)
        samples = cfg.num_samples if cfg.method == "remix" else 1
        if samples > 1:  # M copies of each sequence, each with its own sampled selections
            batch = {k: v.repeat_interleave(samples, dim=0) for k, v in batch.items()}
        out = self.forward_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        losses = sequence_losses(out.logits, batch["labels"])  # [B*M]
        mask = batch["attention_mask"].bool()
        stats = RoutingStats()
        stats.add(self.model, mask)
        self.step_routing = stats
        info = {"loss": float(losses.detach().mean()), "ess": stats.mean_ess()}
        if cfg.method == "remix":
            # RLOO's signal: how far the M selections' losses of a sequence are apart
            info["reward_spread"] = float(losses.detach().view(-1, samples).std(-1).mean())
            # each routing decision once (in the shared scope every module holds the same one)
            decisions = {id(m.last_routing): m.last_routing for m in self.modules.values()}
            log_q = sum((d.log_prob * mask).sum(-1) for d in decisions.values())
            objective = rloo_surrogate(losses.view(-1, samples), log_q.view(-1, samples))
        elif cfg.method == "mixlora":
            balance = self._routing_loss(mask)
            objective = losses.mean() + cfg.balance_coef * balance
            info["balance"] = float(balance.detach())
        elif cfg.method == "mixer":
            rsl = self._routing_loss(mask)
            objective = losses.mean() + rsl
            info["rsl"] = float(rsl.detach())
        else:
            objective = losses.mean()
        return objective, info

    def _domain_routed_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """LoRA-Mixer's joint expert training: every token of a sequence goes to LoRA `domain`
        (hard, one LoRA, its weight the config's), so each LoRA learns its domain's data alone;
        the routers are left as they are. The objective is the SFT loss."""
        domains = batch.get("domains")
        if domains is None or bool((domains < 0).any()):
            raise ValueError("--domain-routing: every training record needs a 'domain' field")
        if int(domains.max()) >= self.remix_config.num_loras:
            raise ValueError(
                f"--domain-routing: domain {int(domains.max())} but the pool has "
                f"{self.remix_config.num_loras} LoRAs (domains are LoRA indices)"
            )
        for m in self.modules.values():
            m.forced_selection = domains[:, None, None]
        try:
            out = self.forward_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
        finally:
            for m in self.modules.values():
                m.forced_selection = None
        losses = sequence_losses(out.logits, batch["labels"])
        return losses.mean(), {"loss": float(losses.detach().mean()), "ess": 1.0}

    def _routing_loss(self, mask: torch.Tensor) -> torch.Tensor:
        """The method's routing regulariser, averaged over the modules (mixlora, mixer)."""
        cfg, losses = self.config, []
        for m in self.modules.values():
            logits, selected = m.last_routing.logits[mask], m.last_routing.selected[mask]
            if cfg.method == "mixer":
                losses.append(rsl_loss(logits, selected, cfg.rsl_alpha, cfg.rsl_lambda))
            else:
                losses.append(switch_balance_loss(logits, selected))
        return torch.stack(losses).mean()

    def train_step(self) -> dict:
        """One optimizer step over this process's grad_accum shards of the global batch; its
        log record (averaged over the processes) joins self.history."""
        cfg = self.config
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        infos = []
        shards = self._my_shards()
        for shard in shards:
            batch = self.train_data.batch(
                self._batch_indices(self.step * self.shards_per_step + shard)
            )
            tokens = float(batch["attention_mask"].sum())
            with self._routing_draws(shard), self._gradient_sync(shard == shards[-1]):
                objective, info = self._forward_losses(batch)
                (objective / cfg.grad_accum).backward()  # DDP averages over the processes
            infos.append(info | {"tokens": tokens * len(shards)})  # their mean: the step's
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        record = {k: sum(i[k] for i in infos) / len(infos) for k in infos[0]}
        record = mean_over_ranks(record, self.device)
        record["tokens"] *= self.ranks.world_size  # sequence tokens of the global batch
        record.update(step=self.step, lr=self.scheduler.get_last_lr()[0])
        self.history.append(record)
        return record

    @torch.no_grad()
    def evaluate(self, data: TokenizedData | None = None, batch_size: int = 64) -> dict:
        """Validation loss with deterministic (top-k) routing, and the routing figures."""
        data = data or self.eval_data
        self.model.eval()
        stats, total, count = RoutingStats(), 0.0, 0
        for start in range(0, len(data), batch_size):
            batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            total += float(sequence_losses(logits, batch["labels"]).sum())
            count += batch["input_ids"].shape[0]
            stats.add(self.model, batch["attention_mask"])
        self.model.train()
        return {
            "eval_loss": total / count,
            "eval_ess": stats.mean_ess(),
            "routing": stats.summary(),
        }

    def train(
        self,
        out_dir: str | os.PathLike | None = None,
        progress: bool = True,
        base_reference: str | None = None,
        stop_at_step: int | None = None,
        log_dir: str | os.PathLike | None = None,
    ) -> list[dict]:
        """Run to max_steps (or stop, saved, once at stop_at_step: the schedule is still
        max_steps', to continue with resume) with periodic eval and saves; returns the per-step
        log. Under several processes rank 0 evaluates and saves (and writes TensorBoard
        scalars to log_dir, watch.py)."""
        cfg = self.config
        main = self.ranks.is_main
        end = min(cfg.max_steps, stop_at_step or cfg.max_steps)
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, desc=cfg.method, disable=not (progress and main)
        )
        board = TensorBoardLog(log_dir) if (main and log_dir is not None) else None
        start = time.perf_counter()
        while self.step < end:
            step_start = time.perf_counter()
            record = self.train_step()
            record["tokens_per_s"] = record["tokens"] / (time.perf_counter() - step_start)
            last = self.step == end
            if self._evaluates() and (
                self.step == cfg.max_steps or (cfg.eval_every and self.step % cfg.eval_every == 0)
            ):
                ev = self.evaluate()
                in_use = [m["effective_loras"] for m in ev["routing"].values()]
                record.update(
                    eval_loss=ev["eval_loss"],
                    eval_ess=ev["eval_ess"],
                    eval_effective_loras=sum(in_use) / len(in_use),
                )
                if board:
                    board.routing("eval_routing", ev["routing"], self.num_layers, self.step)
            record["elapsed_s"] = time.perf_counter() - start
            if board:
                board.step(record, self.group_lrs(), self.step_routing.summary(), self.num_layers)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", ess=f"{record['ess']:.2f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
            )  # fmt: skip
            bar.update(1)
            if out_dir is not None and (
                last or (cfg.save_every and self.step % cfg.save_every == 0)
            ):
                self.save(out_dir, base_reference)
        bar.close()
        if board:
            board.close()
        return self.history

    def _evaluates(self) -> bool:
        """Rank 0 evaluates; under FSDP every rank runs the forwards (they gather the shards)."""
        return self.eval_data is not None and (self.ranks.is_main or self.config.fsdp)

    @property
    def num_layers(self) -> int:
        return self.remix_config.num_layers

    def group_lrs(self) -> dict[str, float]:
        """The current learning rate of each parameter group (lora, router)."""
        names = ["lora", "router"] if len(self.optimizer.param_groups) == 2 else ["router"]
        return {n: g["lr"] for n, g in zip(names, self.optimizer.param_groups, strict=True)}

    def save(self, out_dir: str | os.PathLike, base_reference: str | None = None) -> Path:
        """Write the checkpoint, plus the optimizer/RNG state needed to resume exactly. Every
        rank calls it (FSDP gathers the adapters' shards); rank 0 writes.

        base_reference: how the checkpoint names its base model (default: portable_base_path).
        """
        out = Path(out_dir)
        adapters = full_tensors(adapter_tensors(self.model))
        if not self.ranks.is_main:
            return out
        out.mkdir(parents=True, exist_ok=True)
        base = base_reference or portable_base_path(self.base_model, out)
        config = self.remix_config.model_copy(update={"base_model": base})
        save_checkpoint(out, config, adapters)
        if self.config.save_every:
            self._save_snapshot(out, adapters, base)
        state = {
            "step": self.step,
            "adapters": adapters,  # float32 masters; the checkpoint may be bf16
            # FSDP's optimizer state is sharded: not saved, and such a run does not resume
            "optimizer": None if self.config.fsdp else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "train_config": asdict(self.config),
            "shards_per_step": self.shards_per_step,
            "history": self.history,
        }
        torch.save(state, out / STATE_FILE)
        with open(out / LOG_FILE, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        return out

    def _save_snapshot(self, out: Path, adapters: dict[str, torch.Tensor], base: str) -> None:
        """This step's checkpoint (no training state) in out/steps/, which the next save does
        not overwrite: `remix-train analyze OUT` follows the routing over the run.
        base: how out's checkpoint names its base model (a path relative to out is re-rooted)."""
        snapshot = out / SNAPSHOTS_DIR / f"step-{self.step:06d}"
        snapshot.mkdir(parents=True, exist_ok=True)
        if not Path(base).is_absolute() and (out / base).is_dir():
            base = os.path.relpath(out / base, snapshot)
        config = self.remix_config.model_copy(update={"base_model": base})
        save_checkpoint(snapshot, config, adapters)

    def resume(self, out_dir: str | os.PathLike) -> None:
        """Continue from a directory written by save(): same adapters, optimizer, schedule and RNG."""
        out = Path(out_dir)
        read_config(out)  # refuses a broken config with a clear message
        if self.config.fsdp:
            raise ValueError("--resume: a run with --fsdp does not resume yet")
        state = torch.load(out / STATE_FILE, weights_only=False)
        if state["optimizer"] is None:
            raise ValueError(f"{out / STATE_FILE}: saved by a --fsdp run, which does not resume")
        self._check_same_global_batch(state, out / STATE_FILE)
        load_adapter_tensors(self.model, state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.history = state["step"], state["history"]

    def _check_same_global_batch(self, state: dict, where: Path) -> None:
        """A run resumes exactly when its steps are split into as many shards of the same
        batch size (any processes x --grad-accum with that product); refuse another split."""
        saved_batch = state["train_config"]["batch_size"]
        saved_shards = state.get("shards_per_step", state["train_config"]["grad_accum"])
        if (saved_shards, saved_batch) != (self.shards_per_step, self.config.batch_size):
            raise ValueError(
                f"{where}: saved with {saved_shards} micro-batches of {saved_batch} per step "
                f"(processes x --grad-accum, --batch-size); this run has {self.shards_per_step} "
                f"({self.ranks.world_size} x {self.config.grad_accum}) of {self.config.batch_size}"
            )


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors: FSDP's sharded ones gathered from every rank (a collective), the others
    as they are."""
    from torch.distributed.tensor import DTensor

    return {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in tensors.items()}


def portable_base_path(base_model: str, out_dir: Path) -> str:
    """A base model inside the checkpoint dir is referenced relative to it, so the folder can move;
    other local paths are made absolute; hub ids stay as they are."""
    local = Path(base_model)
    if not local.is_dir():
        return base_model
    local, out = local.resolve(), out_dir.resolve()
    return str(local.relative_to(out)) if local.is_relative_to(out) else str(local)
