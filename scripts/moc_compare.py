"""Mixture of Chapters comparisons (issue 14): iso-FLOP pretraining, then the pretrain -> SFT phase change.

    python scripts/moc_compare.py pretrain --params profiles/moc.yaml --data runs/data --out runs/moc \
        [--variants dense,product_key,moc_causal,moc_sequence] [key=value ...]
    python scripts/moc_compare.py phase --params profiles/moc.yaml --data runs/data --out runs/moc \
        [--variants dense,moc_causal] [--sft-steps 150] [key=value ...]

pretrain  one train-stage run (mode pretrain) per variant, same data, same batches, same seed:
            dense         train.pretrain.variant=dense: FFN widened to the MoC layers' FLOPs
            product_key   retrofit.insert.memory.kind=product_key (Memory+), balance weight 0.03
            moc_causal    kind=chapters, routing=causal_chunks
            moc_sequence  kind=chapters, routing=sequence: the paper's routing, LEAKY
          then the held-out loss of each on the same --eval-batches held-out batches; the
          sequence-routed model is also scored with causal routing (its honest number).
          Writes <out>/<variant>/ (checkpoints) and <out>/pretrain.json.
phase     for each variant's pretrained checkpoint: held-out Wikipedia loss and GSM8K answer loss
          (the last --heldout-sft examples of train.sft_data, never trained on), SFT on the first
          train.sft_max_examples (all weights, answer-only loss, model selection on the GSM8K
          held-out loss), the same two losses after. Writes <out>/phase.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from slotwise.chapters import ChapterMemory
from slotwise.checkpoint import load_checkpoint
from slotwise.components import train as train_component
from slotwise.config import load_params
from slotwise.retrofit import memory_layers
from slotwise.text_blocks import ExampleSchedule, fixed_batches, lm_batch, pack_blocks, pad_examples, prompt_answer_examples, read_texts
from slotwise.training import clear_state, eval_loss, train

VARIANTS = {
    "dense": ["train.pretrain.variant=dense"],
    "product_key": ["retrofit.insert.memory.kind=product_key", "train.loop.balance_weight=0.03"],
    "moc_causal": ["retrofit.insert.memory.kind=chapters", "retrofit.insert.memory.chapters.routing=causal_chunks"],
    "moc_sequence": ["retrofit.insert.memory.kind=chapters", "retrofit.insert.memory.chapters.routing=sequence"],
}
TOKENIZER = "embedded:smollm2-135m-instruct"


def heldout_batches(data: Path, tokenizer, seq_len: int, batch_size: int, n: int) -> list[dict]:
    blocks = pack_blocks(read_texts(data / "background/heldout.jsonl"), tokenizer, seq_len)
    return [lm_batch(b) for b in fixed_batches(blocks, batch_size, n)]


def routing_as(model, routing: str) -> None:
    """Switch every chapter layer's routing (e.g. score a sequence-trained model causally)."""
    for mem in memory_layers(model).values():
        if isinstance(mem, ChapterMemory):
            mem.cfg = dataclasses.replace(mem.cfg, chapters=dataclasses.replace(mem.cfg.chapters, routing=routing))


def pretrain(args, overrides: list[str]) -> dict:
    out = Path(args.out)
    rows = {}
    for name in args.variants.split(","):
        over = overrides + VARIANTS[name]
        t0 = time.perf_counter()
        argv = ["--params", args.params, "--model", TOKENIZER, "--data", args.data, "--out", str(out / name),
                "--state", str(out / f"{name}_state"), *over]
        print(f"== {name}: slotwise train {' '.join(argv)}", flush=True)
        assert train_component.main(argv) == 0
        summary = json.loads((out / name / "summary.json").read_text())
        model, tokenizer = load_checkpoint(out / name)
        p = load_params(args.params, over)
        batches = heldout_batches(Path(args.data), tokenizer, p.train.seq_len, p.train.batch_size, args.eval_batches)
        mem = p.retrofit.insert.memory
        row = {
            "overrides": over, "wall_s": time.perf_counter() - t0, "seconds_per_step": summary.get("seconds_per_step"),
            "steps": p.train.loop.max_steps, "tokens": p.train.loop.max_steps * p.train.batch_size * p.train.seq_len,
            "params": sum(q.numel() for q in model.parameters()), "intermediate_size": model.config.intermediate_size,
            "memory_flops_per_token_per_layer": None if name == "dense" else train_component.memory_flops_per_token(p.train.pretrain.hidden_size, mem),
            "heldout_loss": eval_loss(model, batches), "train_best_eval_loss": summary.get("best_eval_loss"),
        }
        if name == "moc_sequence":
            routing_as(model, "causal_chunks")
            row["heldout_loss_scored_causally"] = eval_loss(model, batches)
        row["heldout_ppl"] = math.exp(row["heldout_loss"])
        rows[name] = row
        print(json.dumps({name: row}), flush=True)
    result = {"eval_batches": args.eval_batches, "variants": rows}
    (out / "pretrain.json").write_text(json.dumps(result, indent=2))
    return result


