"""Sparse memory finetuning (SMF; Lin et al. 2025, Goyal et al. 2026): train only chosen value rows.

One step on a batch (input_ids (B, S), attention_mask (B, S), labels (B, S), -100 = no loss):

    forward with record_lookups            loss, and per memory layer the slot ids (B, S, H, knn)
    count accesses                          c (N,) per value pool, summed over the layers sharing it;
                                            on the positions that carry loss (count_on="answer") or
                                            on every non-padding token (count_on="all") or
                                            on the fact's subject's tokens (count_on="subject")
    score vs the background, select         rows R = top-t accessed slots (selection.py)
    backward                                grad of the pool (dense or sparse COO)
    update rows R only                      sgd:  W[R] -= lr * g[R]                 (kernels.sparse_sgd_)
                                            adam: lazy per-row Adam on W[R], state of R only
                                                  (kernels.sparse_adam_)
    or, fused (fused_update: on, or auto on CUDA): the forward records each pool's reads, the
    backward leaves the pool without a gradient, and one fused backward + step per pool updates
    the rows of R (kernels.weighted_bag_backward_{sgd,adam}_ with row_mask R; all the layers
    sharing a pool merged into one step; slotwise.fused_update).

Every other parameter is frozen (requires_grad False) and never passed to an optimizer; rows not
in R and their Adam state are never written, so they stay bitwise identical.

"Carries loss": the causal LM loss at position s predicts labels[s + 1], so the memory reads at
position s are the ones whose output feeds that prediction directly; count_on="answer" counts
position s iff labels[:, s + 1] != -100 (and attention_mask[:, s] is 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from slotwise import kernels
from slotwise.continual.pools import Pool, value_pools
from slotwise.continual.selection import NEEDS_BACKGROUND, Background, Score, access_counts, rare_rows, select_slots, slot_scores
from slotwise.fused_update import deferred_reads, fused_enabled, pool_sinks
from slotwise.retrofit import record_lookups
from slotwise.schema import Choice, FusedUpdate, check, number, positive


class CountOn(Choice):
    answer = "answer"  # positions whose output carries loss
    all = "all"  # every non-padding token
    subject = "subject"  # the tokens of the fact's subject (the batch's subject_mask: facts with extra.subject)


class SparseOptimizer(Choice):
    adam = "adam"  # lazy per-row Adam (kernels.sparse_adam_)
    sgd = "sgd"  # kernels.sparse_sgd_


@dataclass
class SMFConfig:
    """The one SMF schema: the continual stage's `method: smf` params, the nightly update's `nightly.smf`
    and scripts/single_fact.py's --params."""
    top_t: int = positive(500)  # rows trained per pool and step
    score: Score = Score.tfidf
    count_on: CountOn = CountOn.answer
    optimizer: SparseOptimizer = SparseOptimizer.adam
    lr: float = number(1e-3, low=0, open_low=True)  # the prototypes: adam 1e-3..3e-3; sgd ~2-5 in Lin et al.
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    kl_smoothing: float = 1.0
    max_df_fraction: float | None = number(None, low=0, high=1, open_low=True)  # only rows with df <= this * |B| ("rare rows")
    seed: int = 0  # for score="random": step s uses seed + s
    fused_update: FusedUpdate = FusedUpdate.auto  # backward fused with the step (auto: on CUDA pools)

    def __post_init__(self):
        check(self, "smf")

    @property
    def needs_background(self) -> bool:
        """Whether the slot_stats table is read (tfidf / kl scores, or rare rows)."""
        return self.score in NEEDS_BACKGROUND or self.max_df_fraction is not None


def loss_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, S) bool: positions s whose output is scored by the shifted LM loss (labels[:, s+1] != -100)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    if attention_mask is not None:
        mask &= attention_mask.bool()
    return mask


def count_mask(batch: dict, count_on: str) -> torch.Tensor:
    """(B, S) bool: the tokens whose slot accesses are counted."""
    ids = batch["input_ids"]
    am = batch.get("attention_mask")
    if count_on == "answer":
        return loss_positions(batch["labels"], am)
    if count_on == "subject":
        if batch.get("subject_mask") is None:
            raise ValueError("smf.count_on='subject' needs each fact's subject (facts.jsonl extra.subject, as the "
                             "testbed writes it); these facts have none: use count_on 'answer' or 'all'")
        sm = batch["subject_mask"].bool()
        return sm & am.bool() if am is not None else sm
    return am.bool() if am is not None else torch.ones_like(ids, dtype=torch.bool)


