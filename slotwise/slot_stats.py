"""Slot-frequency statistics: how often each memory slot is read, and by how many batches.

For every memory layer, over |B| background documents:
    counts[i]   accesses of slot i (each token reads heads x knn slots; padding excluded)
    df[i]       document frequency: the number of documents in which slot i was read at least once
These are what SMF ranks against (TF-IDF: log((|B|+1)/(df+1)); KL: counts as p_bg).

A "document" is one batch of blocks (doc_unit="batch") or one block, i.e. one sequence of the batch
(doc_unit="sequence", as Lin et al. count against background sequences). With large batches and a
small memory every slot is in every batch, and the IDF is ~0 for all of them; per sequence it is not.
`n_batches` holds |B| whichever the unit.

Summary measures (the heal's targets):
    coverage          fraction of slots read at least once
    effective slots   exp(entropy of the access distribution) / N      (1.0 = perfectly balanced)
    read df           access-weighted mean of df / |B|: how many documents read the slot a random
                      access goes to (small = what a text reads is specific to it). This is the
                      specificity that matters for SMF; the median over *all* slots is 0 whenever
                      coverage is below 50%, whatever the slots that are read look like.
    median df         median over slots of df / |B| (kept for comparison with earlier runs)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from slotwise import kernels
from slotwise.schema import Choice
from slotwise.retrofit import memory_layers, record_lookups


@dataclass
class LayerStats:
    n_slots: int
    counts: torch.Tensor  # (N,) int64
    df: torch.Tensor  # (N,) int64
    n_batches: int = 0
    n_tokens: int = 0

    @classmethod
    def empty(cls, n_slots: int) -> "LayerStats":
        return cls(n_slots, torch.zeros(n_slots, dtype=torch.long), torch.zeros(n_slots, dtype=torch.long))

    def add_batch(self, ids: torch.Tensor, mask: torch.Tensor | None, doc_unit: str = "batch") -> torch.Tensor:
        """ids (B, S, H, knn), mask (B, S) (True = real token) -> this batch's counts (N,) int64.

        doc_unit "batch": the batch is one document; "sequence": each of its B rows is one."""
        counts = batch_counts(ids, mask, self.n_slots)
        n_tokens = int(ids.shape[0] * ids.shape[1] if mask is None else mask.sum())
        if doc_unit == "batch":
            self.add_counts(counts, n_tokens)
        else:
            present = torch.zeros_like(counts)
            for b in range(ids.shape[0]):  # one histogram per sequence: its slots count once towards df
                present += batch_counts(ids[b:b + 1], None if mask is None else mask[b:b + 1], self.n_slots) > 0
            self.add_counts(counts, n_tokens, present=present, n_docs=ids.shape[0])
        return counts

    def add_counts(self, counts: torch.Tensor, n_tokens: int, present: torch.Tensor | None = None, n_docs: int = 1) -> None:
        """Accumulate counts (N,) int64 of n_docs documents; present (N,): in how many of them each
        slot was read (default: one document, present wherever counts > 0).

        Stays on the device the statistics live on (no host sync when both are on the GPU).
        """
        self.counts += counts.to(self.counts.device)
        self.df += (counts > 0 if present is None else present).to(self.df.device)
        self.n_batches += n_docs
        self.n_tokens += n_tokens

    def to(self, device: torch.device | str) -> "LayerStats":
        return LayerStats(self.n_slots, self.counts.to(device), self.df.to(device), self.n_batches, self.n_tokens)


class DocUnit(Choice):
    """What one "document" of the document frequencies is."""
    sequence = "sequence"  # one block of the batch (Lin et al. count against background sequences)
    batch = "batch"  # one whole batch


def batch_counts(ids: torch.Tensor, mask: torch.Tensor | None, n_slots: int) -> torch.Tensor:
    """ids (B, S, H, knn), mask (B, S) or None -> access counts (N,) int64 (masked tokens excluded)."""
    flat_ids = ids.reshape(-1, ids.shape[-2] * ids.shape[-1])  # (T, H*knn)
    flat_mask = None if mask is None else mask.reshape(-1).to(flat_ids.device)
    counts, _ = kernels.slot_histogram(flat_ids, n_slots, flat_mask)
    return counts


def read_df_fraction(s: LayerStats) -> float:
    """Access-weighted mean of df / |B| over the slots read: sum_i c_i df_i / (sum_i c_i * |B|)."""
    total = s.counts.double().sum()
    if total == 0 or s.n_batches == 0:
        return 0.0
    return float((s.counts.double() * s.df.double()).sum() / (total * s.n_batches))


def summarize(s: LayerStats, top: int = 10) -> dict:
    total = s.counts.sum().item()
    p = s.counts.double() / max(total, 1)
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum()) if total else 0.0
    df_frac = s.df.double() / max(s.n_batches, 1)
    top_counts, top_ids = s.counts.topk(min(top, s.n_slots))
    return {
        "n_slots": s.n_slots,
        "n_batches": s.n_batches,
        "n_tokens": s.n_tokens,
        "accesses": int(total),
        "coverage": float((s.counts > 0).double().mean()),
        "effective_slots": float(torch.tensor(entropy).exp() / s.n_slots),
        "read_df_fraction": read_df_fraction(s),
        "median_df_fraction": float(df_frac.median()),
        "mean_df_fraction": float(df_frac.mean()),
        "slots_per_batch_fraction": float(s.df.sum() / max(s.n_batches, 1) / s.n_slots),
        "top_slots": [[int(i), int(c)] for i, c in zip(top_ids, top_counts)],
    }


def pool_groups(model) -> dict[str, list[int]]:
    """Value pools and the layers that read them: {"layer8": [8], ...} or {"shared": [8, 15, 22]}."""
    groups: dict[int, list[int]] = {}
    for i, mem in memory_layers(model).items():
        groups.setdefault(id(mem.values.weight), []).append(i)
    return {(f"layer{ids[0]}" if len(ids) == 1 else "shared"): ids for ids in groups.values()}


@torch.no_grad()
def collect(model, batches: list[torch.Tensor], masks: list[torch.Tensor] | None = None,
            progress: str | None = None, doc_unit: str = "batch") -> tuple[dict[int, LayerStats], dict[str, LayerStats]]:
    """Run the model over the batches (input ids (B, S)) and count what the memory read.

    Returns (per layer, per value pool). A shared pool's counts sum over its layers and a document
    counts once towards its df if any of its layers read the slot.
    """
    doc_unit = DocUnit(doc_unit)
    layers = memory_layers(model)
    if not layers:
        raise ValueError("the model has no memory layers (retrofit it first)")
    groups = pool_groups(model)
    device = next(model.parameters()).device
    # Accumulate where the ids are (one histogram per layer and batch, no host round trip).
    per_layer = {i: LayerStats.empty(m.n_slots).to(device) for i, m in layers.items()}
    shared = {name: LayerStats.empty(layers[ids[0]].n_slots).to(device) for name, ids in groups.items() if len(ids) > 1}
    for b, batch in enumerate(tqdm(batches, desc=progress, disable=progress is None)):
        mask = None if masks is None else masks[b]
        with record_lookups(model) as lookups:
            model(batch.to(device), attention_mask=None if mask is None else mask.to(device))
        counts = {i: per_layer[i].add_batch(records[0].ids, mask, doc_unit) for i, records in lookups.items()}
        n_tokens = batch.numel() if mask is None else int(mask.sum())
        for name, stats in shared.items():
            # one document, several readers: counts add over the layers; df counts the document once
            ids = groups[name]
            if doc_unit == "batch":
                stats.add_counts(sum(counts[i] for i in ids), n_tokens * len(ids))
            else:
                both = torch.cat([lookups[i][0].ids for i in ids], dim=-2)  # (B, S, layers * H, knn)
                present = torch.zeros_like(counts[ids[0]])
                for b in range(both.shape[0]):
                    present += batch_counts(both[b:b + 1], None if mask is None else mask[b:b + 1], stats.n_slots) > 0
                stats.add_counts(sum(counts[i] for i in ids), n_tokens * len(ids), present=present, n_docs=both.shape[0])
    per_layer = {i: s.to("cpu") for i, s in per_layer.items()}
    per_pool = {name: shared[name].to("cpu") if name in shared else per_layer[ids[0]] for name, ids in groups.items()}
    return per_layer, per_pool