def answer_loss(model, examples, pad_id: int, batch_size: int = 16) -> float:
    return eval_loss(model, [pad_examples(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)])


def phase(args, overrides: list[str]) -> dict:
    out = Path(args.out)
    rows = {}
    for name in args.variants.split(","):
        over = overrides + VARIANTS[name]
        p = load_params(args.params, over)
        t = p.train
        model, tokenizer = load_checkpoint(out / name)
        pad = tokenizer.pad_token_id or tokenizer.eos_token_id
        pairs = train_component.sft_pairs(t.sft_data, None)
        held, train_pairs = pairs[-args.heldout_sft:], pairs[:t.sft_max_examples]
        held_ex = prompt_answer_examples(held, tokenizer, t.seq_len)
        train_ex = prompt_answer_examples(train_pairs, tokenizer, t.seq_len)
        bg = heldout_batches(Path(args.data), tokenizer, t.seq_len, t.batch_size, args.eval_batches)
        before = {"heldout_wiki_loss": eval_loss(model, bg), "gsm8k_answer_loss": answer_loss(model, held_ex, pad)}
        schedule = ExampleSchedule(train_ex, t.batch_size, t.loop.seed, pad)
        optim = dataclasses.replace(t.loop.optim, lr_base=args.sft_lr, lr_memory=2 * args.sft_lr, lr_values=2 * args.sft_lr,
                                    warmup_steps=min(10, max(args.sft_steps // 5, 1)))
        loop = dataclasses.replace(t.loop, max_steps=args.sft_steps, eval_every=max(args.sft_steps // 2, 1), trainable="all",
                                   optim=optim, early_stop_patience=None, max_minutes=None)
        sft_eval = [pad_examples(held_ex[i:i + 16], pad) for i in range(0, min(len(held_ex), 64), 16)]
        t0 = time.perf_counter()
        clear_state(out / f"{name}_sft_state")  # a fresh SFT every time
        record = train(model, schedule.batch, sft_eval, loop, out / f"{name}_sft_state", progress=False)
        after = {"heldout_wiki_loss": eval_loss(model, bg), "gsm8k_answer_loss": answer_loss(model, held_ex, pad)}
        rows[name] = {"before": before, "after": after, "sft_steps": args.sft_steps, "sft_best_step": record["best_step"],
                      "sft_lr_base": args.sft_lr, "sft_seconds": time.perf_counter() - t0,
                      "heldout_wiki_ppl_change": math.exp(after["heldout_wiki_loss"]) / math.exp(before["heldout_wiki_loss"]) - 1}
        print(json.dumps({name: rows[name]}), flush=True)
    result = {"heldout_sft_examples": args.heldout_sft, "eval_batches": args.eval_batches, "variants": rows}
    (out / "phase.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["pretrain", "phase"])
    ap.add_argument("--params", default="profiles/moc.yaml")
    ap.add_argument("--data", default="runs/data")
    ap.add_argument("--out", default="runs/moc")
    ap.add_argument("--variants", default=None)
    ap.add_argument("--eval-batches", type=int, default=32, help="held-out Wikipedia batches scored per model")
    ap.add_argument("--heldout-sft", type=int, default=200, help="GSM8K examples held out of SFT")
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--sft-lr", type=float, default=3e-4, help="backbone learning rate of the SFT (memory: 2x)")
    args, overrides = ap.parse_known_args()
    torch.manual_seed(0)
    if args.what == "pretrain":
        args.variants = args.variants or ",".join(VARIANTS)
        pretrain(args, overrides)
    else:
        args.variants = args.variants or "dense,moc_causal"
        phase(args, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
