"""Slot statistics from a run on several ranks: the same table as slot_stats.collect in one process.

    per_layer, per_pool = collect_sharded(model, batches, dist, doc_unit="sequence")

Every rank runs every batch's rows that are its own (Dist.rows: the same split as training), so
the memory layers' collectives stay in step even when the value pools are column-sharded. Counts
and document frequencies are integers and add exactly over ranks:

    counts              each rank counts its rows; all-reduced (sum) once at the end
    df, doc_unit=sequence  a document is one row: each rank adds its rows' presence; summed at the end
    df, doc_unit=batch     a document is the whole batch, spread over the ranks: a slot is present if
                        any rank read it, so the batch's presence is all-reduced (max) per batch
                        (N bytes per table and batch) before it is added
    n_batches, n_tokens    |B| and tokens of the global batches (the same on every rank after the sum)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from slotwise.distributed import Dist
from slotwise.retrofit import memory_layers, record_lookups
from slotwise.slot_stats import DocUnit, LayerStats, batch_counts, pool_groups


def _presence(ids: torch.Tensor, mask: torch.Tensor | None, n_slots: int, doc_unit: DocUnit, d: Dist) -> torch.Tensor:
    """ids (B_r, S, H', knn) -> (N,) int64: in how many documents of this batch each slot was read
    (this rank's rows for sequences; the whole batch, over all ranks, for doc_unit batch)."""
    if doc_unit == "batch":
        present = (batch_counts(ids, mask, n_slots) > 0).to(torch.int32)
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=d.group)
        return present.long()
    present = torch.zeros(n_slots, dtype=torch.int64, device=ids.device)
    for b in range(ids.shape[0]):
        present += batch_counts(ids[b:b + 1], None if mask is None else mask[b:b + 1], n_slots) > 0
    return present


@torch.no_grad()
def collect_sharded(model, batches: list[torch.Tensor], d: Dist, masks: list[torch.Tensor] | None = None,
                    progress: str | None = None, doc_unit: DocUnit = "batch") -> tuple[dict[int, LayerStats], dict[str, LayerStats]]:
    """slot_stats.collect over the global batches (input ids (B, S)), each rank running its rows.
    Returns the same (per layer, per value pool) on every rank."""
    doc_unit = DocUnit(doc_unit)
    layers = memory_layers(model)
    if not layers:
        raise ValueError("the model has no memory layers (retrofit it first)")
    groups = pool_groups(model)
    device = next(model.parameters()).device
    tables = {("layer", i): LayerStats.empty(m.n_slots).to(device) for i, m in layers.items()}
    tables.update({("pool", name): LayerStats.empty(layers[ids[0]].n_slots).to(device)
                   for name, ids in groups.items() if len(ids) > 1})
    for b, batch in enumerate(tqdm(batches, desc=progress, disable=progress is None or not d.is_main)):
        if batch.shape[0] < d.world:
            raise ValueError(f"batch {b} has {batch.shape[0]} rows, fewer than the {d.world} ranks")
        rows = d.rows(batch)
        mask = None if masks is None else d.rows(masks[b]).to(device)
        with record_lookups(model) as lookups:
            model(rows.to(device), attention_mask=mask)
        n_tokens = rows.numel() if mask is None else int(mask.sum())
        n_docs = 1 if doc_unit == "batch" else rows.shape[0]
        for (kind, key), stats in tables.items():
            ids = [key] if kind == "layer" else groups[key]
            both = torch.cat([lookups[i][0].ids for i in ids], dim=-2)  # (B_r, S, layers * H, knn)
            counts = batch_counts(both, mask, stats.n_slots)
            stats.add_counts(counts, n_tokens * len(ids), present=_presence(both, mask, stats.n_slots, doc_unit, d), n_docs=n_docs)
    for stats in tables.values():  # add the ranks' counts (and their sequences' presence) once
        dist.all_reduce(stats.counts, group=d.group)
        if doc_unit == "sequence":
            dist.all_reduce(stats.df, group=d.group)
        totals = torch.tensor([stats.n_tokens, stats.n_batches if doc_unit == "sequence" else 0], device=device)
        dist.all_reduce(totals, group=d.group)
        stats.n_tokens = int(totals[0])
        if doc_unit == "sequence":
            stats.n_batches = int(totals[1])
    per_layer = {i: tables[("layer", i)].to("cpu") for i in layers}
    per_pool = {name: tables[("pool", name)].to("cpu") if len(ids) > 1 else per_layer[ids[0]] for name, ids in groups.items()}
    return per_layer, per_pool
