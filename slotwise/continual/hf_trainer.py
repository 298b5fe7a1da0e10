"""Sparse memory finetuning as a torch optimizer, for transformers.Trainer, accelerate or any training loop.

    from slotwise.continual.hf_trainer import SparseMemoryOptimizer
    from slotwise.continual.smf import SMFConfig

    opt = SparseMemoryOptimizer(model, SMFConfig(top_t=500, lr=2e-3), backgrounds=load_backgrounds(stats, ckpt))
    args = TrainingArguments(..., lr_scheduler_type="constant", max_grad_norm=0)
    Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None)).train()
    opt.close()                    # or: with SparseMemoryOptimizer(...) as opt: ...

SMF picks the rows to train from what the step's forward read, on the tokens that carry loss: the
selection needs the slot lookups and the labels, which an optimizer does not see. So the optimizer
watches the model:

    forward pre-hook on the model    the forward's labels and attention mask (keyword or positional)
    forward hooks on memory layers   the slot ids every memory layer read (record_lookups)
    forward hook on the model        -> access counts per value pool, added up until step()
                                        (so gradient-accumulation micro-batches count together)
    step()                           top-t rows per pool by the configured score (tfidf | kl | tf |
                                     random) and a sparse SGD / Adam step on those rows only
                                     (SparseMemoryFinetuner.update_rows), at the scheduler's lr

Only training-mode forwards are counted (Trainer's evaluation forwards are not). On construction
every parameter but the value pools is frozen; rows that are not selected, and their Adam state,
are never written, so they stay bitwise identical. Set the Trainer's max_grad_norm to 0: clipping
would scale the selected rows' update by the norm of the whole pool's gradient. The model may be
a retrofitted base model or a SlotwiseForCausalLM loaded through transformers with slotwise installed.
The pools take their gradient from the loop's backward: smf.fused_update 'auto' runs unfused here.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn

from slotwise.continual.selection import Background
from slotwise.continual.smf import SMFConfig, SparseMemoryFinetuner, count_mask
from slotwise.retrofit import record_lookups
from slotwise.schema import FusedUpdate


class SparseMemoryOptimizer(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, cfg: SMFConfig, backgrounds: dict[int, Background] | None = None):
        if cfg.fused_update == FusedUpdate.on:
            raise ValueError("SparseMemoryOptimizer: smf.fused_update='on' is not supported (the Trainer's backward "
                             "gives the pools their gradient); use 'auto' or 'off'")
        # the gradient path: the loop outside runs the forward and backward, this optimizer only steps
        cfg = dataclasses.replace(cfg, fused_update=FusedUpdate.off)
        self.smf = SparseMemoryFinetuner(model, backgrounds, cfg)  # freezes all but the value pools
        super().__init__([pool.weight for pool in self.smf.pools], {"lr": cfg.lr})
        self.model = model
        self.counts: dict[str, torch.Tensor] = {}  # pool name -> (N,) accesses since the last step
        self.selected: dict[int, torch.Tensor] = {}  # the last step's rows, by the pool's first layer
        self._batch: dict | None = None
        self._stack = contextlib.ExitStack()
        self._lookups = self._stack.enter_context(record_lookups(model))
        for handle in (model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                       model.register_forward_hook(self._after_forward)):
            self._stack.callback(handle.remove)

    def _clear_lookups(self) -> None:
        for records in self._lookups.values():
            records.clear()

    def _before_forward(self, module, args, kwargs):
        self._clear_lookups()  # anything read outside a model forward (e.g. checkpoint recomputation)
        self._batch = None
        if not module.training:
            return
        batch = {"input_ids": kwargs.get("input_ids", args[0] if args else None),
                 "attention_mask": kwargs.get("attention_mask"), "labels": kwargs.get("labels")}
        if batch["input_ids"] is None:
            raise ValueError("SparseMemoryOptimizer: the model was called without input_ids; SMF counts slot reads per token")
        if self.smf.cfg.count_on == "answer" and batch["labels"] is None:
            raise ValueError("SparseMemoryOptimizer: count_on='answer' needs labels in the model's forward "
                             "(the tokens that carry loss); pass labels or use count_on='all'")
        self._batch = batch

    def _after_forward(self, module, args, output):
        if self._batch is not None:
            mask = count_mask(self._batch, self.smf.cfg.count_on)  # (B, S)
            for name, c in self.smf.pool_counts(self._lookups, mask).items():
                self.counts[name] = self.counts[name] + c if name in self.counts else c
        self._batch = None
        self._clear_lookups()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.counts:
            raise RuntimeError("SparseMemoryOptimizer.step: no training forward of the model since the last step "
                               "(the model must be called in training mode, with the optimizer's hooks in place)")
        chosen = self.smf.select(self.counts)
        self.smf.update_rows(chosen, lr=self.param_groups[0]["lr"])
        self.selected = {pool.layers[0]: chosen[pool.name] for pool in self.smf.pools}
        self.counts = {}
        return loss

    def state_dict(self) -> dict:
        return {"smf_state": self.smf.state, "n_steps": self.smf.n_steps,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        for name, tensors in state_dict["smf_state"].items():
            for key, t in tensors.items():
                self.smf.state[name][key].copy_(t)
        self.smf.n_steps = state_dict["n_steps"]
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)

    def close(self) -> None:
        """Remove the hooks from the model."""
        self._stack.close()

    def __enter__(self) -> "SparseMemoryOptimizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
