"""The slot_stats stage: counts and document frequencies against an independent recount of the
looked-up ids, padding, shared pools, the summary measures on hand-computed values, the table
file (round trip, refusal of another model's table) and the CLI (a small Llama with SmolLM2's
real tokenizer, read from the embedded GGUF once per module)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from conftest import TINY, tiny_model, tiny_retrofit_cfg
from slotwise.checkpoint import CheckpointError, model_hash, save_checkpoint
from slotwise.components._cli import run_cli
from slotwise.memory import MemoryConfig
from slotwise.retrofit import RetrofitConfig, record_lookups, retrofit
from slotwise.slot_stats import LayerStats, collect, pool_groups, summarize
from slotwise.slot_table import SlotTableError, from_collect, load_table, save_table

from slotwise.components import slot_stats as component


def memory_model(shared: bool = False):
    model = tiny_model("llama")
    torch.manual_seed(1)
    return retrofit(model, tiny_retrofit_cfg(shared_values=shared, out_init_std=0.05)).eval()


def make_batches(n: int = 3, shape=(2, 11), seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], shape, generator=g) for _ in range(n)]


@torch.no_grad()
def recount(model, batches, masks=None, layers=None):
    """Independent recount: per layer (or summed over `layers`), a Counter of slot ids over all
    batches and, per batch, the set of ids read (padding positions skipped)."""
    counts, per_batch = Counter(), []
    for b, batch in enumerate(batches):
        mask = None if masks is None else masks[b]
        with record_lookups(model) as lookups:
            model(batch, attention_mask=mask)
        seen = set()
        for i in layers:
            ids = lookups[i][0].ids  # (B, S, H, knn)
            for r in range(ids.shape[0]):
                for s in range(ids.shape[1]):
                    if mask is None or mask[r, s]:
                        row = ids[r, s].flatten().tolist()
                        counts.update(row)
                        seen.update(row)
        per_batch.append(seen)
    return counts, per_batch


def as_tensors(counts: Counter, per_batch: list[set], n_slots: int):
    c = torch.zeros(n_slots, dtype=torch.long)
    df = torch.zeros(n_slots, dtype=torch.long)
    for slot, n in counts.items():
        c[slot] = n
    for seen in per_batch:
        for slot in seen:
            df[slot] += 1
    return c, df


# ---------------------------------------------------------------- counting


def test_counts_and_df_match_an_independent_recount():
    model = memory_model()
    batches = make_batches()
    per_layer, per_pool = collect(model, batches)
    assert set(per_layer) == {1, 3} and set(per_pool) == {"layer1", "layer3"}
    for i in (1, 3):
        s = per_layer[i]
        c, df = as_tensors(*recount(model, batches, layers=[i]), s.n_slots)
        assert torch.equal(s.counts, c) and torch.equal(s.df, df)
        assert s.n_batches == 3 and s.n_tokens == 3 * 2 * 11
        assert int(s.counts.sum()) == 3 * 2 * 11 * 2 * 4  # tokens x heads x knn
        assert per_pool[f"layer{i}"] is s  # a private pool is its layer
        assert s.counts.device.type == "cpu" and s.counts.dtype == torch.int64 and s.df.dtype == torch.int64


def test_padding_is_not_counted():
    model = memory_model()
    batches = make_batches()
    masks = [torch.ones(2, 11, dtype=torch.long) for _ in batches]
    masks[0][0, 7:] = 0  # right padding
    masks[2][1, 3:] = 0
    per_layer, _ = collect(model, batches, masks)
    real = sum(int(m.sum()) for m in masks)
    for i in (1, 3):
        s = per_layer[i]
        c, df = as_tensors(*recount(model, batches, masks, layers=[i]), s.n_slots)
        assert torch.equal(s.counts, c) and torch.equal(s.df, df)
        assert s.n_tokens == real and int(s.counts.sum()) == real * 2 * 4
    unmasked, _ = collect(model, batches)
    assert int(unmasked[1].counts.sum()) > int(per_layer[1].counts.sum())


def test_shared_pool_merges_layers_and_counts_a_batch_once():
    model = memory_model(shared=True)
    assert pool_groups(model) == {"shared": [1, 3]}
    batches = make_batches(4)
    per_layer, per_pool = collect(model, batches)
    pool = per_pool["shared"]
    c, df = as_tensors(*recount(model, batches, layers=[1, 3]), pool.n_slots)
    assert torch.equal(pool.counts, c) and torch.equal(pool.df, df)
    assert torch.equal(pool.counts, per_layer[1].counts + per_layer[3].counts)
    assert bool((pool.df <= 4).all()) and int(pool.df.max()) <= 4
    # df of the pool is the union per batch: at least each layer's, at most their sum
    assert bool((pool.df >= torch.maximum(per_layer[1].df, per_layer[3].df)).all())
    assert bool((pool.df < per_layer[1].df + per_layer[3].df).any())  # some slot read by both layers in a batch
    assert pool.n_batches == 4 and pool.n_tokens == 2 * 4 * 2 * 11


@torch.no_grad()
def recount_per_sequence(model, batches, layers):
    """Independent recount with every sequence (row of a batch) as its own document."""
    per_seq = []
    for batch in batches:
        with record_lookups(model) as lookups:
            model(batch)
        for r in range(batch.shape[0]):
            per_seq.append({slot for i in layers for slot in lookups[i][0].ids[r].flatten().tolist()})
    return per_seq


@pytest.mark.parametrize("shared", [False, True])
def test_sequence_documents_count_each_row_once(shared):
    model = memory_model(shared=shared)
    batches = make_batches(3, shape=(4, 7))
    per_layer, per_pool = collect(model, batches, doc_unit="sequence")
    by_batch, _ = collect(model, batches)
    tables = {f"layer{i}": ([i], per_layer[i]) for i in (1, 3)}
    if shared:
        tables["shared"] = ([1, 3], per_pool["shared"])
    for name, (layers, stats) in tables.items():
        df = torch.zeros(stats.n_slots, dtype=torch.long)
        for seen in recount_per_sequence(model, batches, layers):
            for slot in seen:
                df[slot] += 1
        assert torch.equal(stats.df, df), name
        assert stats.n_batches == 12  # |B| = 3 batches x 4 sequences
    assert torch.equal(per_layer[1].counts, by_batch[1].counts)  # counts do not depend on the unit


def test_read_df_is_access_weighted_over_read_slots():
    # accesses 2, 2, 4, 0, 0; df 1, 2, 3 of |B| = 4 -> (2*1 + 2*2 + 4*3) / (8 * 4) = 18 / 32
    s = LayerStats(5, torch.tensor([2, 2, 4, 0, 0]), torch.tensor([1, 2, 3, 0, 0]), n_batches=4, n_tokens=2)
    assert summarize(s)["read_df_fraction"] == pytest.approx(18 / 32)
    # Two of five slots read, each by every document: the median over all slots says 0, read df says 1.
    s = LayerStats(5, torch.tensor([5, 5, 0, 0, 0]), torch.tensor([4, 4, 0, 0, 0]), n_batches=4, n_tokens=2)
    assert summarize(s)["median_df_fraction"] == 0.0 and summarize(s)["read_df_fraction"] == pytest.approx(1.0)


def test_summarize_on_hand_made_stats():
    # 5 slots, |B| = 4: accesses 2, 2, 4, 0, 0; read by 1, 2, 3, 0, 0 of the batches
    s = LayerStats(5, torch.tensor([2, 2, 4, 0, 0]), torch.tensor([1, 2, 3, 0, 0]), n_batches=4, n_tokens=2)
    out = summarize(s, top=1)
    assert out["accesses"] == 8
    assert out["coverage"] == pytest.approx(3 / 5)
    # p = (1/4, 1/4, 1/2): entropy 1.5 ln 2, exp = 2 ** 1.5 slots out of 5
    assert out["effective_slots"] == pytest.approx(2 ** 1.5 / 5)
    # df / |B| = (0.25, 0.5, 0.75, 0, 0): median 0.25, mean 0.3
    assert out["median_df_fraction"] == pytest.approx(0.25)
    assert out["mean_df_fraction"] == pytest.approx(0.3)
    assert out["slots_per_batch_fraction"] == pytest.approx(6 / 4 / 5)
    assert out["top_slots"] == [[2, 4]]
    uniform = summarize(LayerStats(4, torch.tensor([3, 3, 3, 3]), torch.tensor([4, 4, 4, 4]), 4, 6))
    assert uniform["effective_slots"] == pytest.approx(1.0) and uniform["median_df_fraction"] == 1.0


# ---------------------------------------------------------------- the table file


def test_table_round_trip_private_and_shared(tmp_path):
    for shared in (False, True):
        model = memory_model(shared)
        per_layer, per_pool = collect(model, make_batches(2))
        meta = {"model_hash": "a" * 64, "data_sha256": "b" * 64, "params": {"seq_len": 11, "batch_size": 2}}
        table = from_collect(per_layer, per_pool, pool_groups(model), meta)
        path = save_table(table, tmp_path / f"t{shared}" / "table.safetensors")
        assert [p.name for p in path.parent.iterdir()] == ["table.safetensors"]  # no temporary left behind
        back = load_table(path, expect_model_hash="a" * 64)
        assert back.meta["params"] == {"seq_len": 11, "batch_size": 2} and back.meta["data_sha256"] == "b" * 64
        assert back.model_hash == "a" * 64
        if shared:
            assert list(back.pools) == ["shared"] and sorted(back.layers) == ["layer1", "layer3"]
            assert back.pool_layers == {"shared": [1, 3]}
        else:
            assert sorted(back.pools) == ["layer1", "layer3"] and back.layers == {}
        for i in (1, 3):
            assert torch.equal(back.layer_stats(i).counts, per_layer[i].counts)
            assert torch.equal(back.layer_stats(i).df, per_layer[i].df)
            pool = per_pool[back.pool_of(i)]
            got = back.for_layer(i)
            assert torch.equal(got.counts, pool.counts) and torch.equal(got.df, pool.df)
            assert (got.n_batches, got.n_tokens, got.n_slots) == (pool.n_batches, pool.n_tokens, pool.n_slots)


def test_table_for_another_model_is_refused(tmp_path):
    model = memory_model()
    per_layer, per_pool = collect(model, make_batches(1))
    path = save_table(from_collect(per_layer, per_pool, pool_groups(model), {"model_hash": "a" * 64}), tmp_path / "t.safetensors")
    with pytest.raises(SlotTableError) as info:
        load_table(path, expect_model_hash="c" * 64)
    msg = str(info.value)
    assert "a" * 64 in msg and "c" * 64 in msg and "\n" not in msg
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    (tmp_path / "junk.safetensors").write_bytes(b"not a table")
    with pytest.raises(SlotTableError, match="junk.safetensors: not a readable safetensors"):
        load_table(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tokenizer():
    from slotwise.models import resolve_source

    path, kwargs = resolve_source("embedded:smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(path, **kwargs)


def small_lm(vocab_size: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


SMALL_RETROFIT = RetrofitConfig(layers=[0, 1], memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16, out_init_std=0.05))

TEXTS = ["The cat sat on the mat and looked at the birds outside the window.",
         "Paris is the capital and most populous city of France, on the river Seine.",
         "A product-key memory reads a few value rows out of a very large table.",
         "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."] * 3


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data" / "background"
    d.mkdir(parents=True)
    (d / "stats.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return tmp_path / "data"


def _params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("slot_stats:\n  seq_len: 16\n  batch_size: 2\n  max_batches: 4\n  device: cpu\n  top: 3\n")
    return path


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        run_cli(component.main, [str(a) for a in argv])
    return info.value.code, capsys.readouterr().err


def test_cli_writes_table_summary_and_plots(tmp_path, tokenizer, data_dir, capsys):
    model = retrofit(small_lm(len(tokenizer)), SMALL_RETROFIT)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt", SMALL_RETROFIT)
    out = tmp_path / "runs" / "slot_stats"
    code, err = _cli(capsys, "--params", _params(tmp_path), "--model", ckpt, "--data", data_dir, "--out", out)
    assert code == 0, err
    table = load_table(out / "table.safetensors", expect_model_hash=model_hash(ckpt))
    assert sorted(table.pools) == ["layer0", "layer1"] and table.layers == {}
    assert table.meta["params"]["seq_len"] == 16 and table.meta["params"]["batch_size"] == 2
    from slotwise.checkpoint import sha256_file
    assert table.meta["data_sha256"] == sha256_file(data_dir / "background" / "stats.jsonl")
    s = table.pools["layer0"]
    assert s.n_batches == 4 * 2  # doc_unit sequence (the default): |B| = 4 batches x 2 sequences
    assert s.n_tokens == 4 * 2 * 16 and int(s.counts.sum()) == 4 * 2 * 16 * 2 * 4
    # the same numbers as collect over the same blocks
    from slotwise.checkpoint import load_checkpoint
    from slotwise.text_blocks import fixed_batches, pack_blocks
    reloaded, _ = load_checkpoint(ckpt)
    batches = fixed_batches(pack_blocks(TEXTS, tokenizer, 16), 2, 4)
    per_layer, _ = collect(reloaded, batches, doc_unit="sequence")
    assert torch.equal(per_layer[0].counts, s.counts) and torch.equal(per_layer[0].df, s.df)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_hash"] == model_hash(ckpt) and summary["n_batches"] == 4
    t0 = summary["tables"]["layer0"]
    assert t0["kind"] == "pool" and t0["layers"] == [0] and len(t0["top_slots"]) == 3
    assert 0 < t0["coverage"] <= 1 and 0 < t0["effective_slots"] <= 1 and 0 <= t0["median_df_fraction"] <= 1
    assert t0["coverage"] == pytest.approx(float((s.counts > 0).double().mean()))
    for png in ("rank_frequency.png", "df_hist.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    usage = (out / "plots" / "usage.csv").read_text().splitlines()
    assert usage[0] == "table,rank,frequency" and usage[1].startswith("layer0,1,")
    assert "seq_len: 16" in (out / "params.resolved.yaml").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["slot_stats"]  # no staging dirs left behind


def test_cli_refuses_a_model_without_memory(tmp_path, tokenizer, data_dir, capsys):
    ckpt = save_checkpoint(small_lm(len(tokenizer)), tokenizer, tmp_path / "plain", None)
    out = tmp_path / "out"
    code, err = _cli(capsys, "--params", _params(tmp_path), "--model", ckpt, "--data", data_dir, "--out", out)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "no memory layers" in err, err
    assert not out.exists()
    code, err = _cli(capsys, "--params", _params(tmp_path), "--model", ckpt, "--data", tmp_path / "nodata", "--out", out)
    assert code == 2 and "stats.jsonl: data file not found" in err and err.count("\n") == 1
