"""The demo report's plot: loss curves, routing diversity per layer, accuracy."""

from __future__ import annotations

from pathlib import Path

METHOD_COLORS = {"base": "grey", "lora": "tab:blue", "mixlora": "tab:orange", "remix": "tab:green"}


def plot_report(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    finetuned = [m for m in ("lora", "mixlora", "remix") if m in methods]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))

    ax = axes[0][0]
    for m in finetuned:
        hist = methods[m]["history"]
        ax.plot(
            [h["step"] for h in hist],
            [h["loss"] for h in hist],
            label=f"{m} train",
            color=METHOD_COLORS[m],
        )
        ev = [h for h in hist if "eval_loss" in h]
        ax.plot(
            [h["step"] for h in ev],
            [h["eval_loss"] for h in ev],
            "o--",
            color=METHOD_COLORS[m],
            label=f"{m} eval",
        )
    ax.set(title="Fine-tuning loss", xlabel="step", ylabel="loss (completion tokens)", yscale="log")
    ax.legend(fontsize=8)

    layers = range(len(methods[finetuned[0]]["routing_per_layer"]["mean_ess"]))
    for ax, key, title in (
        (axes[0][1], "mean_ess", "Effective support size of routing weights (held-out tokens)"),
        (
            axes[1][0],
            "effective_loras",
            "Effective number of LoRAs in use (exp usage entropy)",
        ),
    ):
        for m in finetuned:
            ax.plot(
                list(layers),
                methods[m]["routing_per_layer"][key],
                "o-",
                label=m,
                color=METHOD_COLORS[m],
            )
        ax.set(title=title, xlabel="layer", xticks=list(layers))
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)

    ax = axes[1][1]
    names = [m for m in ("base", "lora", "mixlora", "remix") if m in methods]
    tasks = [t for t in methods[names[0]]["accuracy"] if t != "all"] + ["all"]
    width = 0.8 / len(names)
    for i, m in enumerate(names):
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(
            xs, [methods[m]["accuracy"][t] for t in tasks], width, label=m, color=METHOD_COLORS[m]
        )
    ax.set(
        title="Held-out exact match",
        xticks=[j + 0.4 - width / 2 for j in range(len(tasks))],
        ylim=(0, 1),
    )
    ax.set_xticklabels(tasks)
    ax.legend(fontsize=8)

    fig.suptitle(f"remix-train demo ({report['total_seconds']:.0f} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
