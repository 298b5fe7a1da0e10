"""The training loop shared by heal, SFT and pretraining: resumable to the same final weights.

State that a restart needs lives in a state directory, written atomically every `save_every`
steps: the trainable parameters (safetensors), optimizer and scheduler states and the torch RNG
state (trainer.pt, read with torch.load(weights_only=True): tensors and plain containers, never
arbitrary pickled objects), and in state.json the run's fingerprint, the step, the early-stopping
record, the history and Python's RNG state. The fingerprint is checked before anything else is read. Batches are a pure function of (seed, step)
(see text_blocks.BlockSchedule), so a run killed at any point and restarted reaches the same
weights as one that never stopped.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from slotwise.atomic import staged_dir
from slotwise.distributed import Dist
from slotwise.errors import CheckpointError, DivergedError
from slotwise.fused_update import deferred_reads, fused_enabled, pool_sinks
from slotwise.optim import OptimParams, build_optimizers, build_schedulers, trainable_groups
from slotwise.retrofit import record_lookups
from slotwise.schema import Choice, number, positive

log = logging.getLogger("slotwise.train")


class Trainable(Choice):
    memory = "memory"  # the memory layers only
    all = "all"  # every weight


@dataclass
class LoopParams:
    max_steps: int = positive(60)
    eval_every: int = positive(20)
    early_stop_patience: int | None = positive(3)  # evals without improvement before stopping; None: never
    max_minutes: float | None = number(None, low=0)  # time budget: stop (keeping the best weights) after this many minutes
    save_every: int = positive(10)
    seed: int = 0
    balance_weight: float = number(0.03, low=0)  # sub-key balancing loss (0 disables)
    # Distillation for memories that REPLACE an FFN: each memory's output is also regressed onto
    # the removed FFN's output on the same input (the base model's FFN, frozen; a dense per-token
    # target the LM loss alone gives only through the layers above). 0 disables.
    distil_weight: float = number(0.0, low=0)
    trainable: Trainable = Trainable.memory
    optim: OptimParams = field(default_factory=OptimParams)


Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels


def lm_loss(model, batch: Batch, balance_weight: float, teachers: dict[int, torch.nn.Module] | None = None,
            distil_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Next-token loss (+ the memory's balancing loss, read from what each layer returned, + the
    distillation loss of replaced FFNs when teachers are given)."""
    with record_lookups(model) as lookups, ffn_distillation(model, teachers if distil_weight else None) as distil:
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
    loss = out.loss
    stats = {"lm_loss": loss.item()}
    balances = [r.balance for recs in lookups.values() for r in recs if r.balance is not None]
    if balance_weight and balances:
        balance = torch.stack(balances).mean()
        loss = loss + balance_weight * balance
        stats["balance"] = balance.item()
    if distil:
        d = torch.stack(distil).mean()
        loss = loss + distil_weight * d
        stats["distil"] = d.item()
    return loss, stats


@contextlib.contextmanager
def ffn_distillation(model, teachers: dict[int, torch.nn.Module] | None):
    """Collect, for every forward inside the block, each teached memory layer's relative error
    ||memory(x) - ffn(x)||^2 / mean ||ffn(x)||^2 (mean over tokens), ffn the frozen teacher FFN
    of that decoder layer and x the input both see. Yields the list the losses land in."""
    losses: list[torch.Tensor] = []
    if not teachers:
        yield losses
        return
    from slotwise.retrofit import decoder_layers

    def hook(teacher):
        def fn(_module, inputs, output):
            with torch.no_grad():
                target = teacher(inputs[0])  # (B, S, d)
            err = (output.float() - target.float()).pow(2).sum(-1)  # (B, S)
            losses.append(err.mean() / target.float().pow(2).sum(-1).mean().clamp_min(1e-12))
        return fn

    layers = decoder_layers(model)
    handles = [layers[i].mlp.register_forward_hook(hook(t)) for i, t in teachers.items()]
    try:
        yield losses
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def eval_loss(model, batches: list[Batch], dist: Dist | None = None) -> float:
    """Mean next-token loss per token over fixed held-out batches (with dist: each rank runs its rows
    of every batch and the sums are added over ranks)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        b = dist.shard_batch(b) if dist is not None else b
        logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits[:, :-1]
        labels = b["labels"][:, 1:]
        mask = labels != -100
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1), reduction="none")
        total += (nll * mask.reshape(-1)).sum().item()
        n += int(mask.sum())
    model.train(was_training)
    if dist is not None:
        total, n = dist.sum([total, n])
    return total / max(n, 1)


def _trainable_state(model, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().clone().contiguous() for n in names}


def _load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


STATE_FORMAT = 1


def _python_rng(state) -> tuple:
    """random.getstate() after a JSON round trip (lists) -> the tuples random.setstate wants."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _read_state(state_dir: Path, fingerprint: str | None) -> tuple[dict, dict] | None:
    """(state.json, trainer.pt) of a resumable state written under this fingerprint, else None.

    trainer.pt is only opened once state.json says the state is this run's, and then without
    unpickling arbitrary objects; one that does not load is refused (CheckpointError)."""
    meta_path, tensors_path = state_dir / "state.json", state_dir / "trainer.pt"
    if not state_dir.is_dir() or not any(state_dir.iterdir()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        assert isinstance(meta, dict) and meta.get("format") == STATE_FORMAT and isinstance(meta.get("record"), dict)
    except (OSError, ValueError, AssertionError):
        log.warning("%s holds no state of this slotwise version (no valid state.json); starting over", state_dir)
        return None
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        log.warning("%s holds the state of another run (other params, model or data); starting over", state_dir)
        return None
    try:
        tensors = torch.load(tensors_path, weights_only=True, map_location="cpu")
        assert isinstance(tensors, dict) and {"optimizers", "schedulers", "torch_rng"} <= tensors.keys()
    except Exception as exc:  # noqa: BLE001 - a foreign pickle (refused by weights_only), a truncated file, ...
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"{tensors_path}: not a loadable training state ({reason}); delete {state_dir} to start over") from None
    return meta, tensors


