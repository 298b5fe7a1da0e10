"""What counting slot accesses costs: plain forward vs forward + slot statistics, same batches.

    python scripts/bench_slot_stats.py [--json out.json] [--model runs/retrofit] [--batches 8] [--threads 1]

Times, in one process and over the same batches, (a) `model(batch)` under no_grad and (b)
slot_stats.collect (record_lookups + slot_histogram + accumulation into the tables), alternating
the two, `--repeats` times; prints the medians and the overhead (b - a) / a. The target is at
most 10%. Without --model a tiny-but-not-trivial retrofitted Llama is built in memory (hidden
256, 4 layers, memory in layers 1 and 3 with 128^2 slots, 4 heads, knn 16); with --model a
slotwise checkpoint is loaded (e.g. the default retrofit of SmolLM2-135M).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from slotwise.schema import Device, resolve_device
from slotwise.slot_stats import collect


def tiny_memory_model(shared: bool = False, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slotwise.memory import MemoryConfig
    from slotwise.retrofit import RetrofitConfig, retrofit

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=4096, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg)
    mem = MemoryConfig(n_keys=128, heads=4, knn=16, k_dim=256, shared_values=shared, out_init_std=0.02)
    return retrofit(model, RetrofitConfig(layers=[1, 3], memory=mem)).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def plain(model, batches: list[torch.Tensor]) -> None:
    device = next(model.parameters()).device
    for b in batches:
        model(b.to(device))
    _sync(device)


def with_stats(model, batches: list[torch.Tensor]) -> None:
    collect(model, batches)
    _sync(next(model.parameters()).device)


def bench(model, batches: list[torch.Tensor], repeats: int = 5) -> dict:
    plain(model, batches[:1])  # warm up both paths
    with_stats(model, batches[:1])
    times = {"plain": [], "with_stats": []}
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("with_stats", with_stats)):
            t0 = time.perf_counter()
            fn(model, batches)
            times[name].append(time.perf_counter() - t0)
    p, w = statistics.median(times["plain"]), statistics.median(times["with_stats"])
    return {"batches": len(batches), "batch_shape": list(batches[0].shape), "repeats": repeats,
            "plain_s": p, "with_stats_s": w, "overhead_pct": 100 * (w - p) / p, "times": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a slotwise checkpoint directory (default: a tiny model built in memory)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shared", action="store_true", help="tiny model: one value pool shared by both memory layers")
    parser.add_argument("--device", default="auto", choices=Device.values())
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 gives steadier numbers on a shared machine)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, "--device")
    if args.model:
        from slotwise.checkpoint import load_checkpoint

        model, _ = load_checkpoint(args.model, device=device)
        name = args.model
    else:
        model = tiny_memory_model(args.shared).to(device)
        name = "tiny llama h256 x4, memory 128^2 slots in layers 1,3" + (" (shared pool)" if args.shared else "")
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g) for _ in range(args.batches)]
    result = {"model": name, "device": str(device), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "machine": platform.machine(), **bench(model, batches, args.repeats)}
    print(f"model: {name}  device: {device}  threads: {result['threads']}")
    print(f"{'batches':>8} {'batch':>10} {'plain s':>9} {'with stats s':>13} {'overhead %':>11}")
    print(f"{result['batches']:>8} {'x'.join(map(str, result['batch_shape'])):>10} {result['plain_s']:>9.3f} "
          f"{result['with_stats_s']:>13.3f} {result['overhead_pct']:>11.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
