"""Validation-loss curves of the iso-FLOP pretraining comparison (scripts/moc_compare.py pretrain).

    python scripts/moc_plot.py --runs runs/moc --out results/moc-cpu-2026-11-27/steps300/curves.png

Reads <runs>/<variant>/history.json (the train stage's history: eval_loss every eval_every steps,
lm_loss every step) of each variant present and draws one line per variant: the held-out loss the
train stage measured while training (solid, markers) and the training LM loss averaged over windows
of --window steps (faint).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

VARIANTS = ("dense", "product_key", "moc_causal", "moc_sequence")
LABELS = {"dense": "dense (iso-FLOP)", "product_key": "product-key Memory+", "moc_causal": "MoC causal_chunks",
          "moc_sequence": "MoC sequence (LEAKY)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/moc_plot.py", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/moc")
    ap.add_argument("--out", required=True)
    ap.add_argument("--window", type=int, default=20)
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for i, name in enumerate(VARIANTS):
        path = Path(args.runs) / name / "history.json"
        if not path.is_file():
            continue
        rows = json.loads(path.read_text())
        color = f"C{i}"
        ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        tr = [(r["step"], r["lm_loss"]) for r in rows if "lm_loss" in r]
        w = max(1, args.window)
        smooth = [(tr[j + w - 1][0], sum(x for _, x in tr[j:j + w]) / w) for j in range(0, len(tr) - w + 1, w)]
        ax.plot(*zip(*ev), marker="o", color=color, label=f"{LABELS[name]}: {ev[-1][1]:.3f} at step {ev[-1][0]}")
        if smooth:
            ax.plot(*zip(*smooth), color=color, alpha=0.3, linewidth=1)
        drawn += 1
    if not drawn:
        raise SystemExit(f"moc_plot: no <variant>/history.json under {args.runs} (variants: {', '.join(VARIANTS)})")
    ax.set_xlabel("training step (8 x 128 tokens)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Iso-FLOP pretraining: running held-out eval (markers), training loss (faint)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
