"""Plots of benchmark results."""

from __future__ import annotations

from pathlib import Path

# the layer's curves: result key, line style, legend
SERIES = (
    ("base_over_remix", "o-", "ReMix layer (grouped, the engine's)"),
    ("base_over_stacked", "s--", "stacked"),
    ("base_over_naive", "x:", "naive loop"),
)


def plot_layer(rows: list[dict], path: Path) -> None:
    """Layer speed relative to the base linear, per model width, against token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, d in enumerate(sorted({r["d"] for r in rows})):
        sub = [r for r in rows if r["d"] == d]
        color = f"C{i}"
        tokens = [r["tokens"] for r in sub]
        for key, style, name in SERIES:
            ax.plot(tokens, [r[key] for r in sub], style, color=color, label=f"{name}, d={d}")
        ax.axhline(
            sub[0]["floor_ratio"],
            color=color,
            linestyle="--",
            linewidth=1,
            label=f"FLOP floor, d={d}",
        )
    ax.set(
        xscale="log", xlabel="tokens in the batch", ylabel="base time / layer time", ylim=(0, 1.05)
    )
    ax.set_title("ReMix layer vs plain linear (n=8, k=4, r=8); 1.0 = free")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
