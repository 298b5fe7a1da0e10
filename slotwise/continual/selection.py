"""Slot scoring and selection for sparse memory finetuning (SMF).

For one memory layer (or one value pool shared by several layers) with N slots:

    c (N,)        the batch's access counts: how many (token, head, k) lookups read slot i,
                  padding (and, if asked, every token that carries no loss) excluded
    counts_bg (N,), df (N,), |B|
                  the background table (slot_stats stage): total accesses over |B| background
                  batches, and in how many of those batches slot i was read at least once

Scores (higher = more specific to this batch), every one 0 where c(i) = 0:

    tf     c(i) / sum c
    tfidf  c(i) / sum c * log((|B| + 1) / (df(i) + 1))               Lin et al. 2025
    kl     p(i) * log(p(i) / q(i)),  p(i) = c(i) / sum c,            Goyal et al. 2026
           q(i) = (counts_bg(i) + s) / (sum counts_bg + s * N)     (additive smoothing s > 0)
    random uniform(0, 1) from a seeded generator (a control: which slots does not matter?)

`select_slots` returns the top-t *accessed* slots (never one with c = 0), optionally only among
the "rare rows" whose background document frequency is at most max_df_fraction * |B|.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slotwise import kernels
from slotwise.checkpoint import model_hash
from slotwise.schema import Choice
from slotwise.slot_table import TABLE_FILE, load_table

class Score(Choice):
    tfidf = "tfidf"
    kl = "kl"
    tf = "tf"
    random = "random"


SCORES = Score.values()
NEEDS_BACKGROUND = (Score.tfidf, Score.kl)


@dataclass
class Background:
    """A slot-frequency table for one value pool: what the background corpus reads."""

    counts: torch.Tensor  # (N,) total accesses over the background batches
    df: torch.Tensor  # (N,) number of background batches that read the slot at least once
    n_batches: int  # |B|

    def __post_init__(self):
        if self.counts.shape != self.df.shape or self.counts.dim() != 1:
            raise ValueError(f"background counts {tuple(self.counts.shape)} and df {tuple(self.df.shape)} must be equal 1-d shapes")
        if self.n_batches < 1:
            raise ValueError(f"background n_batches must be >= 1, got {self.n_batches}")

    @property
    def n_slots(self) -> int:
        return self.counts.shape[0]


def load_backgrounds(stats_dir: str | Path, model_dir: str | Path) -> dict[int, Background]:
    """The slot_stats stage's table as SMF's backgrounds, keyed by each value pool's first layer;
    refuses a table made for another model (SlotTableError)."""
    table = load_table(Path(stats_dir) / TABLE_FILE, expect_model_hash=model_hash(model_dir))
    return {table.pool_layers[name][0]: Background(s.counts, s.df, s.n_batches) for name, s in table.pools.items()}


def merge_backgrounds(tables: list[Background]) -> Background:
    """One table for a value pool shared by several layers, from the per-layer tables.

    Counts add exactly. A shared pool's df is the number of batches in which *any* of the layers
    read the slot; per-layer tables only bound it, max_l df_l <= df <= min(|B|, sum_l df_l). We
    take the upper bound (a slot looks at most as rare as it may be). A slot_stats table written
    per pool is exact and preferable.
    """
    if len({t.n_batches for t in tables}) != 1:
        raise ValueError(f"background tables disagree on |B|: {[t.n_batches for t in tables]}")
    n = tables[0].n_batches
    counts = sum(t.counts for t in tables)
    df = torch.clamp(sum(t.df for t in tables), max=n)
    return Background(counts, df, n)


def access_counts(ids: torch.Tensor, mask: torch.Tensor | None, n_slots: int) -> torch.Tensor:
    """ids (B, S, H, knn) from one forward, mask (B, S) bool (True = count) -> counts (N,) int64."""
    B, S = ids.shape[:2]
    flat = ids.reshape(B * S, -1)  # (T, H * knn)
    counts, _ = kernels.slot_histogram(flat, n_slots, None if mask is None else mask.reshape(B * S).to(flat.device))
    return counts


def tf_scores(counts: torch.Tensor) -> torch.Tensor:
    """c (N,) -> c / sum c (N,) float; all zeros when nothing was counted."""
    c = counts.double()
    total = c.sum()
    return c / total if total > 0 else c


def tfidf_scores(counts: torch.Tensor, bg: Background) -> torch.Tensor:
    """c(i)/sum c * log((|B|+1)/(df(i)+1)) (N,) float64."""
    idf = torch.log((bg.n_batches + 1) / (bg.df.to(counts.device).double() + 1))
    return tf_scores(counts) * idf


def kl_scores(counts: torch.Tensor, bg: Background, smoothing: float = 1.0) -> torch.Tensor:
    """p(i) log(p(i)/q(i)) (N,) float64, with q the additively smoothed background distribution.

    The scores sum to KL(p || q); a slot read rarely in the background but often in the batch
    scores high. Slots with c(i) = 0 score 0 (0 log 0 = 0).
    """
    if smoothing <= 0:
        raise ValueError(f"kl smoothing must be > 0 (q would be 0 for unseen slots), got {smoothing}")
    p = tf_scores(counts)
    bgc = bg.counts.to(counts.device).double()
    q = (bgc + smoothing) / (bgc.sum() + smoothing * bg.n_slots)
    out = torch.zeros_like(p)
    hit = p > 0
    out[hit] = p[hit] * torch.log(p[hit] / q[hit])
    return out


def random_scores(counts: torch.Tensor, seed: int) -> torch.Tensor:
    """uniform(0, 1) scores from a generator seeded with `seed` (N,) float64; 0 where c = 0."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(counts.shape[0], generator=g, dtype=torch.float64).to(counts.device)
    return torch.where(counts > 0, r, torch.zeros_like(r))


