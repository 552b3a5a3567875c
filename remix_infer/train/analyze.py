"""`remix-train analyze`: how a checkpoint routes a set of prompts, per layer and module.

The reference model (torch + transformers, no vLLM) runs the prompts with the serving routing
(deterministic top-k); each adapted module's tokens are summed into the same stats row the
serving engine keeps (remix_infer/ops/stats.py), and the row gives the same figures and the same
collapse verdict as the server's /metrics: selection share of every LoRA, effective LoRAs in
use, mean router entropy, mean ESS of the routing weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm import tqdm

from remix_infer.config import split_module_path
from remix_infer.modeling import load_remix_model, remix_modules
from remix_infer.ops.stats import StatsRow, is_collapsed, per_token_figures, routing_figures
from remix_infer.routing import dense_gates
from remix_infer.train.data import jsonl_records


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The texts to route: JSONL records with a string 'prompt' and, optionally, a string
    'completion' appended to it (the tokens a served request would run). Errors name the file,
    the line and the field."""
    texts = []
    for where, record in jsonl_records(path, "'prompt'"):
        completion = record.get("completion", "")  # optional
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{where}: field 'prompt' must be a string")
        if not isinstance(completion, str):
            raise ValueError(f"{where}: field 'completion' must be a string")
        texts.append(record["prompt"] + completion)
    if not texts:
        raise ValueError(f"{path}: no records")
    return texts


@torch.no_grad()
def routing_rows(
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001 - any transformers tokenizer
    texts: list[str],
    batch_size: int = 16,
) -> dict[str, StatsRow]:
    """Per adapted module, the stats row of every real token of `texts` (as the engine sums it)."""
    sums: dict[str, torch.Tensor] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(texts), batch_size), desc="analyze", unit="batch"):
        rows = [tokenizer(t)["input_ids"] for t in texts[start : start + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]).bool()
        model(input_ids=ids, attention_mask=mask)
        for name, m in remix_modules(model).items():
            r = m.last_routing
            gates = dense_gates(r.selected[mask], r.weights[mask], m.num_loras)
            constant_k = m.top_k if m.weighting == "constant" else None
            figures = per_token_figures(r.logits[mask], gates, constant_k).double().sum(0)
            sums[name] = sums.get(name, 0) + figures
    return {name: StatsRow.parse(row.tolist()) for name, row in sums.items()}


def module_report(row: StatsRow, top_k: int) -> dict:
    """One module's figures (as /metrics defines them) and its selection shares."""
    total = sum(row.selections)
    return {
        **routing_figures(row),
        "shares": [s / total if total else 0.0 for s in row.selections],
        "collapsed": is_collapsed(routing_figures(row), top_k),
    }


def analyze_checkpoint(
    checkpoint: str | os.PathLike, texts: list[str], batch_size: int = 16
) -> dict:
    """The routing report of `checkpoint` over `texts` (see the module docstring)."""
    from transformers import AutoTokenizer

    model, ckpt = load_remix_model(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(ckpt.base_model_path)
    top_k = ckpt.config.top_k
    modules = {}
    for name, row in routing_rows(model, tokenizer, texts, batch_size).items():
        layer, module = split_module_path(name)
        modules[name] = {"layer": layer, "module": module, **module_report(row, top_k)}
    return {
        "checkpoint": str(checkpoint),
        "method": ckpt.config.method,
        "num_loras": ckpt.config.num_loras,
        "top_k": top_k,
        "weighting": ckpt.config.weighting,
        "sequences": len(texts),
        "modules": modules,
        "collapsed_modules": [name for name, m in modules.items() if m["collapsed"]],
    }


def run_snapshots(run_dir: str | os.PathLike) -> dict[int, Path]:
    """step -> checkpoint of each save a run with --save-every kept (out/steps/step-NNNNNN)."""
    from remix_infer.train.trainer import SNAPSHOTS_DIR

    folders = Path(run_dir, SNAPSHOTS_DIR).glob("step-*")
    return {int(f.name.removeprefix("step-")): f for f in sorted(folders) if f.is_dir()}


def analyze_run(snapshots: dict[int, Path], texts: list[str], batch_size: int = 16) -> dict:
    """Per saved step, each module's effective LoRAs, ESS and collapse verdict over `texts`:
    whether routing spread or collapsed while the run trained."""
    steps = []
    for step, checkpoint in snapshots.items():
        report = analyze_checkpoint(checkpoint, texts, batch_size)
        modules = {
            name: {key: m[key] for key in ("layer", "effective_loras", "ess", "collapsed")}
            for name, m in report["modules"].items()
        }
        steps.append({"step": step, "checkpoint": str(checkpoint), "modules": modules})
    return {"num_loras": report["num_loras"], "top_k": report["top_k"], "steps": steps}


def plot_run(run: dict, path: str | os.PathLike) -> None:
    """Effective LoRAs in use per layer (the mean over its modules) against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = sorted({m["layer"] for m in run["steps"][0]["modules"].values()})
    for layer in layers:
        means = [
            sum(in_layer) / len(in_layer)
            for in_layer in (
                [m["effective_loras"] for m in s["modules"].values() if m["layer"] == layer]
                for s in run["steps"]
            )
        ]
        ax.plot([s["step"] for s in run["steps"]], means, marker="o", label=f"layer {layer}")
    ax.axhline(run["top_k"], color="grey", linestyle="--", label="k (below: collapsed)")
    ax.set(xlabel="step", ylabel="effective LoRAs in use", ylim=(0, run["num_loras"] + 0.5))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shares(report: dict, path: str | os.PathLike) -> None:
    """Heatmap of selection shares: one row per module (layer order), one column per LoRA;
    collapsed modules are marked with * in the row label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["modules"])  # the model's order: layer by layer
    shares = [report["modules"][n]["shares"] for n in names]
    labels = [
        f"{'* ' if report['modules'][n]['collapsed'] else ''}L{report['modules'][n]['layer']} "
        f"{report['modules'][n]['module']}"
        for n in names
    ]
    fig, ax = plt.subplots(figsize=(2 + 0.5 * report["num_loras"], 1 + 0.22 * len(names)))
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(len(names)), labels, fontsize=7)
    ax.set_xticks(range(report["num_loras"]))
    ax.set(xlabel="LoRA", title=f"selection shares (top-{report['top_k']}; * = collapsed)")
    fig.colorbar(image, ax=ax, label="share of selections")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
