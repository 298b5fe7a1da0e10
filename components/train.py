"""Stage `train`: heal a retrofit, SFT it, or pretrain a memory / iso-FLOP dense model.

    python -m slotwise.components.train --params params.yaml --model runs/retrofit --data runs/data \\
        --out runs/train --state runs/train_state
    slotwise train --model runs/retrofit --data runs/data --out runs/train train.loop.max_steps=200
    slotwise train --nproc 2 --model runs/retrofit --data runs/data --out runs/train     # 2 ranks
    torchrun --standalone --nproc-per-node 8 -m slotwise.components.train --model ... --out ...

heal      memory parameters train on the background corpus (base frozen), early-stopped on
          held-out text; the summary reports perplexity with memory on and off, slot coverage,
          effective slots and median document frequency on held-out batches
sft       prompt/answer pairs (train.sft_data, e.g. GSM8K train) with the loss on the answers
pretrain  a fresh Llama-style model (train.pretrain: product-key memory beside or instead of one
          layer's FFN, Mixture of Chapters (retrofit.insert.memory.kind=chapters), or the iso-FLOP
          dense twin, train.pretrain.variant=dense), --model gives only the tokenizer (or
          train.pretrain.tokenizer_vocab: a byte-level BPE fitted to background/train.jsonl); e.g. the testbed:
          slotwise train --params profiles/testbed.yaml --model embedded:smollm2-135m-instruct \\
              --data runs/testbed/data --out runs/testbed/train

Killed at any point and rerun with the same --state, it resumes and ends with the same weights.
With --nproc N (or under torchrun) each rank trains on its rows of every batch, the value pools
split by column over the ranks (slotwise.distributed.training); rank 0 writes the usual checkpoint,
and --sharded-out also writes a DCP checkpoint that loads at any world size (dist_checkpoint).

Writes --out: a checkpoint (see slotwise.checkpoint) with summary.json (held-out perplexity memory
on / off, slot usage on held-out batches, the early-stopping record), metrics.json (held-out
perplexity before, with and without the memory: for `dvc metrics show`), history.json (every
step's losses), params.resolved.yaml and, with --live, live/ (the losses in dvclive's layout).
Device and seconds per step go to the log: the checkpoint's bytes do not depend on the machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slotwise.atomic import sha256_file
from slotwise.chapters import chapter_flops_per_token
from slotwise.checkpoint import load_checkpoint, model_hash, read_retrofit_config, recorded_base_model, save_checkpoint
from slotwise.components._cli import component_parser, run_cli
from slotwise.components._live import LIVE_DIR, live_logger, train_entry_logger
from slotwise.config import ConfigError, Params, load_params, to_yaml
from slotwise.diagnostics import memory_report
from slotwise.distributed.checkpoint import save_sharded
from slotwise.distributed import in_torchrun, init_from_env, relaunch, shutdown, strip_nproc
from slotwise.distributed.training import gather_for_save, prepare
from slotwise.evaluation.perplexity import perplexity
from slotwise.memory import MemoryConfig
from slotwise.retrofit import RetrofitConfig, decoder_layers, memory_layers, retrofit
from slotwise.schema import resolve_device
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


def iso_flop_intermediate(pp, mem: MemoryConfig) -> int:
    """FFN width of the dense twin: every layer's FFN, widened so the model costs what the memory model costs.

    Per token, an FFN of width I costs 3*d*I multiply-adds (gate, up, down) and a memory layer M
    (memory_flops_per_token). With L layers, n of them with memory:
        additive (FFN + memory in n layers):  3*d*I*L + n*M           = 3*d*I'*L  ->  I' = I + n*M / (3*d*L)
        replace  (memory instead of n FFNs):  3*d*I*(L - n) + n*M     = 3*d*I'*L  ->  I' = I + n*(M - 3*d*I) / (3*d*L)
    """
    d, n, L = pp.hidden_size, len(pp.memory_layers), pp.num_layers
    m = memory_flops_per_token(d, mem)
    extra = n * m if pp.memory_mode == "additive" else n * (m - 3 * d * pp.intermediate_size)
    return pp.intermediate_size + round(extra / (3 * d * L))


def pretrain_model(params: Params, vocab_size: int, bos: int, eos: int):
    """A fresh model: memory variant (retrofit.insert.memory: product_key or chapters; train.pretrain.memory_mode:
    beside or instead of the FFN of train.pretrain.memory_layers), or dense with every FFN widened to the
    same FLOPs per token (iso_flop_intermediate)."""
    pp, mem = params.train.pretrain, params.retrofit.insert.memory
    intermediate = iso_flop_intermediate(pp, mem) if pp.variant == "dense" else pp.intermediate_size
    if intermediate < 1:
        raise ConfigError(f"train.pretrain: the iso-FLOP dense twin's FFN width comes out at {intermediate}; "
                          "raise intermediate_size or shrink the memory")
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=pp.hidden_size, intermediate_size=intermediate,
                         num_hidden_layers=pp.num_layers, num_attention_heads=pp.num_heads,
                         num_key_value_heads=pp.num_kv_heads, max_position_embeddings=max(2048, params.train.seq_len),
                         bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=True)
    torch.manual_seed(params.train.loop.seed)
    model = AutoModelForCausalLM.from_config(config)
    cfg = None
    if pp.variant == "memory":
        cfg = RetrofitConfig(layers=list(pp.memory_layers), mode=pp.memory_mode, alpha=1.0,
                             memory=MemoryConfig(**{**vars(mem), "out_init_std": pp.memory_out_init_std}))
        retrofit(model, cfg)
    return model, cfg, intermediate


def load_for_training(params: Params, model_dir: str, data_dir: Path | None = None):
    """-> (model, tokenizer, retrofit config or None)."""
    if params.train.mode == "pretrain":
        from transformers import AutoTokenizer

        from slotwise.models import resolve_source

        if params.train.pretrain.tokenizer_vocab is not None:  # fitted to the pretraining text (slotwise.tokenizer)
            from slotwise.tokenizer import train_bpe

            if data_dir is None:
                raise ConfigError("train.pretrain.tokenizer_vocab needs the data stage's output (--data)")
            tokenizer = train_bpe(read_texts(data_dir / "background/train.jsonl", params.train.max_docs),
                                  params.train.pretrain.tokenizer_vocab)
        else:
            path, kw = (model_dir, {}) if Path(model_dir, "tokenizer_config.json").is_file() else resolve_source(model_dir)
            tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        model, cfg, _ = pretrain_model(params, len(tokenizer), tokenizer.bos_token_id or 0, tokenizer.eos_token_id)
        return model, tokenizer, cfg
    model, tokenizer = load_checkpoint(model_dir)
    cfg = read_retrofit_config(model_dir)
    if params.train.mode == "heal" and not memory_layers(model):
        raise ConfigError(f"train.mode=heal needs a retrofitted model; {model_dir} has no memory layers")
    return model, tokenizer, cfg


def ffn_teachers(params: Params, cfg: RetrofitConfig | None, model, model_dir: str, device) -> dict | None:
    """The base model's FFNs at the memory layers that replaced them (train.loop.distil_weight > 0).

    The base is the one the checkpoint records (its slotwise.json) where that resolves here, else this
    run's retrofit.base_model: a retrofit of a local model healed with the default params must not be
    taught SmolLM2's FFNs. A base of another width is refused."""
    if not params.train.loop.distil_weight:
        return None
    if params.train.mode != "heal" or cfg is None or cfg.mode != "replace":
        raise ConfigError("train.loop.distil_weight > 0 distils replaced FFNs: it needs train.mode=heal on a "
                          "retrofit with retrofit.insert.mode=replace")
    from slotwise.models import load_base_model

    recorded = recorded_base_model(model_dir)  # a local path is recorded as given: it may be relative to another folder
    usable = recorded is not None and (recorded.startswith("embedded:") or Path(recorded).exists())
    base_id = recorded if usable else params.retrofit.base_model
    base, _ = load_base_model(base_id)
    if base.config.hidden_size != model.config.hidden_size:
        raise ConfigError(f"train.loop.distil_weight: the base model {base_id} has width {base.config.hidden_size}, "
                          f"{model_dir} has {model.config.hidden_size}: the FFNs to distil are not this model's")
    layers = decoder_layers(base)
    teachers = {i % len(layers): layers[i].mlp.to(device).eval().requires_grad_(False) for i in cfg.layers}
    log.info("distilling the FFNs of layers %s of %s into their memories (weight %g)", sorted(teachers),
             base_id, params.train.loop.distil_weight)
    return teachers


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


