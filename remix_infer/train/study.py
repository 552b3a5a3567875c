"""`remix-train study`: the ReMix paper's claims measured here, over seeds, with 95% confidence
intervals (Student t over the seeds' values).

1. routing collapse: over fine-tuning steps, the effective support size (ESS) of the routing
   weights and the effective number of LoRAs in use on held-out tokens, MixLoRA (learned
   softmax top-k weights) against ReMix (constant weights).
2. equal parameters: ReMix (k LoRAs of rank r) against one LoRA of rank k*r (the same
   activated parameters) and one of rank n*r (the same stored parameters): held-out quality.
3. RLOO samples per sequence: ReMix with M = 2, 4, 8: held-out quality and training time.
4. inference routing: the claim-2 ReMix checkpoints served with deterministic top-k, sampled
   top-k and a random k: held-out quality.

Every run fine-tunes the same base model (pretrained once per output directory) on the
study's task mixture: eight tasks, so that one LoRA of rank k*r is short of capacity.
Runs shared between claims (ReMix with the preset's M) are trained once per seed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from remix_infer.modeling import INFERENCE_ROUTINGS, inference_routing, routing_selections
from remix_infer.train.data import Example, TokenizedData, tokenize
from remix_infer.train.demo import (
    DemoSettings,
    accuracy_by_task,
    build_tokenizer,
    finetune_config,
    pretrain_base,
)
from remix_infer.train.evaluate import exact_match
from remix_infer.train.tasks import STUDY_TASKS, held_out_split, pretraining_corpus
from remix_infer.train.trainer import Trainer

log = logging.getLogger(__name__)
COLLAPSE_METRICS = ("eval_ess", "eval_effective_loras", "eval_loss")
CLAIMS = {
    1: "routing_collapse",
    2: "equal_parameters",
    3: "rloo_samples",
    4: "inference_routing",
}
STUDY_TASK_NAMES = tuple(STUDY_TASKS)


@dataclass
class StudyPreset:
    settings: DemoSettings  # the base model's pretraining and each run's fine-tuning
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 20
    rloo_samples: tuple[int, ...] = (2, 4, 8)  # claim 3's M values


PRESETS = {
    # The demo's base model pretrained on the eight study tasks; rank r = 1, so one LoRA of
    # k*r = 2 is short of capacity for the mixture (claim 2 measures it against rank n*r = 8).
    "cpu": StudyPreset(
        DemoSettings(tasks=STUDY_TASK_NAMES, rank=1, finetune_steps=120),
    ),
    # A CUDA machine: a wider, deeper base and longer fine-tuning.
    "gpu": StudyPreset(
        DemoSettings(
            tasks=STUDY_TASK_NAMES,
            hidden_size=512,
            intermediate_size=1536,
            num_layers=8,
            attention_heads=8,
            kv_heads=4,
            pretrain_lines=100000,
            pretrain_steps=4000,
            pretrain_batch=256,
            rank=2,
            finetune_steps=600,
        ),
        seeds=(0, 1, 2, 3, 4),
        eval_every=50,
    ),
    # Seconds, for tests: the demo's quick settings, a few steps per run.
    "quick": StudyPreset(
        replace(
            DemoSettings.quick(),
            tasks=STUDY_TASK_NAMES,
            rank=1,
            finetune_steps=4,
            train_examples=64,
            eval_examples=16,
        ),
        eval_every=2,
    ),
}


def prepare_base(out: Path, s: DemoSettings) -> Path:
    """The study's base model in out/base, pretrained unless one with the same settings is there."""
    base = out / "base"
    stamp = base / "pretrain_settings.json"
    wanted = json.dumps(asdict(s), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        log.info("reusing the base model in %s", base)
        return base
    tokenizer = build_tokenizer(base)
    corpus = pretraining_corpus(s.pretrain_lines, s.seed, s.pretrain_task_weights, s.tasks)
    pretrain_base(tokenizer, corpus, s, base)
    stamp.write_text(wanted)
    return base


@dataclass
class StudyContext:
    """What every run of one study shares: the preset, the base model and the data."""

    preset: StudyPreset
    base: Path
    tokenizer: object
    train_data: TokenizedData
    eval_data: TokenizedData
    eval_set: list[Example]
    claims: tuple[int, ...] = field(default=tuple(CLAIMS))


def study_context(p: StudyPreset, base: Path, claims: tuple[int, ...]) -> StudyContext:
    from transformers import AutoTokenizer

    s = p.settings
    tokenizer = AutoTokenizer.from_pretrained(base)
    train_set, eval_set = held_out_split(s.train_examples, s.eval_examples, s.seed, s.tasks)
    return StudyContext(
        p,
        base,
        tokenizer,
        tokenize(tokenizer, train_set, 64),
        tokenize(tokenizer, eval_set, 64),
        eval_set,
        claims,
    )


# -- the runs: each claim names the fine-tunes it compares; one shared by claims runs once --
def rloo_run(m: int, s: DemoSettings) -> str:
    """Claim 3's run name for M samples per sequence (the preset's M is the plain remix run)."""
    return "remix" if m == s.num_samples else f"remix_M{m}"


def lora_run(rank: int) -> str:
    return f"lora_r{rank}"


def run_specs(p: StudyPreset, claims: tuple[int, ...]) -> dict[str, dict]:
    """Run name -> TrainConfig fields of every fine-tune the selected claims need."""
    s = p.settings
    # claims 1, 2 and 4, and claim 3's run at the preset's M: the same fields whatever the claims
    specs: dict[str, dict] = {"remix": {"method": "remix", "num_samples": s.num_samples}}
    if 1 in claims:
        specs["mixlora"] = {"method": "mixlora"}
    if 2 in claims:
        for rank in (s.top_k * s.rank, s.num_loras * s.rank):
            specs[lora_run(rank)] = {"method": "lora", "lora_rank": rank}
    if 3 in claims:
        for m in p.rloo_samples:
            specs[rloo_run(m, s)] = {"method": "remix", "num_samples": m}
    return specs


def study_run(ctx: StudyContext, fields: dict, seed: int, routings: tuple[str, ...]) -> dict:
    """One fine-tune: held-out routing figures over steps (claim 1), training time, then held-out
    exact match and loss of the trained model under each inference routing of `routings`."""
    s = ctx.preset.settings
    config = finetune_config(s, seed=seed, eval_every=ctx.preset.eval_every, **fields)
    trainer = Trainer(config, str(ctx.base), ctx.train_data, ctx.eval_data)
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
    wall, cpu = time.perf_counter(), time.process_time()
    evals += [h for h in trainer.train(progress=False) if "eval_ess" in h]
    record = {
        "seed": seed,
        "train_seconds": round(time.perf_counter() - wall, 1),
        "train_cpu_seconds": round(time.process_time() - cpu, 1),
        "steps": [e["step"] for e in evals],
        **{key: [e[key] for e in evals] for key in COLLAPSE_METRICS},
    }
    record["routing"] = {r: held_out_quality(ctx, trainer, r, seed) for r in routings}
    return record


def cached_run(ctx: StudyContext, out: Path, name: str, fields: dict, seed: int) -> dict:
    """study_run, or its record from out/runs/ when a run with the same settings, fields, seed
    and routings is there: an interrupted study resumes, and claims run apart share their runs."""
    routings = INFERENCE_ROUTINGS if name == "remix" and 4 in ctx.claims else ("top_k",)
    key = {"preset": asdict(ctx.preset), "fields": fields, "seed": seed, "routings": routings}
    path = out / "runs" / f"{name}-seed{seed}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["key"] == json.loads(json.dumps(key)):
            log.info("reusing %s", path)
            return saved["record"]
    record = study_run(ctx, fields, seed, routings)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"key": key, "record": record}) + "\n")
    return record


