"""Task scores as a table for `dvc plots` (CSV and JSON) and as a bar chart (PNG).

Only scores in [0, 1] are plotted (accuracies, EM, F1); perplexities and NLLs stay in metrics.json.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

BOUNDED = ("acc", "acc_norm", "exact_match", "f1", "exact_match_strict_match", "exact_match_flexible_extract")


def score_rows(metrics: dict) -> list[dict]:
    """[{"task", "metric", "score"}] for every bounded metric of every task (facts included)."""
    rows = []
    for task, values in metrics.items():
        if not isinstance(values, dict):
            continue
        for metric in BOUNDED:
            value = values.get(metric)
            if isinstance(value, (int, float)):
                rows.append({"task": task, "metric": metric, "score": float(value)})
    return rows


def write_scores(rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """plots/scores.csv, plots/scores.json and plots/scores.png under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "scores.csv", "json": out / "scores.json", "png": out / "scores.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", "metric", "score"])
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps(rows, indent=2))
    bar_chart(rows, paths["png"])
    return paths


def bar_chart(rows: list[dict], path: str | Path, title: str = "evaluate: task scores") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(BOUNDED)}
    width = 0.8 / max([1] + [sum(r["task"] == t for r in rows) for t in tasks])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks)), 4.0))
    seen: set[str] = set()
    for i, task in enumerate(tasks):  # the task's own metrics, centred on its tick
        mine = [r for r in rows if r["task"] == task]
        for j, r in enumerate(mine):
            label = None if r["metric"] in seen else r["metric"]
            seen.add(r["metric"])
            bars = ax.bar(i + (j - (len(mine) - 1) / 2) * width, r["score"], width=width, color=colors[r["metric"]], label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title)
    if seen:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