def train(model, batch_at: Callable[[int], Batch], eval_batches: list[Batch], p: LoopParams, state_dir: str | Path,
          device: torch.device | str = "cpu", progress: bool = True, fingerprint: str | None = None,
          dist: Dist | None = None, teachers: dict[int, torch.nn.Module] | None = None,
          on_entry: Callable[[dict], None] | None = None) -> dict:
    """Train in place for p.max_steps (resuming from state_dir if it holds a state); return the record.

    On return the model holds the best weights seen on eval_batches (early stopping), and the record
    has the history and the best step (wall time goes to the log, not the record: the record is
    saved with the checkpoint, whose bytes must not depend on the machine's speed). fingerprint:
    what the run is (params, starting model, data); a state written under another fingerprint is
    discarded, not resumed. on_entry: called with every history entry ({"step", "lm_loss", ...,
    "eval_loss" at evaluations}) in order; a resumed run first replays the entries it restored, so
    a logger always sees the whole history (the stage passes dvclive's, see components/_live.py).
    teachers: {decoder layer: frozen FFN} for p.distil_weight (see ffn_distillation).

    dist (slotwise.distributed, a run under torchrun): `model` is wrapped for data parallelism
    (slotwise.distributed.training.prepare) and batch_at / eval_batches still give the global
    batches; each rank trains on its rows, and keeps its own resumable state in
    state_dir/rank<r>-of-<W> (a restart resumes at the same world size).
    """
    if p.distil_weight and not teachers:
        raise ValueError("train.loop.distil_weight > 0 needs teacher FFNs (memory layers in mode: replace)")
    state_dir = Path(state_dir)
    if dist is not None:
        state_dir = state_dir / f"rank{dist.rank}-of-{dist.world}"
        progress = progress and dist.is_main
    groups = trainable_groups(model, p.trainable)
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    dense = [q for q in groups["memory"] + groups["base"]]
    sparse_values = any(m.cfg.sparse_grad for m in _memories(model))
    if not sparse_values and dist is None:
        dense += groups["values"]
    # sparse pools on the fused path: no pool gradient, one fused backward + SparseAdam step per pool
    fused = sparse_values and fused_enabled(p.optim.fused_update, model, groups["values"])
    sinks = pool_sinks(model) if fused else None
    opts = build_optimizers(model, groups, p.optim, sinks)
    scheds = build_schedulers(opts, p.max_steps, p.optim)
    torch.manual_seed(p.seed)
    random.seed(p.seed)
    record = {"history": [], "best_step": 0, "best_eval_loss": None, "evals_without_improvement": 0, "step": 0}
    best_state = None
    saved = _read_state(state_dir, fingerprint)
    if saved is None and state_dir.exists():
        clear_state(state_dir)
    if saved is not None:
        meta, tensors = saved
        _load_trainable(model, load_file(state_dir / "trainable.safetensors"))
        for k, o in opts.items():
            o.load_state_dict(tensors["optimizers"][k])
            scheds[k].load_state_dict(tensors["schedulers"][k])
        torch.set_rng_state(tensors["torch_rng"])
        random.setstate(_python_rng(meta["python_rng"]))
        record = meta["record"]
        if (state_dir / "best.safetensors").is_file():
            best_state = load_file(state_dir / "best.safetensors")
        log.info("resumed from %s at step %d", state_dir, record["step"])
        for entry in record["history"] if on_entry else []:
            on_entry(entry)

    def save_state():
        with staged_dir(state_dir) as tmp:
            save_file(_trainable_state(model, names), tmp / "trainable.safetensors")
            if best_state is not None:
                save_file(best_state, tmp / "best.safetensors")
            torch.save({"optimizers": {k: o.state_dict() for k, o in opts.items()},
                        "schedulers": {k: s.state_dict() for k, s in scheds.items()},
                        "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({"format": STATE_FORMAT, "fingerprint": fingerprint, "record": record,
                                                         "python_rng": random.getstate()}))

    if record["step"] == 0 and not record["history"]:
        record["best_eval_loss"] = eval_loss(model, eval_batches, dist)
        record["history"].append({"step": 0, "eval_loss": record["best_eval_loss"]})
        if on_entry:
            on_entry(record["history"][-1])
        best_state = _trainable_state(model, names)
    model.train()
    bar = tqdm(total=p.max_steps, initial=record["step"], desc="train", disable=not progress)
    t_start, steps_here = time.perf_counter(), 0
    try:
        while record["step"] < p.max_steps:
            step = record["step"]
            batch = batch_at(step) if dist is None else dist.shard_batch(batch_at(step))
            batch = {k: v.to(device) for k, v in batch.items()}
            with deferred_reads(model, sinks):
                loss, stats = lm_loss(model, batch, p.balance_weight, teachers, p.distil_weight)
            if dist is not None:  # the record holds the global batch's loss: the mean of the ranks' means
                stats["lm_loss"] = dist.sum([stats["lm_loss"]])[0] / dist.world
            # with dist: the global batch's loss, so every rank stops at the same step
            _finite_or_stop("training", loss.item() if dist is None else stats["lm_loss"], step + 1)
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            loss.backward()
            if p.optim.grad_clip and dist is not None:  # the sharded pools' columns count once
                stats["grad_norm"] = dist.clip_grad_norm_(dense, [] if sparse_values else groups["values"], p.optim.grad_clip)
            elif p.optim.grad_clip and dense:
                stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(dense, p.optim.grad_clip))
            for k in opts:
                opts[k].step()
                scheds[k].step()
            record["step"] = step + 1
            steps_here += 1
            entry = {"step": step + 1, **stats}
            out_of_time = p.max_minutes is not None and time.perf_counter() - t_start > 60 * p.max_minutes
            if dist is not None and p.max_minutes is not None:  # every rank stops at the same step
                out_of_time = dist.sum([float(out_of_time)])[0] > 0
            if (step + 1) % p.eval_every == 0 or step + 1 == p.max_steps or out_of_time:  # the last steps count too
                ev = eval_loss(model, eval_batches, dist)
                _finite_or_stop("held-out", ev, step + 1)
                entry["eval_loss"] = ev
                if ev < record["best_eval_loss"]:
                    record.update(best_eval_loss=ev, best_step=step + 1, evals_without_improvement=0)
                    best_state = _trainable_state(model, names)
                else:
                    record["evals_without_improvement"] += 1
            record["history"].append(entry)
            if on_entry:
                on_entry(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['lm_loss']:.3f}", **({"eval": f"{entry['eval_loss']:.3f}"} if "eval_loss" in entry else {}))
            stop = p.early_stop_patience is not None and record["evals_without_improvement"] >= p.early_stop_patience
            if out_of_time:
                stop = True
                record["stopped_at_time_budget"] = step + 1
                log.info("stopping at step %d: the time budget of %.1f minutes is spent", step + 1, p.max_minutes)
            if stop:
                record["stopped_early_at"] = step + 1
                record["step"] = p.max_steps  # a resumed run must not continue past an early stop
            if (step + 1) % p.save_every == 0 or record["step"] >= p.max_steps:
                save_state()
            if stop:
                if not out_of_time:
                    log.info("early stop at step %d: held-out loss has not improved for %d evals", step + 1, p.early_stop_patience)
                break
    finally:  # a failure ends the bar's line, so the error message gets its own
        bar.close()
    record["fused_update"] = fused  # whether the sparse pools took the fused backward + SparseAdam
    if steps_here:
        log.info("%d steps, %.2f s per step", steps_here, (time.perf_counter() - t_start) / steps_here)
    if best_state is not None:
        _load_trainable(model, best_state)
    model.eval()
    record["best_eval_ppl"] = math.exp(record["best_eval_loss"])
    return record


def _finite_or_stop(which: str, loss: float, step: int) -> None:
    """A NaN / infinite loss ends the run with one line (DivergedError): its weights are not a result."""
    if not math.isfinite(loss):
        raise DivergedError(f"the {which} loss became {loss} at step {step}: the run diverged (learning rates in "
                            f"train.loop.optim too high?); nothing was written as its result")


def _memories(model):
    from slotwise.retrofit import memory_layers

    return memory_layers(model).values()


def clear_state(state_dir: str | Path) -> None:
    shutil.rmtree(state_dir, ignore_errors=True)


def write_record(path: str | Path, record: dict) -> None:
    Path(path).write_text(json.dumps(record, indent=2))