def held_out_quality(ctx: StudyContext, trainer: Trainer, routing: str, seed: int) -> dict:
    """Held-out exact match (greedy) per task, loss, and for routings other than top-k the
    share of held-out tokens whose selected set equals top-k's, with `routing` at inference."""
    model, s = trainer.model, ctx.preset.settings
    torch.manual_seed(seed)  # sampled and random routings draw from torch's generator
    with inference_routing(model, routing):
        correct = exact_match(model, ctx.tokenizer, ctx.eval_set)
        out = {
            "exact_match": accuracy_by_task(correct, ctx.eval_set, s.tasks),
            "eval_loss": trainer.evaluate()["eval_loss"],
        }
    if routing != "top_k":
        out["top_k_agreement"] = selection_agreement(trainer, routing)
    return out


@torch.no_grad()
def selection_agreement(trainer: Trainer, routing: str) -> float:
    """Share of held-out (token, module) pairs where `routing` selects the same set as top-k."""
    model, data = trainer.model.eval(), trainer.eval_data
    batch = {k: v.to(trainer.device) for k, v in data.batch(torch.arange(len(data))).items()}
    chosen = {}
    for mode in ("top_k", routing):
        with inference_routing(model, mode):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        chosen[mode] = {k: v.sort(-1).values for k, v in routing_selections(model).items()}
    keep = batch["attention_mask"].bool()
    same = [
        (chosen["top_k"][k] == chosen[routing][k]).all(-1)[keep].float().mean()
        for k in chosen["top_k"]
    ]
    return float(torch.stack(same).mean())


