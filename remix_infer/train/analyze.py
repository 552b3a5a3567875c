"""`remix-train analyze`: how a checkpoint routes a set of prompts, per layer and module.

The reference model (torch + transformers, no vLLM) runs the prompts with the serving routing
(deterministic top-k); each adapted module's tokens are summed into the same stats row the
serving engine keeps (remix_infer/ops/stats.py), and the row gives the same figures and the same
collapse verdict as the server's /metrics: selection share of every LoRA, effective LoRAs in
use, mean router entropy, mean ESS of the routing weights.
"""

from __future__ import annotations

import os

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
