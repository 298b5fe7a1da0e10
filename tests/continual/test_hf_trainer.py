"""SMF inside a real transformers.Trainer (SparseMemoryOptimizer): only the selected value rows move,
and the run is SparseMemoryFinetuner's on the batches the Trainer fed."""
from __future__ import annotations

import copy

import pytest
import torch
from _continual_helpers import VOCAB, fact_batch, random_background, retrofitted, snapshot
from transformers import Trainer, TrainingArguments

from slotwise.continual.hf_trainer import SparseMemoryOptimizer
from slotwise.continual.pools import value_pools
from slotwise.continual.smf import SMFConfig, SparseMemoryFinetuner

STEPS = 3


def dataset(n: int = 8) -> list[dict]:
    """Rows of one fact-like batch shape: 11 tokens, loss on the last 4 real ones, row 0 padded."""
    rows = []
    for i in range(n // 2):
        b = fact_batch(seed=10 + i)
        rows += [{k: v[j] for k, v in b.items()} for j in range(2)]
    return rows


def backgrounds(model):
    return {p.layers[0]: random_background(p.weight.shape[0], seed=i) for i, p in enumerate(value_pools(model))}


def train(model, tmp_path, cfg: SMFConfig, **args):
    fed = []  # the batches the Trainer passed to the model, in order (training forwards only)
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: fed.append({k: kw[k].clone() for k in ("input_ids", "attention_mask", "labels")}) if m.training else None,
        with_kwargs=True)
    targs = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=STEPS, per_device_train_batch_size=2,
                              learning_rate=cfg.lr, lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
                              save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
                              seed=0, disable_tqdm=True, **args)
    with SparseMemoryOptimizer(model, cfg, backgrounds(model)) as opt:
        selected = []
        trainer = Trainer(model=model, args=targs, train_dataset=dataset(), optimizers=(opt, None))
        orig_step = opt.smf.update_rows

        def record(chosen, lr=None):  # the rows each optimizer step updated
            selected.append({k: v.clone() for k, v in chosen.items()})
            return orig_step(chosen, lr)

        opt.smf.update_rows = record
        trainer.train()
    hook.remove()
    return fed, selected, opt


@pytest.mark.parametrize("optimizer,lr", [("adam", 1e-2), ("sgd", 5.0)])
def test_trainer_moves_only_the_selected_rows(tmp_path, optimizer, lr):
    model = retrofitted()
    start = copy.deepcopy(model)
    before = snapshot(model)
    cfg = SMFConfig(top_t=6, score="tfidf", optimizer=optimizer, lr=lr)
    fed, selected, opt = train(model, tmp_path, cfg)
    assert len(fed) == len(selected) == STEPS

    pools = value_pools(model)
    names = {p.name for p in pools}
    for n, p in model.named_parameters():
        if n not in names:
            assert torch.equal(p, before[n]), n  # attention, FFN, keys, query, gate, out_proj, norms
    for pool in pools:
        touched = torch.zeros(pool.weight.shape[0], dtype=torch.bool)
        for chosen in selected:
            assert 0 < chosen[pool.name].numel() <= cfg.top_t
            touched[chosen[pool.name]] = True
        changed = (pool.weight != before[pool.name]).any(dim=1)
        assert changed[touched].all() and torch.equal(pool.weight[~touched], before[pool.name][~touched])

    # The same batches through SparseMemoryFinetuner: the same rows, the same values (the Trainer's
    # loss is a token sum over num_items_in_batch, SMF's a mean: equal up to rounding).
    smf = SparseMemoryFinetuner(start, backgrounds(start), cfg)
    for batch, chosen in zip(fed, selected):
        out = smf.step(batch)
        for pool in value_pools(start):
            assert torch.equal(out["selected"][pool.layers[0]], chosen[pool.name])
    for a, b in zip(value_pools(start), pools):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    assert not model._forward_pre_hooks and not model._forward_hooks  # close() removed the hooks


def test_gradient_accumulation_counts_every_micro_batch(tmp_path):
    """Two micro-batches per step: the selection is made from both batches' reads."""
    model = retrofitted()
    cfg = SMFConfig(top_t=500, score="tf", optimizer="adam", lr=1e-2)  # top_t > slots read: every read row
    fed, selected, _ = train(model, tmp_path, cfg, gradient_accumulation_steps=2)
    assert len(fed) == 2 * STEPS and len(selected) == STEPS
    from slotwise.continual.smf import count_mask
    from slotwise.retrofit import record_lookups

    probe = retrofitted()  # same init: the first step's reads are the start model's
    with torch.no_grad(), record_lookups(probe) as lookups:
        for batch in fed[:2]:
            probe(**batch)
    for pool in value_pools(probe):
        read = set()
        for layer in pool.layers:
            for rec, batch in zip(lookups[layer], fed[:2]):
                mask = count_mask(batch, "answer")
                read |= set(rec.ids[mask].reshape(-1).tolist())
        assert set(selected[0][pool.name].tolist()) == read


def test_evaluation_forwards_are_not_counted_and_step_needs_a_training_forward():
    model = retrofitted()
    with SparseMemoryOptimizer(model, SMFConfig(top_t=4, score="tf")) as opt:
        model.eval()
        with torch.no_grad():
            model(**fact_batch())
        with pytest.raises(RuntimeError, match="no training forward"):
            opt.step()
        model.train()
        with pytest.raises(ValueError, match="needs labels"):
            model(input_ids=fact_batch()["input_ids"])


def test_state_dict_round_trips(tmp_path):
    model = retrofitted()
    cfg = SMFConfig(top_t=6, score="tf", optimizer="adam", lr=1e-2)
    _, _, opt = train(model, tmp_path, cfg)
    state = opt.state_dict()
    other = SparseMemoryOptimizer(retrofitted(), cfg)
    other.load_state_dict(state)
    other.close()
    assert other.smf.n_steps == STEPS and other.param_groups[0]["lr"] == cfg.lr
    for name, tensors in opt.smf.state.items():
        for key, t in tensors.items():
            assert torch.equal(other.smf.state[name][key], t) and t.abs().sum() > 0


def test_trainer_runs_smf_on_a_model_loaded_through_transformers(tmp_path):
    """The Trainer user's path: AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True), then SMF."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_retrofit_cfg
    from slotwise.checkpoint import save_checkpoint

    ckpt = save_checkpoint(retrofitted(), None, tmp_path / "ckpt", tiny_retrofit_cfg(out_init_std=0.1))
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    assert type(model).__name__ == "SlotwiseForCausalLM"
    before = snapshot(model)
    cfg = SMFConfig(top_t=6, score="tfidf", optimizer="adam", lr=1e-2)
    fed, selected, _ = train(model, tmp_path, cfg)
    assert len(fed) == len(selected) == STEPS
    for pool in value_pools(model):
        touched = torch.zeros(pool.weight.shape[0], dtype=torch.bool)
        for chosen in selected:
            touched[chosen[pool.name]] = True
        changed = (pool.weight != before[pool.name]).any(dim=1)
        assert changed[touched].all() and not changed[~touched].any()
    names = {p.name for p in value_pools(model)}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in names)
