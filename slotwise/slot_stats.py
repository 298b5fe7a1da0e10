"""Slot-frequency statistics: how often each memory slot is read, and by how many batches.

For every memory layer, over |B| background batches:
    counts[i]   accesses of slot i (each token reads heads x knn slots; padding excluded)
    df[i]       document frequency: the number of batches in which slot i was read at least once
These are what SMF ranks against (TF-IDF: log((|B|+1)/(df+1)); KL: counts as p_bg).

Summary measures (the heal's targets):
    coverage         fraction of slots read at least once
    effective slots  exp(entropy of the access distribution) / N      (1.0 = perfectly balanced)
    median df        median over slots of df / |B|                    (small = slots are specific)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from slotwise import kernels
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

    def add_batch(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """ids (B, S, H, knn), mask (B, S) (True = real token) -> this batch's counts (N,) int64."""
        flat_ids = ids.reshape(-1, ids.shape[-2] * ids.shape[-1])  # (T, H*knn)
        flat_mask = None if mask is None else mask.reshape(-1).to(flat_ids.device)
        counts, _ = kernels.slot_histogram(flat_ids, self.n_slots, flat_mask)
        self.add_counts(counts, int(flat_ids.shape[0] if mask is None else mask.sum()))
        return counts

    def add_counts(self, counts: torch.Tensor, n_tokens: int) -> None:
        """Accumulate one batch's access counts (N,) int64: df grows by one wherever counts > 0.

        Stays on the device the statistics live on (no host sync when both are on the GPU).
        """
        self.counts += counts.to(self.counts.device)
        self.df += (counts > 0).to(self.df.device)
        self.n_batches += 1
        self.n_tokens += n_tokens

    def to(self, device: torch.device | str) -> "LayerStats":
        return LayerStats(self.n_slots, self.counts.to(device), self.df.to(device), self.n_batches, self.n_tokens)


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
            progress: str | None = None) -> tuple[dict[int, LayerStats], dict[str, LayerStats]]:
    """Run the model over the batches (input ids (B, S)) and count what the memory read.

    Returns (per layer, per value pool). A shared pool's counts sum over its layers and a batch
    counts once towards its df if any of its layers read the slot.
    """
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
        batch_counts = {i: per_layer[i].add_batch(records[0].ids, mask) for i, records in lookups.items()}
        n_tokens = batch.numel() if mask is None else int(mask.sum())
        for name, stats in shared.items():
            # one batch, several readers: counts add over the layers; df counts the batch once
            ids = groups[name]
            stats.add_counts(sum(batch_counts[i] for i in ids), n_tokens * len(ids))
    per_layer = {i: s.to("cpu") for i, s in per_layer.items()}
    per_pool = {name: shared[name].to("cpu") if name in shared else per_layer[ids[0]] for name, ids in groups.items()}
    return per_layer, per_pool
