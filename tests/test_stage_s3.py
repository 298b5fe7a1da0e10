"""Stages take s3:// URIs for their inputs and outputs (a real S3 server on loopback)."""
import json
import sys

import pytest

from conftest import small_llama
from s3server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)
from slotwise.checkpoint import save_checkpoint
from slotwise.components._cli import run_cli, s3_paths
from slotwise.components import slot_stats as slot_stats_component
from slotwise.memory import MemoryConfig
from slotwise.retrofit import RetrofitConfig, retrofit
from slotwise.storage import fetch, publish

CFG = RetrofitConfig(layers=[1], memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16))


def test_local_arguments_pass_through_unchanged():
    argv = ["--model", "runs/train", "--out", "runs/x", "a.b=1"]
    with s3_paths(argv) as (args, out):
        assert args == argv and out is None


@pytest.mark.s3
def test_a_stage_reads_and_writes_s3(tmp_path, s3_env, s3_bucket, smol_tokenizer, monkeypatch):
    model = retrofit(small_llama(len(smol_tokenizer)), CFG)
    save_checkpoint(model, smol_tokenizer, tmp_path / "model", CFG)
    data = tmp_path / "data"
    (data / "background").mkdir(parents=True)
    (data / "background" / "stats.jsonl").write_text("".join(json.dumps({"text": "Rivers flow to the sea. " * 40}) + "\n" for _ in range(4)))
    (tmp_path / "params.yaml").write_text("slot_stats: {seq_len: 32, batch_size: 2, max_batches: 4}\n")
    base = f"s3://{s3_bucket}/runs"
    publish(tmp_path / "model", f"{base}/model")
    publish(data, f"{base}/data")
    publish(tmp_path / "params.yaml", f"{base}/params.yaml")
    monkeypatch.setattr(sys, "argv", ["slot_stats", "--params", f"{base}/params.yaml", "--model", f"{base}/model",
                                      "--data", f"{base}/data", "--out", f"{base}/slot_stats"])
    with pytest.raises(SystemExit) as done:
        run_cli(slot_stats_component.main)
    assert done.value.code == 0
    out = fetch(f"{base}/slot_stats", tmp_path / "back")
    assert (out / "table.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["n_batches"] == 4


@pytest.mark.s3
def test_an_s3_state_dir_is_refused(s3_env, s3_bucket):
    with pytest.raises(Exception, match="s3:// URIs are accepted for"):
        with s3_paths(["--state", f"s3://{s3_bucket}/state"]):
            pass


@pytest.mark.s3
def test_update_reads_facts_from_a_plain_object_and_a_plain_prefix(tmp_path, s3_env, s3_bucket, smol_tokenizer):
    """`slotwise update --facts s3://...`: drops are plain uploads (no LATEST, no sha256 metadata)."""
    from slotwise.components import update
    from slotwise.continual.delta import load_delta
    from test_update import QA, facts, jsonl, make_world

    w = make_world(tmp_path / "world", smol_tokenizer)
    c = s3_env.client()
    for i, batch in enumerate((QA[:2], QA[2:])):
        c.upload_file(str(jsonl(tmp_path / f"n{i}.jsonl", facts(batch, f"n{i}"))), s3_bucket, f"drop/night{i}.jsonl")
    base = ["--params", str(w["params"]), "--model", str(w["model"]), "--stats", str(w["stats"])]
    for source, out, n in ((f"s3://{s3_bucket}/drop/night0.jsonl", tmp_path / "one", 2), (f"s3://{s3_bucket}/drop", tmp_path / "all", 4)):
        with pytest.raises(SystemExit) as done:
            run_cli(update.main, base + ["--facts", source, "--out", str(out)])
        assert done.value.code == 0, source
        assert load_delta(out).meta["update"]["n_facts"] == n
