"""Stage `train`: heal a retrofit, SFT it, or pretrain a memory / iso-FLOP dense model.

    python -m slotwise.components.train --params params.yaml --model runs/retrofit --data runs/data \\
        --out runs/train --state runs/train_state
    slotwise train --model runs/retrofit --data runs/data --out runs/train train.loop.max_steps=200

heal      memory parameters train on the background corpus (base frozen), early-stopped on
          held-out text; the summary reports perplexity with memory on and off, slot coverage,
          effective slots and median document frequency on held-out batches
sft       prompt/answer pairs (train.sft_data, e.g. GSM8K train) with the loss on the answers
pretrain  a fresh Llama-style model (train.pretrain), --model gives only the tokenizer: with
          product-key memory, Mixture of Chapters (retrofit.insert.memory.kind=chapters) or dense
          at the same FLOPs per token (train.pretrain.variant=dense)

Killed at any point and rerun with the same --state, it resumes and ends with the same weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slotwise.chapters import chapter_flops_per_token
from slotwise.checkpoint import load_checkpoint, model_hash, read_retrofit_config, save_checkpoint, sha256_file
from slotwise.cli_utils import component_parser, resolve_device, run_cli
from slotwise.config import ConfigError, Params, load_params, to_yaml
from slotwise.diagnostics import memory_report, perplexity
from slotwise.memory import MemoryConfig
from slotwise.retrofit import RetrofitConfig, memory_layers, retrofit
from slotwise.sources import DataError, read_jsonl
from slotwise.text_blocks import BlockSchedule, ExampleSchedule, fixed_batches, lm_batch, pack_blocks, prompt_answer_examples, read_texts
from slotwise.training import train

log = logging.getLogger("slotwise.train")




def memory_flops_per_token(d: int, m: MemoryConfig) -> int:
    """Multiply-adds per token of one memory layer of either kind.

    product_key: query d*H*K + sub-key scores H*n_keys*K + candidates H*knn^2 + values H*knn*v
                 + gate d*v (Memory+) + out v*d
    chapters:    slotwise.chapters.chapter_flops_per_token (query, per-chapter attention, out, router)
    """
    if m.kind == "chapters":
        return chapter_flops_per_token(d, m)
    v = m.v_dim or d
    return d * m.heads * m.k_dim + m.heads * m.n_keys * m.k_dim + m.heads * m.knn**2 + m.heads * m.knn * v + (d * v if m.memory_plus else 0) + v * d


def iso_flop_intermediate(d: int, num_layers: int, intermediate: int, n_memory_layers: int, memory_flops: int) -> int:
    """The dense FFN width with the FLOPs per token of the model with memory.

    A SwiGLU FFN costs 3*d*I multiply-adds per token and layer, so widening every layer's FFN by
    dI adds 3*d*dI*num_layers; matching n_memory_layers * memory_flops gives
        I_dense = I + round(n_memory_layers * memory_flops / (3 * d * num_layers)).
    (Self-attention, embeddings and the LM head are the same in both models.)
    """
    return intermediate + round(n_memory_layers * memory_flops / (3 * d * num_layers))


def pretrain_model(params: Params, vocab_size: int, bos: int, eos: int):
    """A fresh model: memory variant (retrofit.insert.memory: product_key or chapters), or dense with the
    FFN widened to that memory's FLOPs per token (iso_flop_intermediate)."""
    pp, mem = params.train.pretrain, params.retrofit.insert.memory
    intermediate = pp.intermediate_size
    if pp.variant == "dense":
        intermediate = iso_flop_intermediate(pp.hidden_size, pp.num_layers, intermediate, len(pp.memory_layers),
                                             memory_flops_per_token(pp.hidden_size, mem))
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=pp.hidden_size, intermediate_size=intermediate,
                         num_hidden_layers=pp.num_layers, num_attention_heads=pp.num_heads,
                         num_key_value_heads=pp.num_kv_heads, max_position_embeddings=max(2048, params.train.seq_len),
                         bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=True)
    torch.manual_seed(params.train.loop.seed)
    model = AutoModelForCausalLM.from_config(config)
    cfg = None
    if pp.variant == "memory":
        cfg = RetrofitConfig(layers=list(pp.memory_layers), mode="additive", alpha=1.0,
                             memory=MemoryConfig(**{**vars(mem), "out_init_std": pp.memory_out_init_std}))
        retrofit(model, cfg)
    return model, cfg, intermediate