def slot_scores(method: str, counts: torch.Tensor, bg: Background | None, *, smoothing: float = 1.0,
                seed: int = 0) -> torch.Tensor:
    """Dispatch on method (one of SCORES) -> scores (N,) float64."""
    if method not in SCORES:
        raise ValueError(f"slot score must be one of {SCORES}, got {method!r}")
    if method in NEEDS_BACKGROUND:
        if bg is None:
            raise ValueError(f"slot score {method!r} needs a background table (slot_stats)")
        if bg.n_slots != counts.shape[0]:
            raise ValueError(f"background table has {bg.n_slots} slots, the memory has {counts.shape[0]}")
    if method == "tf":
        return tf_scores(counts)
    if method == "tfidf":
        return tfidf_scores(counts, bg)
    if method == "kl":
        return kl_scores(counts, bg, smoothing)
    return random_scores(counts, seed)


def rare_rows(bg: Background, max_df_fraction: float) -> torch.Tensor:
    """(N,) bool: slots whose background document frequency df(i) <= max_df_fraction * |B|."""
    return bg.df <= max_df_fraction * bg.n_batches + 1e-9


def select_slots(scores: torch.Tensor, counts: torch.Tensor, top_t: int,
                 allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The top_t accessed slots by score -> slot ids (t',) int64 in ascending id order, t' <= top_t.

    Only slots with counts > 0 (and allowed, if given) are candidates; ties go to the lower id,
    so the choice is deterministic. Fewer than top_t candidates -> all of them.
    """
    if top_t < 0:
        raise ValueError(f"top_t must be >= 0, got {top_t}")
    candidate = counts > 0
    if allowed is not None:
        candidate &= allowed.to(candidate.device)
    ids = candidate.nonzero().squeeze(1)  # (C,) ascending
    if ids.numel() > top_t:
        order = torch.sort(scores[ids], descending=True, stable=True).indices[:top_t]
        ids = ids[order].sort().values
    return ids

