"""Stage `slot_stats`: run a memory model over held-out background text and count the slots it reads.

    python -m slotwise.components.slot_stats --params params.yaml --model runs/train --data runs/data --out runs/slot_stats
    slotwise slot_stats --model runs/retrofit --data runs/data --out runs/slot_stats slot_stats.max_batches=20

--model is a slotwise checkpoint directory with memory layers; --data is the data stage's output
(background/stats.jsonl is read). Documents are packed into blocks of slot_stats.seq_len tokens,
batched in order (batch_size blocks per batch). A "document" of the document frequencies is one
block (slot_stats.doc_unit=sequence, as Lin et al.) or one batch (doc_unit=batch); |B| counts them.

Writes, atomically, into --out:
    table.safetensors       per value pool (and per layer of a shared pool): counts, df, |B|, model
                            and data hashes (see slotwise.slot_table)
    summary.json            per table: coverage, effective slots, read df (access-weighted df / |B|),
                            median df fraction, slots per document, top slots (no timings: the log has them)
    metrics.json            per table: coverage, effective slots, read df (for `dvc metrics show`)
    plots/usage.csv         rank-frequency points (log-spaced ranks) per table, for `dvc plots`
    plots/df_hist.csv       slots per document-frequency bin per table
    plots/rank_frequency.png, plots/df_hist.png
    params.resolved.yaml
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

import torch

from slotwise.atomic import sha256_file, staged_dir
from slotwise.checkpoint import CheckpointError, load_checkpoint, model_hash
from slotwise.components._cli import component_parser, run_cli
from slotwise.config import ConfigError, SlotStatsParams, load_params, to_yaml
from slotwise.retrofit import memory_layers
from slotwise.schema import resolve_device
from slotwise.slot_stats import LayerStats, collect, pool_groups, summarize
from slotwise.slot_table import TABLE_FILE, SlotTable, from_collect, save_table
from slotwise.text_blocks import fixed_batches, pack_blocks, read_texts

log = logging.getLogger("slotwise.slot_stats")
STATS = Path("background") / "stats.jsonl"




def stats_batches(path: Path, tokenizer, p: SlotStatsParams) -> list[torch.Tensor]:
    texts = read_texts(path, p.max_docs)
    try:
        blocks = pack_blocks(texts, tokenizer, p.seq_len)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    batches = fixed_batches(blocks, p.batch_size, p.max_batches)
    if not batches:
        raise ConfigError(f"{path}: {len(blocks)} blocks of {p.seq_len} tokens are fewer than one batch of "
                          f"slot_stats.batch_size={p.batch_size}")
    return batches


def run_slot_stats(model, batches: list[torch.Tensor], meta: dict, doc_unit: str = "sequence") -> SlotTable:
    if not memory_layers(model):
        raise CheckpointError("the model has no memory layers: nothing to count (retrofit it first: slotwise retrofit)")
    per_layer, per_pool = collect(model, batches, progress="slot stats", doc_unit=doc_unit)
    return from_collect(per_layer, per_pool, pool_groups(model), meta)


def table_summary(table: SlotTable, top: int) -> dict:
    out = {}
    for name in table.names():
        kind = "pool" if name in table.pools else "layer"
        layers = table.pool_layers[name] if kind == "pool" else [int(name.removeprefix("layer"))]
        out[name] = {"kind": kind, "layers": layers, **summarize(table[name], top=top)}
    return out


HEADLINE = ("coverage", "effective_slots", "read_df_fraction")


def headline_metrics(tables: dict) -> dict:
    """Per table: coverage, effective slots and read df, the three numbers `dvc metrics show` lists
    (summary.json has the rest)."""
    return {name: {k: s[k] for k in HEADLINE} for name, s in tables.items()}


# ---------------------------------------------------------------- plots


def rank_frequency(s: LayerStats, points: int = 200) -> list[tuple[int, float]]:
    """(rank, access fraction) at ~points log-spaced ranks (1-based) of the slots read at least once."""
    counts = s.counts.sort(descending=True).values
    n = int((counts > 0).sum())
    total = max(int(counts.sum()), 1)
    if n == 0:
        return []
    ranks = sorted({min(n, max(1, round(math.exp(math.log(n) * k / (points - 1))))) for k in range(points)})
    return [(r, int(counts[r - 1]) / total) for r in ranks]


def df_histogram(s: LayerStats, bins: int = 20) -> list[tuple[float, float, int]]:
    """(lower, upper df fraction, slots) with df/|B| in [lower, upper); the last bin includes 1."""
    frac = s.df.double() / max(s.n_batches, 1)
    hist = torch.histc(frac, bins=bins, min=0.0, max=1.0)
    return [(k / bins, (k + 1) / bins, int(hist[k])) for k in range(bins)]


def write_plots(table: SlotTable, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "usage.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "rank", "frequency"])
        for name in table.names():
            w.writerows([name, r, f"{p:.6g}"] for r, p in rank_frequency(table[name]))
    with open(out / "df_hist.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "df_fraction", "slots"])
        for name in table.names():
            w.writerows([name, f"{lo:.3f}", n] for lo, _, n in df_histogram(table[name]))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in table.names():
        pts = rank_frequency(table[name], points=400)
        if pts:
            ax.loglog([r for r, _ in pts], [p for _, p in pts], label=f"{name} ({table[name].n_slots:,} slots)")
    ax.set_xlabel("slot rank")
    ax.set_ylabel("fraction of accesses")
    ax.set_title(f"slot usage over {max(s.n_batches for s in map(table.__getitem__, table.names()))} background documents")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rank_frequency.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    names = table.names()
    width = 0.05 / max(len(names), 1) * 0.9
    for j, name in enumerate(names):
        hist = df_histogram(table[name])
        ax.bar([lo + j * width for lo, _, _ in hist], [n / table[name].n_slots for _, _, n in hist], width=width,
               align="edge", label=name)
    ax.set_xlabel("document frequency df / |B| (0 = never read)")
    ax.set_ylabel("fraction of slots")
    ax.set_title("how many background documents read each slot")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "df_hist.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = component_parser("slotwise slot_stats", __doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/train", help="slotwise checkpoint directory with memory layers")
    parser.add_argument("--data", default="runs/data", help="the data stage's output directory")
    parser.add_argument("--out", default="runs/slot_stats", help="output directory")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.overrides)
    p = params.slot_stats
    data_file = Path(args.data) / STATS
    if not data_file.is_file():
        raise FileNotFoundError(f"{data_file}: data file not found (expected the data stage's output under {args.data})")
    device = resolve_device(p.device, "slot_stats.device")
    model, tokenizer = load_checkpoint(args.model, dtype=getattr(torch, p.dtype), device=device)
    if not memory_layers(model):
        raise CheckpointError(f"{args.model}: the model has no memory layers: nothing to count (retrofit it first)")
    if tokenizer is None:
        raise CheckpointError(f"{args.model}: no tokenizer saved with the model")
    meta = {"model": str(args.model), "model_hash": model_hash(args.model), "data": str(data_file),
            "data_sha256": sha256_file(data_file),
            "params": {"seq_len": p.seq_len, "batch_size": p.batch_size, "max_batches": p.max_batches,
                       "max_docs": p.max_docs, "dtype": p.dtype, "doc_unit": p.doc_unit}}
    batches = stats_batches(data_file, tokenizer, p)
    t0 = time.perf_counter()
    table = run_slot_stats(model, batches, meta, p.doc_unit)
    seconds = time.perf_counter() - t0
    n_tokens = sum(b.numel() for b in batches)
    # Device and timings go to the log: summary.json is a cached output, the same bytes on every run.
    summary = {**meta, "n_batches": len(batches), "n_tokens": n_tokens, "tables": table_summary(table, p.top)}
    with staged_dir(args.out) as tmp:
        save_table(table, tmp / TABLE_FILE)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        (tmp / "metrics.json").write_text(json.dumps(headline_metrics(summary["tables"]), indent=2))
        write_plots(table, tmp / "plots")
        (tmp / "params.resolved.yaml").write_text(to_yaml(params))
    for name, s in summary["tables"].items():
        log.info("%-8s coverage %.3f  effective slots %.3f  read df %.3f  median df %.3f  slots/document %.3f", name,
                 s["coverage"], s["effective_slots"], s["read_df_fraction"], s["median_df_fraction"], s["slots_per_batch_fraction"])
    log.info("wrote %s (%d batches, %d tokens, %.1f s on %s, %.0f tokens/s)", args.out, len(batches), n_tokens, seconds,
             device, n_tokens / max(seconds, 1e-9))
    return 0


if __name__ == "__main__":
    run_cli(main)
