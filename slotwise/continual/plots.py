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


def plot_frontier(summary: dict, path: Path, n_known: int | None = None) -> None:
    """Each method's frontier: acquisition (x) against retention (y), one line per group (a method
    swept over learning rates), in two panels: known facts kept and held-out perplexity rise.
    Methods are named in the legend, not next to the points, so labels never overlap."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    groups: dict[str, list[dict]] = {}
    for name, s in summary.items():
        groups.setdefault(s.get("group", name), []).append(s)
    for group, runs in groups.items():
        runs = sorted(runs, key=lambda s: s["learned"] / max(s["n_facts"], 1))
        xs = [s["learned"] / max(s["n_facts"], 1) for s in runs]
        line = axes[0].plot(xs, [1 - (s["known_drop"] or 0) for s in runs], marker="o", label=f"{group} ({len(runs)} run{'s' if len(runs) != 1 else ''})")[0]
        axes[1].plot(xs, [100 * (s["heldout_ppl_rise"] or 0) for s in runs], marker="o", color=line.get_color())
    known = f" of {n_known} known facts" if n_known is not None else ""
    axes[0].set_ylabel(f"retention: share{known} still answered")
    axes[0].set_ylim(-0.05, 1.1)
    axes[1].set_ylabel("held-out perplexity rise (%)")
    for ax in axes:
        ax.set_xlabel("acquisition: share of new facts answered exactly")
        ax.set_xlim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    n_facts = max((s["n_facts"] for s in summary.values()), default=0)
    fig.suptitle(f"learning vs forgetting: {n_facts} new facts" + (f", retention on {n_known} known facts" if n_known is not None else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