def load_for_training(params: Params, model_dir: str):
    """-> (model, tokenizer, retrofit config or None)."""
    if params.train.mode == "pretrain":
        from transformers import AutoTokenizer

        from slotwise.models import resolve_source

        path, kw = (model_dir, {}) if Path(model_dir, "tokenizer_config.json").is_file() else resolve_source(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        model, cfg, _ = pretrain_model(params, len(tokenizer), tokenizer.bos_token_id or 0, tokenizer.eos_token_id)
        return model, tokenizer, cfg
    model, tokenizer = load_checkpoint(model_dir)
    cfg = read_retrofit_config(model_dir)
    if params.train.mode == "heal" and not memory_layers(model):
        raise ConfigError(f"train.mode=heal needs a retrofitted model; {model_dir} has no memory layers")
    return model, tokenizer, cfg


def sft_pairs(path: str, limit: int | None) -> list[tuple[str, str]]:
    pairs = []
    for _, r in read_jsonl(path, ("question", "answer")):
        answers = r["answer"] if isinstance(r["answer"], str) else r["answer"][0]
        pairs.append((f"Question: {r['question']}\nAnswer: ", answers))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise DataError(f"{path}: no examples")
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = component_parser("slotwise train", __doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/retrofit", help="checkpoint to train (pretrain: tokenizer source)")
    parser.add_argument("--data", default="runs/data", help="data stage output")
    parser.add_argument("--out", default="runs/train", help="output checkpoint directory")
    parser.add_argument("--state", default=None, help="resumable state directory (default: <out>_state)")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.overrides)
    t = params.train
    state = Path(args.state or f"{args.out}_state")
    device = resolve_device(t.device, "train.device")
    data = Path(args.data)

    model, tokenizer, cfg = load_for_training(params, args.model)
    model.to(device)
    heldout = pack_blocks(read_texts(data / "background/heldout.jsonl"), tokenizer, t.seq_len)
    eval_blocks = fixed_batches(heldout, t.batch_size, t.eval_batches)
    if t.mode == "sft":
        examples = prompt_answer_examples(sft_pairs(t.sft_data, t.sft_max_examples), tokenizer, t.seq_len)
        schedule = ExampleSchedule(examples, t.batch_size, t.loop.seed, tokenizer.pad_token_id or tokenizer.eos_token_id)
        batch_at = schedule.batch
    else:
        blocks = pack_blocks(read_texts(data / "background/train.jsonl", t.max_docs), tokenizer, t.seq_len)
        schedule = BlockSchedule(blocks, t.batch_size, t.loop.seed)
        batch_at = lambda step: lm_batch(schedule.batch(step))  # noqa: E731
        log.info("%d training blocks of %d tokens; %d steps = %.2f epochs", len(blocks), t.seq_len,
                 t.loop.max_steps, schedule.epochs(t.loop.max_steps))
    eval_batches = [{k: v.to(device) for k, v in lm_batch(b).items()} for b in eval_blocks]

    base_ppl = perplexity(model, [b.to(device) for b in eval_blocks])
    # Pretraining trains every weight; heal and SFT train what train.loop.trainable says.
    loop = dataclasses.replace(t.loop, trainable="all") if t.mode == "pretrain" else t.loop
    # A state from a run with other params, another starting model or other data is not resumed.
    inputs = [data / "background/heldout.jsonl", Path(t.sft_data) if t.mode == "sft" else data / "background/train.jsonl"]
    fingerprint = hashlib.sha256(json.dumps({"train": to_yaml(t), "model": model_hash(args.model) if t.mode != "pretrain" else None,
                                             "data": [sha256_file(f) for f in inputs]}, sort_keys=True).encode()).hexdigest()
    record = train(model, batch_at, eval_batches, loop, state, device=device, fingerprint=fingerprint)
    summary = {"mode": t.mode, "device": str(device), "initial_eval_ppl": base_ppl, **{k: v for k, v in record.items() if k != "history"}}
    if memory_layers(model):
        stats_blocks = pack_blocks(read_texts(data / "background/stats.jsonl"), tokenizer, t.seq_len)
        summary["memory"] = memory_report(model, [b.to(device) for b in eval_blocks],
                                          [b for b in fixed_batches(stats_blocks, t.batch_size, t.report_batches)])
    log.info("%s", json.dumps({k: v for k, v in summary.items() if k not in ("memory",)}, indent=None)[:400])
    save_checkpoint(model.cpu(), tokenizer, args.out, cfg, extra={"trained_from": args.model, "train_mode": t.mode},
                    extra_files={"summary.json": json.dumps(summary, indent=2),
                                 "history.json": json.dumps(record["history"], indent=1),
                                 "params.resolved.yaml": to_yaml(params)})
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