# -- statistics and verdicts --
# Two-sided 95% Student t quantiles by degrees of freedom (normal beyond the table).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and 95% confidence interval of the mean (t over the seeds' values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean, "n_seeds": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n_seeds": n}


def fmt(ci: dict) -> str:
    return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def compare(a: dict, b: dict) -> str:
    """How interval a stands against b: 'above'/'below' when the 95% intervals are apart."""
    if a["low"] > b["high"]:
        return "above"
    if a["high"] < b["low"]:
        return "below"
    return "intervals overlap"


def summarize(runs: list[dict]) -> dict:
    """Per metric, per eval step: mean and 95% CI over the seeds' runs."""
    return {
        "steps": runs[0]["steps"],
        **{
            key: [mean_ci([r[key][i] for r in runs]) for i in range(len(runs[0]["steps"]))]
            for key in COLLAPSE_METRICS
        },
    }


def quality(runs: list[dict], routing: str = "top_k") -> dict:
    """Held-out exact match (all tasks and per task) and loss of one run name over its seeds."""
    em = [r["routing"][routing]["exact_match"] for r in runs]
    return {
        "exact_match": mean_ci([e["all"] for e in em]),
        "eval_loss": mean_ci([r["routing"][routing]["eval_loss"] for r in runs]),
        "by_task": {task: mean_ci([e[task] for e in em]) for task in em[0] if task != "all"},
    }


def _final(summary: dict, method: str, key: str) -> str:
    c = summary[method][key][-1]
    return f"{method} {c['mean']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"


def _apart(summary: dict, key: str) -> bool:
    """Whether the two methods' final 95% intervals do not overlap."""
    return compare(summary["mixlora"][key][-1], summary["remix"][key][-1]) != "intervals overlap"


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


# -- the claims, from the runs --
def routing_collapse(runs: dict[str, list[dict]], p: StudyPreset) -> dict:
    """Claim 1: MixLoRA's and ReMix's held-out routing figures over steps."""
    methods = ("mixlora", "remix")
    summary = {m: summarize(runs[m]) for m in methods}
    return {
        "runs": {m: runs[m] for m in methods},
        "summary": summary,
        "verdict": collapse_verdict(summary, p.settings.top_k),
    }


def equal_parameters(runs: dict[str, list[dict]], p: StudyPreset) -> dict:
    """Claim 2: ReMix against one LoRA of rank k*r and one of rank n*r, held-out exact match."""
    s = p.settings
    active, stored = lora_run(s.top_k * s.rank), lora_run(s.num_loras * s.rank)
    names = ("remix", active, stored)
    summary = {name: quality(runs[name]) for name in names}
    em = {name: summary[name]["exact_match"] for name in names}
    verdict = (
        f"exact match remix {fmt(em['remix'])}, {active} (equal activated) {fmt(em[active])}, "
        f"{stored} (equal stored) {fmt(em[stored])}; remix vs {active}: "
        f"{compare(em['remix'], em[active])}; remix vs {stored}: "
        f"{compare(em['remix'], em[stored])}; capacity limit ({active} vs {stored}): "
        f"{compare(em[active], em[stored])}"
    )
    return {"runs": {n: runs[n] for n in names}, "summary": summary, "verdict": verdict}


def rloo_samples(runs: dict[str, list[dict]], p: StudyPreset) -> dict:
    """Claim 3: ReMix with M = 2, 4, 8 samples per sequence: exact match and training time."""
    names = {m: rloo_run(m, p.settings) for m in p.rloo_samples}
    summary = {
        f"M={m}": quality(runs[name])
        | {
            "train_seconds": mean_ci([r["train_seconds"] for r in runs[name]]),
            "train_cpu_seconds": mean_ci([r["train_cpu_seconds"] for r in runs[name]]),
        }
        for m, name in names.items()
    }
    lo, hi = f"M={min(names)}", f"M={max(names)}"
    verdict = "; ".join(
        f"{m}: exact match {fmt(c['exact_match'])}, train {c['train_seconds']['mean']:.0f} s"
        for m, c in summary.items()
    )
    verdict += (
        f"; {hi} vs {lo} exact match: "
        f"{compare(summary[hi]['exact_match'], summary[lo]['exact_match'])}"
    )
    return {"runs": {n: runs[n] for n in names.values()}, "summary": summary, "verdict": verdict}


