"""`slotwise train --nproc 2`: the heal stage on two gloo ranks ends where one process ends."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_DATA, small_llama
from slotwise.checkpoint import save_checkpoint
from slotwise.components import train as train_component
from slotwise.config import ConfigError
from slotwise.distributed import strip_nproc, torchrun_command
from slotwise.memory import MemoryConfig
from slotwise.retrofit import RetrofitConfig, retrofit
from slotwise.sources import _local

CFG = RetrofitConfig(layers=[1], memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16, v_dim=41, out_init_std=0.05))


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory, smol_tokenizer):
    """background/{train,heldout,stats}.jsonl from real WikiText-2 articles, and a retrofit checkpoint."""
    docs = [d["text"][:2000] for d in _local(REPO_DATA, "wikitext2")]
    root = tmp_path_factory.mktemp("stage")
    (root / "data" / "background").mkdir(parents=True)
    for name, part in (("heldout", docs[:2]), ("stats", docs[2:4]), ("train", docs[4:16])):
        (root / "data" / "background" / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    model = retrofit(small_llama(len(smol_tokenizer)), CFG)
    save_checkpoint(model, smol_tokenizer, root / "retrofit", CFG)
    (root / "params.yaml").write_text(f"""
data: {{sources: [local], local_dir: {REPO_DATA}}}
train:
  device: cpu
  seq_len: 32
  batch_size: 4
  eval_batches: 2
  report_batches: 2
  loop: {{max_steps: 3, eval_every: 1, save_every: 2, early_stop_patience: null,
          optim: {{warmup_steps: 0, lr_values: 0.01, lr_memory: 0.003}}}}
""")
    return root


def _args(root, out, *extra):
    return ["--params", str(root / "params.yaml"), "--model", str(root / "retrofit"), "--data", str(root / "data"),
            "--out", str(out), *extra]


@pytest.mark.slow
def test_train_with_nproc_2_matches_one_process(stage_inputs, tmp_path):
    assert train_component.main(_args(stage_inputs, tmp_path / "one")) == 0
    proc = subprocess.run([sys.executable, "-m", "slotwise.components.train",
                           *_args(stage_inputs, tmp_path / "two", "--nproc", "2", "--sharded-out", str(tmp_path / "dcp"))],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    base = load_file(stage_inputs / "retrofit" / "model.safetensors")
    assert one.keys() == two.keys()
    changed = [k for k in one if not torch.equal(one[k], base[k])]
    assert any("values" in k for k in changed)
    for k in one:  # Adam: a hundredth of a step where a gradient is ~0 (see test_sharded_memory)
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-4, msg=lambda m: f"{k}: {m}")
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["world_size"] == 2 and "world_size" not in s1
    assert s2["best_step"] == s1["best_step"] and s2["best_eval_loss"] == pytest.approx(s1["best_eval_loss"], rel=1e-5)
    assert (tmp_path / "dcp" / ".metadata").is_file()  # the DCP copy (dist_checkpoint.load_sharded reads it)


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(stage_inputs, tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size.*3 ranks"):
        train_component.main(_args(stage_inputs, tmp_path / "out", "--nproc", "3"))
    assert not (tmp_path / "out").exists()


def test_nproc_is_taken_out_of_the_arguments_torchrun_gets():
    assert strip_nproc(["--out", "x", "--nproc", "4", "a=1"]) == (4, ["--out", "x", "a=1"])
    assert strip_nproc(["--nproc=2"]) == (2, [])
    assert strip_nproc(["--out", "x"]) == (1, ["--out", "x"])
    with pytest.raises(ValueError, match="whole number"):
        strip_nproc(["--nproc", "two"])
    cmd = torchrun_command("slotwise.components.train", ["--out", "x"], 2)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                       "slotwise.components.train", "--out", "x"]