def headline_metrics(summary: dict) -> dict:
    """Held-out perplexity before training, after it (memory on), and after it with the memory off: the
    stage's few numbers for `dvc metrics show` (the rest stays in summary.json)."""
    out = {"before": summary["initial_eval_ppl"], "memory_on": summary["best_eval_ppl"]}
    if "memory" in summary:
        out["memory_off"] = summary["memory"]["heldout_ppl_memory_off"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = component_parser("slotwise train", __doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/retrofit", help="checkpoint to train (pretrain: tokenizer source)")
    parser.add_argument("--data", default="runs/data", help="data stage output")
    parser.add_argument("--out", default="runs/train", help="output checkpoint directory")
    parser.add_argument("--state", default=None, help="resumable state directory (default: <out>_state)")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this host; > 1 reruns the stage under torchrun")
    parser.add_argument("--sharded-out", default=None, help="also write a DCP checkpoint here (loads at any world size)")
    parser.add_argument("--live", action="store_true", help="log the loss curves with dvclive into <out>/live (dvc.yaml does)")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.overrides)
    t = params.train
    if args.nproc < 1:
        raise ConfigError(f"--nproc: expected a whole number >= 1, got {args.nproc}")
    world = int(os.environ.get("WORLD_SIZE", args.nproc)) if in_torchrun() else args.nproc
    if t.batch_size % world:  # each rank's mean loss must weigh as many tokens as the others'
        raise ConfigError(f"key 'train.batch_size': {t.batch_size} rows do not split evenly over {world} ranks "
                          f"(use a multiple of {world})")
    if args.nproc > 1 and not in_torchrun():  # params are valid (checked above): start the ranks
        return relaunch("slotwise.components.train", strip_nproc(sys.argv[1:] if argv is None else argv)[1], args.nproc)
    state = Path(args.state or f"{args.out}_state")
    d = init_from_env(t.device)
    device = d.device if d is not None else resolve_device(t.device, "train.device")
    data = Path(args.data)

    model, tokenizer, cfg = load_for_training(params, args.model, data)
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

    base_ppl = perplexity(model, torch.cat(eval_blocks).to(device), batch_size=len(eval_blocks[0]))
    # Pretraining trains every weight; heal and SFT train what train.loop.trainable says.
    loop = dataclasses.replace(t.loop, trainable="all") if t.mode == "pretrain" else t.loop
    # A state from a run with other params, another starting model or other data is not resumed.
    inputs = [data / "background/heldout.jsonl", Path(t.sft_data) if t.mode == "sft" else data / "background/train.jsonl"]
    fingerprint = hashlib.sha256(json.dumps({"train": to_yaml(t), "model": model_hash(args.model) if t.mode != "pretrain" else None,
                                             "data": [sha256_file(f) for f in inputs]}, sort_keys=True).encode()).hexdigest()
    teachers = ffn_teachers(params, cfg, model, args.model, device)
    with tempfile.TemporaryDirectory(prefix="slotwise-train-live-") as live_tmp:
        live_dir = Path(live_tmp) / LIVE_DIR if args.live and (d is None or d.is_main) else None
        with live_logger(live_dir) as live:
            if d is None:
                record = train(model, batch_at, eval_batches, loop, state, device=device, fingerprint=fingerprint,
                               teachers=teachers, on_entry=train_entry_logger(live))
            else:
                record = train(prepare(model, d, loop.trainable), batch_at, eval_batches, loop, state, device=device,
                               fingerprint=fingerprint, dist=d, teachers=teachers, on_entry=train_entry_logger(live))
        if d is not None:
            if args.sharded_out:
                save_sharded(model, args.sharded_out, tokenizer, cfg, extra={"trained_from": args.model, "train_mode": t.mode})
            if not gather_for_save(model, d):  # rank 0 has the full value pools and writes the checkpoint
                d.barrier()
                shutdown()
                return 0
        # Environment-dependent facts (device, seconds per step) go to the log, not into the checkpoint.
        summary = {"mode": t.mode, **({"world_size": d.world} if d is not None else {}), "initial_eval_ppl": base_ppl,
                   **{k: v for k, v in record.items() if k != "history"}}
        if memory_layers(model):
            stats_blocks = pack_blocks(read_texts(data / "background/stats.jsonl"), tokenizer, t.seq_len)
            summary["memory"] = memory_report(model, [b.to(device) for b in eval_blocks],
                                              [b for b in fixed_batches(stats_blocks, t.batch_size, t.report_batches)])
        log.info("device %s; %s", device, json.dumps({k: v for k, v in summary.items() if k not in ("memory",)}, indent=None)[:400])
        save_checkpoint(model.cpu(), tokenizer, args.out, cfg, extra={"trained_from": args.model, "train_mode": t.mode},
                        extra_files={"summary.json": json.dumps(summary, indent=2),
                                     "metrics.json": json.dumps({"heldout_ppl": headline_metrics(summary)}, indent=2),
                                     "history.json": json.dumps(record["history"], indent=1),
                                     "params.resolved.yaml": to_yaml(params)},
                        extra_dirs={LIVE_DIR: live_dir} if live_dir is not None else None)
    log.info("wrote %s", args.out)
    if d is not None:
        d.barrier()
        shutdown()
    return 0


if __name__ == "__main__":
    run_cli(main)
