"""Plots of the continual experiment: curves over the stream, and the learning-vs-forgetting frontier."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict, path: Path) -> None:
    """Acquisition, known-fact retention and held-out perplexity against facts seen, one line per method."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, r in results.items():
        xs = [pt["facts_seen"] for pt in r["curve"]]
        axes[0].plot(xs, [pt["acquisition_f1"] or 0 for pt in r["curve"]], marker="o", label=name)
        axes[1].plot(xs, [pt["known_em"] for pt in r["curve"]], marker="o", label=name)
        axes[2].plot(xs, [pt["heldout_ppl"] for pt in r["curve"]], marker="o", label=name)
    for ax, title in zip(axes, ("acquisition F1 (facts seen)", "known facts still answered (EM)", "held-out perplexity")):
        ax.set_title(title)
        ax.set_xlabel("facts seen")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_frontier(summary: dict, path: Path) -> None:
    """x: acquisition (fraction of new facts learned), y: retention (1 - relative drop of known facts)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, s in summary.items():
        x = s["learned"] / max(s["n_facts"], 1)
        y = 1 - (s["known_drop"] or 0)
        ax.scatter([x], [y], s=60)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xlabel("acquisition: new facts answered exactly")
    ax.set_ylabel("retention: known facts kept (relative)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    ax.set_title("learning vs forgetting")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
