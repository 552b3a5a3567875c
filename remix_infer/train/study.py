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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from remix_infer.train.data import TokenizedData, tokenize
from remix_infer.train.demo import DemoSettings, build_tokenizer, finetune_config, pretrain_base
from remix_infer.train.tasks import held_out_split, pretraining_corpus
from remix_infer.train.trainer import Trainer

log = logging.getLogger(__name__)
COLLAPSE_METRICS = ("eval_ess", "eval_effective_loras", "eval_loss")


@dataclass
class StudyPreset:
    settings: DemoSettings  # the base model's pretraining and each run's fine-tuning
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 20
    methods: tuple[str, ...] = ("mixlora", "remix")


PRESETS = {
    # The demo's base model; rank 4, so one LoRA of k*r = 8 is short of capacity for the mix.
    "cpu": StudyPreset(DemoSettings(rank=4, finetune_steps=120)),
    # A CUDA machine: a wider, deeper base and longer fine-tuning.
    "gpu": StudyPreset(
        DemoSettings(
            hidden_size=512,
            intermediate_size=1536,
            num_layers=8,
            attention_heads=8,
            kv_heads=4,
            pretrain_lines=100000,
            pretrain_steps=4000,
            pretrain_batch=256,
            rank=4,
            finetune_steps=600,
        ),
        seeds=(0, 1, 2, 3, 4),
        eval_every=50,
    ),
    # Seconds, for tests: the demo's quick settings, a few steps per run.
    "quick": StudyPreset(
        replace(DemoSettings.quick(), finetune_steps=4, train_examples=64, eval_examples=16),
        eval_every=2,
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
    corpus = pretraining_corpus(s.pretrain_lines, s.seed, s.pretrain_task_weights)
    pretrain_base(tokenizer, corpus, s, base)
    stamp.write_text(wanted)
    return base


def study_data(base: Path, s: DemoSettings) -> tuple[TokenizedData, TokenizedData]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    train_set, eval_set = held_out_split(s.train_examples, s.eval_examples, s.seed)
    return tokenize(tokenizer, train_set, 64), tokenize(tokenizer, eval_set, 64)


def collapse_run(
    p: StudyPreset, method: str, seed: int, base: Path, data: tuple[TokenizedData, TokenizedData]
) -> dict:
    """One fine-tuning run's held-out routing figures at step 0 and every eval_every steps."""
    config = finetune_config(p.settings, method, seed=seed, eval_every=p.eval_every)
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


def _final(summary: dict, method: str, key: str) -> str:
    c = summary[method][key][-1]
    return f"{method} {c['mean']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"


def _apart(summary: dict, key: str) -> bool:
    """Whether the two methods' final 95% intervals do not overlap."""
    mix, remix = summary["mixlora"][key][-1], summary["remix"][key][-1]
    return mix["high"] < remix["low"] or remix["high"] < mix["low"]


def collapse_verdict(summary: dict, top_k: int) -> str:
    """The final step's figures, and which differences are outside both 95% intervals. ReMix's
    ESS is k by construction; the figure says how far MixLoRA's learned weights fall from it."""
    ess_apart = _apart(summary, "eval_ess")
    mix_ess = summary["mixlora"]["eval_ess"][-1]["mean"]
    return (
        f"weight ESS {'reproduced' if ess_apart and mix_ess < top_k else 'not reproduced'}: "
        f"{_final(summary, 'mixlora', 'eval_ess')} vs {_final(summary, 'remix', 'eval_ess')} "
        f"(k = {top_k}); LoRAs in use "
        f"{'apart' if _apart(summary, 'eval_effective_loras') else 'intervals overlap'}: "
        f"{_final(summary, 'mixlora', 'eval_effective_loras')} vs "
        f"{_final(summary, 'remix', 'eval_effective_loras')}"
    )


def routing_collapse(p: StudyPreset, base: Path, bar: tqdm) -> dict:
    """Claim 1 over every method and seed of the preset."""
    data = study_data(base, p.settings)
    runs: dict[str, list[dict]] = {}
    for method in p.methods:
        for seed in p.seeds:
            bar.set_postfix(claim="collapse", method=method, seed=seed)
            runs.setdefault(method, []).append(collapse_run(p, method, seed, base, data))
            bar.update(p.settings.finetune_steps)
    summary = {method: summarize(method_runs) for method, method_runs in runs.items()}
    return {
        "runs": runs,
        "summary": summary,
        "verdict": collapse_verdict(summary, p.settings.top_k),
    }


def run_study(out: str | Path, preset: str = "cpu") -> dict:
    """Run the study's claims with `preset`; writes out/study.json and one PNG per claim."""
    p = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = prepare_base(out, p.settings)
    total_steps = len(p.methods) * len(p.seeds) * p.settings.finetune_steps
    with tqdm(total=total_steps, desc=f"study ({preset})", unit="step") as bar:
        collapse = routing_collapse(p, base, bar)
    report = {
        "preset": preset,
        "settings": asdict(p),
        "claims": {"routing_collapse": collapse},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "study.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_collapse(collapse["summary"], out / "routing_collapse.png", p.settings.top_k)
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
