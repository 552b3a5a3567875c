"""`remix-train study`: the ReMix paper's claims measured here, over seeds, with 95% confidence
intervals (Student t over the seeds' values).

Implemented so far:
1. routing collapse: over fine-tuning steps, the effective support size (ESS) of the routing
   weights and the effective number of LoRAs in use on held-out tokens, MixLoRA (learned
   softmax top-k weights) against ReMix (constant weights).

Every run fine-tunes the same base model (pretrained once per output directory, on the demo's
tasks) on the demo's task mixture.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from remix_infer.train.data import TokenizedData, tokenize
from remix_infer.train.demo import DemoSettings, build_tokenizer, pretrain_base
from remix_infer.train.tasks import make_examples, pretraining_corpus
from remix_infer.train.trainer import TrainConfig, Trainer

log = logging.getLogger(__name__)
COLLAPSE_METRICS = ("eval_ess", "eval_effective_loras", "eval_loss")


@dataclass
class StudyPreset:
    base: DemoSettings  # the base model's size and pretraining
    seeds: tuple[int, ...] = (0, 1, 2)
    finetune_steps: int = 120
    eval_every: int = 20
    num_loras: int = 8
    top_k: int = 2
    rank: int = 4  # small: one LoRA of k*r is short of capacity for the task mixture
    num_samples: int = 4
    train_examples: int = 4000
    eval_examples: int = 200
    learning_rate: float = 5e-3
    router_learning_rate: float = 2e-2
    methods: tuple[str, ...] = field(default=("mixlora", "remix"))


PRESETS = {
    # About 10 minutes here (2 cores): the demo's base model, 3 seeds per method.
    "cpu": StudyPreset(base=DemoSettings()),
    # A CUDA machine: a wider, deeper base and longer fine-tuning.
    "gpu": StudyPreset(
        base=DemoSettings(
            hidden_size=512,
            intermediate_size=1536,
            num_layers=8,
            attention_heads=8,
            kv_heads=4,
            pretrain_lines=100000,
            pretrain_steps=4000,
            pretrain_batch=256,
        ),
        seeds=(0, 1, 2, 3, 4),
        finetune_steps=600,
        eval_every=50,
    ),
    # Seconds, for tests: the same pipeline on the demo's quick base, a few steps per run.
    "quick": StudyPreset(
        base=DemoSettings.quick(),
        finetune_steps=4,
        eval_every=2,
        train_examples=64,
        eval_examples=16,
    ),
}

# Two-sided 95% Student t quantiles by degrees of freedom (normal beyond the table).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and 95% confidence interval of the mean (t over the seeds' values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half}


def prepare_base(out: Path, s: DemoSettings) -> Path:
    """The study's base model in out/base, pretrained unless one with the same settings is there."""
    base = out / "base"
    stamp = base / "pretrain_settings.json"
    wanted = json.dumps(asdict(s), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        log.info("reusing the base model in %s", base)
        return base
    tokenizer = build_tokenizer(base)
    pretrain_base(tokenizer, pretraining_corpus(s.pretrain_lines, s.seed), s, base)
    stamp.write_text(wanted)
    return base


def study_data(base: Path, p: StudyPreset) -> tuple[TokenizedData, TokenizedData]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    eval_set = make_examples(p.eval_examples, p.base.seed + 1)
    train_set = make_examples(p.train_examples, p.base.seed + 2, {e.prompt for e in eval_set})
    return tokenize(tokenizer, train_set, 64), tokenize(tokenizer, eval_set, 64)


def collapse_run(
    p: StudyPreset, method: str, seed: int, base: Path, data: tuple[TokenizedData, TokenizedData]
) -> dict:
    """One fine-tuning run's held-out routing figures at step 0 and every eval_every steps."""
    config = TrainConfig(
        method=method,
        num_loras=p.num_loras,
        top_k=p.top_k,
        rank=p.rank,
        num_samples=p.num_samples,
        max_steps=p.finetune_steps,
        eval_every=p.eval_every,
        warmup_steps=max(1, p.finetune_steps // 10),
        learning_rate=p.learning_rate,
        router_learning_rate=p.router_learning_rate,
        seed=seed,
    )
    trainer = Trainer(config, str(base), *data)
    start = trainer.evaluate()
    in_use = [m["effective_loras"] for m in start["routing"].values()]
    evals = [
        {
            "step": 0,
            "eval_loss": start["eval_loss"],
            "eval_ess": start["eval_ess"],
            "eval_effective_loras": sum(in_use) / len(in_use),
        }
    ]
    started = time.perf_counter()
    evals += [h for h in trainer.train(progress=False) if "eval_ess" in h]
    return {
        "seed": seed,
        "train_seconds": round(time.perf_counter() - started, 1),
        "steps": [e["step"] for e in evals],
        **{key: [e[key] for e in evals] for key in COLLAPSE_METRICS},
    }


def summarize(runs: list[dict]) -> dict:
    """Per metric, per eval step: mean and 95% CI over the seeds' runs."""
    return {
        "steps": runs[0]["steps"],
        **{
            key: [mean_ci([r[key][i] for r in runs]) for i in range(len(runs[0]["steps"]))]
            for key in COLLAPSE_METRICS
        },
    }


def collapse_verdict(summary: dict, top_k: int) -> str:
    """Whether MixLoRA's final ESS sits below ReMix's (which is k by construction), CIs apart."""
    mix, remix = summary["mixlora"]["eval_ess"][-1], summary["remix"]["eval_ess"][-1]
    if mix["high"] < remix["low"]:
        return (
            f"reproduced: MixLoRA's routing-weight ESS ends at {mix['mean']:.2f} "
            f"[{mix['low']:.2f}, {mix['high']:.2f}] against ReMix's {remix['mean']:.2f} (k = {top_k})"
        )
    return f"not reproduced: MixLoRA ESS {mix['mean']:.2f} [{mix['low']:.2f}, {mix['high']:.2f}]"


def routing_collapse(p: StudyPreset, base: Path, bar: tqdm) -> dict:
    """Claim 1 over every method and seed of the preset."""
    data = study_data(base, p)
    runs: dict[str, list[dict]] = {}
    for method in p.methods:
        for seed in p.seeds:
            bar.set_postfix(claim="collapse", method=method, seed=seed)
            runs.setdefault(method, []).append(collapse_run(p, method, seed, base, data))
            bar.update(p.finetune_steps)
    summary = {method: summarize(method_runs) for method, method_runs in runs.items()}
    return {"runs": runs, "summary": summary, "verdict": collapse_verdict(summary, p.top_k)}


def run_study(out: str | Path, preset: str = "cpu") -> dict:
    """Run the study's claims with `preset`; writes out/study.json and one PNG per claim."""
    p = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = prepare_base(out, p.base)
    total_steps = len(p.methods) * len(p.seeds) * p.finetune_steps
    with tqdm(total=total_steps, desc=f"study ({preset})", unit="step") as bar:
        collapse = routing_collapse(p, base, bar)
    report = {
        "preset": preset,
        "settings": asdict(p),
        "claims": {"routing_collapse": collapse},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "study.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_collapse(collapse["summary"], out / "routing_collapse.png", p.top_k)
    return report


def plot_collapse(summary: dict, path: Path, top_k: int) -> None:
    """ESS and effective LoRAs in use over steps: seed mean, 95% CI band, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from remix_infer.train.report import METHOD_COLORS

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("eval_ess", "ESS of routing weights"), ("eval_effective_loras", "LoRAs in use"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for method, s in summary.items():
            mean = [c["mean"] for c in s[key]]
            ax.plot(s["steps"], mean, "o-", color=METHOD_COLORS[method], label=method)
            ax.fill_between(
                s["steps"],
                [c["low"] for c in s[key]],
                [c["high"] for c in s[key]],
                color=METHOD_COLORS[method],
                alpha=0.2,
            )
        ax.set(title=f"{title} (held out; mean, 95% CI)", xlabel="fine-tuning step")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    axes[0].axhline(top_k, color="grey", lw=0.8, ls=":")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
