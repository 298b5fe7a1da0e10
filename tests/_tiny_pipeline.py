"""The whole pipeline on a tiny model: real stages, real data from the installed packages, real outputs.

    root = build_inputs(tmp_path, tokenizer)    # a tiny Llama with SmolLM2's tokenizer + params.yaml
    run_stages(root)                            # data -> retrofit -> train -> slot_stats -> continual -> evaluate

Every stage runs in-process through its component's main() with the same command line as dvc.yaml
(paths relative to `root`, which becomes the working directory), so its outputs are what
`dvc repro` would write. A few seconds of compute per stage on 2 cores.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

TINY_PARAMS = """\
data:
  sources: [packages]
  local_dir: data                 # not read (packages only); dvc.yaml lists it as a train param
  n_facts: 4
  n_paraphrases: 2
  mark_known: false
  background_max_docs: 40
  stats_docs: 10
  heldout_docs: 10
  tasks: [triviaqa, arc_easy]
  task_limit: 6
retrofit:
  base_model: base
  insert:
    layers: [1]
    memory: {n_keys: 8, heads: 2, knn: 4, k_dim: 16}
train:
  device: cpu
  seq_len: 32
  batch_size: 2
  max_docs: 20
  eval_batches: 1
  report_batches: 2
  loop: {max_steps: 3, eval_every: 2, save_every: 2, early_stop_patience: null}
slot_stats: {seq_len: 32, batch_size: 2, max_batches: 3, device: cpu}
continual:
  n_facts: 2
  steps_per_fact: 1
  eval_every: 1
  known_screen: 4
  ppl_blocks: 2
  ppl_seq_len: 32
  final_tasks: []
  batch_size: 4
  device: cpu
  methods:
    - {name: smf_tfidf, method: smf, params: {score: tfidf, top_t: 8, optimizer: adam, lr: 0.01}}
    - {name: full_ft, method: full, params: {lr: 0.0001}}
evaluate:
  tasks: [arc_easy]
  limit: 2
  batch_size: 2
  device: cpu
  perplexity: {seq_len: 32, max_blocks: 2, batch_size: 2}
  facts: {limit: 2, max_new_tokens: 4}
"""

# The stages' command lines as in dvc.yaml (without the interpreter), in DAG order.
STAGES = {
    "data": ["--out", "runs/data"],
    "retrofit": ["--out", "runs/retrofit"],
    "train": ["--model", "runs/retrofit", "--data", "runs/data", "--out", "runs/train", "--state", "runs/train_state", "--live"],
    "slot_stats": ["--model", "runs/train", "--data", "runs/data", "--out", "runs/slot_stats"],
    "continual": ["--model", "runs/train", "--data", "runs/data", "--stats", "runs/slot_stats", "--out", "runs/continual", "--live"],
    "evaluate": ["--model", "runs/train", "--data", "runs/data", "--out", "runs/evaluate"],
}


def build_inputs(root: Path, tokenizer) -> Path:
    """root/base (a 2-layer Llama with the given tokenizer, saved the Hugging Face way) and root/params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "params.yaml").write_text(TINY_PARAMS)
    return root


def run_stages(root: Path, stages=tuple(STAGES)) -> Path:
    """Run the stages in root (the working directory while they run); returns root / "runs"."""
    import importlib

    here = Path.cwd()
    os.chdir(root)
    try:
        for name in stages:
            main = importlib.import_module(f"slotwise.components.{name}").main
            assert main(["--params", "params.yaml", *STAGES[name]]) in (0, None), f"stage {name} failed"
    finally:
        os.chdir(here)
    return root / "runs"