def inference_routing_claim(runs: dict[str, list[dict]], p: StudyPreset) -> dict:
    """Claim 4: the remix runs' checkpoints with top-k, sampled and random routing."""
    summary = {r: quality(runs["remix"], r) for r in INFERENCE_ROUTINGS}
    for r in INFERENCE_ROUTINGS[1:]:
        summary[r]["top_k_agreement"] = mean_ci(
            [run["routing"][r]["top_k_agreement"] for run in runs["remix"]]
        )
    em = {r: summary[r]["exact_match"] for r in INFERENCE_ROUTINGS}
    verdict = "; ".join(f"{r} {fmt(em[r])}" for r in INFERENCE_ROUTINGS) + (
        f"; top_k vs sampled: {compare(em['top_k'], em['sampled'])}; "
        f"top_k vs random: {compare(em['top_k'], em['random'])}"
    )
    return {"summary": summary, "verdict": verdict}


CLAIM_SUMMARIES = {
    1: routing_collapse,
    2: equal_parameters,
    3: rloo_samples,
    4: inference_routing_claim,
}


def run_study(
    out: str | Path, preset: str = "cpu", claims: tuple[int, ...] = tuple(CLAIMS)
) -> dict:
    """Run the selected claims with `preset`; writes out/study.json and one PNG per claim."""
    p = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ctx = study_context(p, prepare_base(out, p.settings), claims)
    specs = run_specs(p, claims)
    runs: dict[str, list[dict]] = {}
    with tqdm(total=len(specs) * len(p.seeds), desc=f"study ({preset})", unit="run") as bar:
        for name, fields in specs.items():
            for seed in p.seeds:
                bar.set_postfix(run=name, seed=seed)
                runs.setdefault(name, []).append(cached_run(ctx, out, name, fields, seed))
                bar.update(1)
    report = {
        "preset": preset,
        "settings": asdict(p),
        "claims": {CLAIMS[c]: CLAIM_SUMMARIES[c](runs, p) for c in sorted(claims)},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "study.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_claims(report, out)
    return report


# -- plots: one PNG per claim --
def plot_claims(report: dict, out: Path) -> None:
    """routing_collapse.png (curves over steps); the others as bars with 95% CI whiskers."""
    claims, k = report["claims"], report["settings"]["settings"]["top_k"]
    if "routing_collapse" in claims:
        plot_collapse(claims["routing_collapse"]["summary"], out / "routing_collapse.png", k)
    if "equal_parameters" in claims:
        s = claims["equal_parameters"]["summary"]
        plot_bars(s, ("exact_match", "eval_loss"), "ReMix vs LoRA", out / "equal_parameters.png")
    if "rloo_samples" in claims:
        s = claims["rloo_samples"]["summary"]
        keys = ("exact_match", "eval_loss", "train_seconds")
        plot_bars(s, keys, "RLOO samples per sequence", out / "rloo_samples.png")
    if "inference_routing" in claims:
        s = claims["inference_routing"]["summary"]
        plot_bars(
            s, ("exact_match", "eval_loss"), "inference routing", out / "inference_routing.png"
        )


def plot_bars(summary: dict, keys: tuple[str, ...], title: str, path: Path) -> None:
    """One panel per metric: a bar per summary entry at its seed mean, whiskers to the 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4))
    labels = list(summary)
    for ax, key in zip(axes, keys, strict=True):
        cis = [summary[label][key] for label in labels]
        means = [c["mean"] for c in cis]
        errors = [[c["mean"] - c["low"] for c in cis], [c["high"] - c["mean"] for c in cis]]
        ax.bar(labels, means, yerr=errors, capsize=6, color="#7aa6c2")
        ax.set(
            title=f"{key.replace('_', ' ')} (held out)"
            if key != "train_seconds"
            else "training wall time (s)"
        )
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"{title}: seed mean, 95% CI")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
