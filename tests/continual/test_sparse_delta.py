"""Sparse deltas: bitwise apply/revert round trips, stacking, refusal of the wrong base, size."""
import copy
import json

import pytest
import torch
from _continual_helpers import fact_batch, retrofitted
from safetensors.torch import save_model

from slotwise.continual.delta import (
    DeltaError,
    apply_delta,
    delta_nbytes,
    extract_delta,
    load_delta,
    revert_delta,
    save_delta,
    stack,
    state_hash,
)
from slotwise.continual.pools import value_pools
from slotwise.continual.smf import SMFConfig, SparseMemoryFinetuner


def _smf_update(model, seed, steps=2, top_t=5):
    updated = copy.deepcopy(model)
    smf = SparseMemoryFinetuner(updated, None, SMFConfig(top_t=top_t, score="tf", lr=1e-2))
    for _ in range(steps):
        smf.step(fact_batch(seed=seed))
    return updated


def _equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_apply_and_revert_round_trip_bitwise(tmp_path):
    base = retrofitted()
    updated = _smf_update(base, seed=1)
    d = extract_delta(base, updated, meta={"facts": "batch 1"})
    assert 0 < sum(d.n_rows.values()) <= 2 * 2 * 5  # two pools, <= top_t rows per step
    path = save_delta(d, tmp_path / "d1")
    assert sorted(p.name for p in path.iterdir()) == ["delta.json", "delta.safetensors"]
    d = load_delta(path)
    assert d.meta == {"facts": "batch 1"}

    model = copy.deepcopy(base)
    apply_delta(model, d)
    assert _equal_state(model, updated) and state_hash(model) == d.new_hash
    with pytest.raises(DeltaError, match="new rows only"):  # by default no old rows: revert reads the base
        revert_delta(model, d)
    revert_delta(model, d, base=base)
    assert _equal_state(model, base) and state_hash(model) == d.base_hash


def test_keep_old_reverts_without_the_base_at_twice_the_size(tmp_path):
    base = retrofitted()
    updated = _smf_update(base, seed=1)
    lean, full = extract_delta(base, updated), extract_delta(base, updated, keep_old=True)
    assert lean.n_rows == full.n_rows
    rows = sum(lean.n_rows.values())
    assert full.nbytes - lean.nbytes == rows * 48 * 4  # the old rows: R x D fp32
    full = load_delta(save_delta(full, tmp_path / "full"))
    model = apply_delta(copy.deepcopy(base), full)
    revert_delta(model, full)
    assert _equal_state(model, base)
    # a base that is not the delta's own is refused
    with pytest.raises(DeltaError, match="is not the delta's base"):
        revert_delta(apply_delta(copy.deepcopy(base), lean), lean, base=retrofitted(seed=5))


def test_refuses_a_model_that_is_not_its_base():
    base = retrofitted()
    d = extract_delta(base, _smf_update(base, seed=1), keep_old=True)
    other = retrofitted(seed=5)
    with pytest.raises(DeltaError, match="is not its base") as e:
        apply_delta(other, d)
    assert "\n" not in str(e.value)
    with pytest.raises(DeltaError, match="is not the model it produced"):
        revert_delta(copy.deepcopy(base), d)
    # without the hash check, the rows themselves still give the wrong model away
    with pytest.raises(DeltaError, match="wrong model"):
        apply_delta(other, d, verify=False)


def test_refuses_models_that_differ_outside_the_values():
    base = retrofitted()
    updated = copy.deepcopy(base)
    with torch.no_grad():
        updated.model.layers[1].mlp.memory.keys[0, 0, 0, 0] += 1
    with pytest.raises(DeltaError, match="keys differs"):
        extract_delta(base, updated)


def test_stack_composes_and_reverts_to_the_base(tmp_path):
    base = retrofitted()
    m1 = _smf_update(base, seed=1)
    m2 = _smf_update(m1, seed=1, steps=1)  # same batch: mostly the same rows, later values must win
    m2 = _smf_update(m2, seed=2, steps=1)  # and some new rows
    d1, d2 = extract_delta(base, m1), extract_delta(m1, m2)
    name = value_pools(base)[0].name
    assert set(d1.pools[name].rows.tolist()) & set(d2.pools[name].rows.tolist())  # overlap exercised
    d12 = load_delta(save_delta(stack(d1, d2), tmp_path / "d12"))
    model = apply_delta(copy.deepcopy(base), d12)
    assert _equal_state(model, m2)
    revert_delta(model, d12, base=base)
    assert _equal_state(model, base)
    # with old rows kept on both sides, the stack reverts on its own
    d12_old = stack(extract_delta(base, m1, keep_old=True), extract_delta(m1, m2, keep_old=True))
    model = apply_delta(copy.deepcopy(base), d12_old)
    revert_delta(model, d12_old)
    assert _equal_state(model, base)
    # the stack equals the delta extracted directly (rows that moved and came back aside)
    direct = extract_delta(base, m2)
    for n, pd in direct.pools.items():
        assert set(pd.rows.tolist()) <= set(d12.pools[n].rows.tolist())
    with pytest.raises(DeltaError, match="cannot stack"):
        stack(d2, d1)


def test_load_refuses_a_modified_file(tmp_path):
    base = retrofitted()
    path = save_delta(extract_delta(base, _smf_update(base, seed=1)), tmp_path / "d")
    meta = json.loads((path / "delta.json").read_text())
    meta["sha256"]["delta.safetensors"] = "0" * 64
    (path / "delta.json").write_text(json.dumps(meta))
    with pytest.raises(DeltaError, match="sha256"):
        load_delta(path)


def test_size_is_a_small_fraction_of_the_checkpoint(tmp_path):
    # arithmetic, at the anchors' scale: 500 rows of a 1M x 576 fp32 pool
    full = 1024**2 * 576 * 4
    assert delta_nbytes(500, 576) / full < 0.001  # 1.2 MB of 2.4 GB: 0.05%
    assert delta_nbytes(500, 576, keep_old=True) == 500 * (8 + 2 * 576 * 4)
    # real files, moderate pool: 65,536 x 48 shared pool, 50 rows touched
    base = retrofitted(n_keys=256, shared_values=True)
    updated = copy.deepcopy(base)
    pool = value_pools(updated)[0].weight
    with torch.no_grad():
        pool[torch.arange(0, 65536, 1311)[:50]] += 1.0
    d = extract_delta(base, updated)
    assert d.n_rows == {value_pools(base)[0].name: 50}
    assert d.nbytes == delta_nbytes(50, 48)
    dpath = save_delta(d, tmp_path / "d")
    save_model(base, str(tmp_path / "full.safetensors"))
    delta_size = sum(p.stat().st_size for p in dpath.iterdir())
    assert delta_size < 0.01 * (tmp_path / "full.safetensors").stat().st_size