def rows_of_grad(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """grad (N, D) dense or sparse COO, rows (R,) int64 -> dense (R, D) fp32 (zeros for untouched rows)."""
    if not grad.is_sparse:
        return grad[rows].float()
    g = grad.coalesce()
    idx, vals = g.indices()[0], g.values()  # (U,), (U, D); idx ascending after coalesce
    pos = torch.searchsorted(idx, rows).clamp(max=max(idx.numel() - 1, 0))
    out = torch.zeros(rows.numel(), grad.shape[1], dtype=torch.float32, device=grad.device)
    if idx.numel():
        found = idx[pos] == rows
        out[found] = vals[pos[found]].float()
    return out


class SparseMemoryFinetuner:
    """SMF on a retrofitted model, in place.

        smf = SparseMemoryFinetuner(model, {pool.layers[0]: Background(...)}, SMFConfig(top_t=500))
        out = smf.step(batch)   # {"loss": float, "n_selected": {layer: int}, "selected": {layer: ids}}

    backgrounds: one table per value pool, keyed by the pool's first layer index (for a pool
    shared by layers 8, 15, 22: key 8; `selection.merge_backgrounds` builds one from per-layer
    tables). May be None for score "tf" / "random".
    On construction every parameter but the value pools gets requires_grad=False.
    """

    def __init__(self, model: nn.Module, backgrounds: dict[int, Background] | None, cfg: SMFConfig):
        self.model, self.cfg = model, cfg
        self.pools: list[Pool] = value_pools(model)
        self.backgrounds = backgrounds or {}
        for pool in self.pools:
            bg = self.backgrounds.get(pool.layers[0])
            if bg is None and cfg.needs_background:
                raise ValueError(f"smf.score={cfg.score!r}: no background table for the pool of layers {list(pool.layers)} "
                                 f"(key {pool.layers[0]}; have {sorted(self.backgrounds)})")
            if bg is not None and bg.n_slots != pool.weight.shape[0]:
                raise ValueError(f"background table for layer {pool.layers[0]} has {bg.n_slots} slots, the pool has {pool.weight.shape[0]}")
        values = {id(p.weight) for p in self.pools}
        for p in model.parameters():
            p.requires_grad_(id(p) in values)
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        if cfg.optimizer == "adam":
            for pool in self.pools:
                w = pool.weight
                self.state[pool.name] = {
                    "exp_avg": torch.zeros(w.shape, dtype=torch.float32, device=w.device),  # (N, D)
                    "exp_avg_sq": torch.zeros(w.shape, dtype=torch.float32, device=w.device),  # (N, D)
                    "step": torch.zeros(w.shape[0], dtype=torch.int64, device=w.device),  # (N,) per-row
                }
        self.sinks = pool_sinks(model) if fused_enabled(cfg.fused_update, model, [p.weight for p in self.pools]) else None
        self.n_steps = 0

    def reading(self):
        """The context the step's forward runs in: on the fused path each pool's reads are recorded."""
        return deferred_reads(self.model, self.sinks)

    def pool_counts(self, lookups: dict, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Access counts (N,) per pool, summed over its layers and over every recorded forward."""
        out = {}
        for pool in self.pools:
            n = pool.weight.shape[0]
            c = torch.zeros(n, dtype=torch.int64, device=pool.weight.device)
            for layer in pool.layers:
                for rec in lookups[layer]:
                    c += access_counts(rec.ids, mask, n).to(c.device)
            out[pool.name] = c
        return out

    def select(self, counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows to train per pool: (R,) int64 ascending ids."""
        cfg, chosen = self.cfg, {}
        for pool in self.pools:
            bg = self.backgrounds.get(pool.layers[0])
            c = counts[pool.name]
            scores = slot_scores(cfg.score, c, bg, smoothing=cfg.kl_smoothing, seed=cfg.seed + self.n_steps)
            allowed = rare_rows(bg, cfg.max_df_fraction) if cfg.max_df_fraction is not None else None
            chosen[pool.name] = select_slots(scores, c, cfg.top_t, allowed)
        return chosen

    @torch.no_grad()
    def update_rows(self, chosen: dict[str, torch.Tensor], lr: float | None = None) -> None:
        """One optimizer step on rows `chosen` of each pool, from the pool's .grad (then cleared), or on
        the fused path from its recorded reads; no other row, and no other row's Adam state, is written.
        lr: None = cfg.lr. Column by column: on a column-sharded pool it updates this rank's columns of
        the same rows."""
        cfg = self.cfg
        lr = cfg.lr if lr is None else lr
        if self.sinks is not None:
            self._fused_update(chosen, lr)
            self.n_steps += 1
            return
        for pool in self.pools:
            rows, w = chosen[pool.name], pool.weight
            if rows.numel() == 0 or w.grad is None:
                w.grad = None
                continue
            g = rows_of_grad(w.grad, rows)  # (R, D)
            if cfg.optimizer == "sgd":
                kernels.sparse_sgd_(w.data, rows, g, lr)
            else:
                s = self.state[pool.name]
                kernels.sparse_adam_(w.data, s["exp_avg"], s["exp_avg_sq"], s["step"], rows, g, lr,
                                     cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay)
            w.grad = None
        self.n_steps += 1

    def _fused_update(self, chosen: dict[str, torch.Tensor], lr: float) -> None:
        cfg = self.cfg
        for pool in self.pools:
            sink, rows, w = self.sinks[id(pool.weight)], chosen[pool.name], pool.weight
            if not len(sink):  # not read in this step
                continue
            reads = sink.take()  # (ids, weights, grad_out) of every layer reading the pool
            if rows.numel() == 0:
                continue
            mask = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)  # (N,)
            mask[rows.to(w.device)] = True
            if cfg.optimizer == "sgd":
                kernels.weighted_bag_backward_sgd_(w.data, *reads, lr, row_mask=mask, return_rows=False,
                                                   need_grad_w=False)
            else:
                s = self.state[pool.name]
                kernels.weighted_bag_backward_adam_(w.data, s["exp_avg"], s["exp_avg_sq"], s["step"], *reads, lr,
                                                    cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, row_mask=mask,
                                                    return_rows=False, need_grad_w=False)

    def step(self, batch: dict) -> dict:
        cfg = self.cfg
        for pool in self.pools:
            pool.weight.grad = None
        with record_lookups(self.model) as lookups, self.reading():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
        mask = count_mask(batch, cfg.count_on)
        chosen = self.select(self.pool_counts(lookups, mask))
        out.loss.backward()
        self.update_rows(chosen)
        by_layer = {pool.layers[0]: chosen[pool.name] for pool in self.pools}
        return {
            "loss": out.loss.item(),
            "n_selected": {k: int(v.numel()) for k, v in by_layer.items()},
            "selected": by_layer,
        }
