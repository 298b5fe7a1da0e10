"""Mixture of Chapters scaling: time per training step and memory as the bank grows, chapters read fixed.

    python scripts/moc_scaling.py --out results/moc-cpu/scaling [--sizes 4096,16384,65536,262144] [--steps 6]

A small Llama (d 256, 4 layers, vocab 4096, random tokens, batch 8 x 128) with one chapter layer
(layer 2: chapters of 64 tokens, top-4 + the shared chapter, 4 heads of 64) trains for a few steps
at each bank size (memory tokens = (n_chapters + 1) * 64), with dense Adam on the bank and with
sparse bank gradients + SparseAdam; then the chapter layer alone, forward + backward. Times are
wall clock and process CPU time (less sensitive to other processes on a shared machine). Each (size, optimizer) runs in its own process so the peak
resident memory (ru_maxrss) is its own. Writes scaling.json and scaling.png under --out.
Runs the kernels' reference path on CPU and the Triton kernel on CUDA (slotwise.kernels dispatch).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CHAPTER_TOKENS = 64


def one_run(bank_tokens: int, sparse: bool, steps: int, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slotwise.memory import ChapterConfig, MemoryConfig
    from slotwise.optim import OptimParams, build_optimizers, trainable_groups
    from slotwise.retrofit import RetrofitConfig, retrofit
    from slotwise.training import lm_loss

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    n_chapters = bank_tokens // CHAPTER_TOKENS - 1
    mem = MemoryConfig(kind="chapters", heads=4, sparse_grad=sparse, out_init_std=0.02,
                       chapters=ChapterConfig(n_chapters=n_chapters, chapter_tokens=CHAPTER_TOKENS, top_c=4, chunk_len=32))
    retrofit(model, RetrofitConfig(layers=[2], memory=mem))
    model.to(device).train()
    opts = build_optimizers(model, trainable_groups(model, "all"), OptimParams(lr_values=1e-3, lr_memory=1e-3, lr_base=1e-3))
    g = torch.Generator().manual_seed(seed)
    times, fwd_times, cpu_times = [], [], []
    for step in range(steps + 2):  # two warm-up steps
        ids = torch.randint(0, 4096, (8, 128), generator=g).to(device)
        batch = {"input_ids": ids, "labels": ids}
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss, _ = lm_loss(model, batch, 1.0)
        t1 = time.perf_counter()
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts.values():
            o.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t0)
            fwd_times.append(t1 - t0)
            cpu_times.append(time.process_time() - c0)
    layer = model.model.layers[2].mlp.memory
    x = torch.randn(8, 128, 256, generator=g).to(device)
    layer_times = []
    for i in range(steps + 1):  # the memory layer alone, forward + backward
        c0 = time.process_time()
        layer(x).out.sum().backward()
        if i:
            layer_times.append(time.process_time() - c0)
    bank = layer.values.weight
    return {
        "bank_tokens": bank_tokens, "n_chapters": n_chapters, "sparse_grad": sparse, "device": device,
        "tokens_read_per_token": 5 * CHAPTER_TOKENS, "bank_params": bank.numel(),
        "total_params": sum(p.numel() for p in model.parameters()),
        "step_s_median": statistics.median(times), "step_s_min": min(times),
        "forward_s_median": statistics.median(fwd_times), "steps": steps,
        "step_cpu_s_median": statistics.median(cpu_times), "memory_layer_fwd_bwd_cpu_s_median": statistics.median(layer_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for sparse, label in ((False, "dense Adam"), (True, "sparse grad + SparseAdam")):
        rs = sorted((r for r in rows if r["sparse_grad"] == sparse), key=lambda r: r["bank_tokens"])
        x = [r["bank_tokens"] for r in rs]
        a.plot(x, [r["step_cpu_s_median"] for r in rs], "o-", label=f"{label}: training step")
        a.plot(x, [r["memory_layer_fwd_bwd_cpu_s_median"] for r in rs], "x--", label=f"{label}: memory layer fwd+bwd")
        b.plot(x, [r["peak_rss_mb"] for r in rs], "o-", label=label)
    for ax, ylabel in ((a, "CPU seconds (process time)"), (b, "peak RSS (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory tokens in the bank (top-4 + shared of 64 read)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a.set_title("time per training step (8 x 128 tokens)")
    b.set_title("memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/moc-cpu/scaling")
    ap.add_argument("--sizes", default="4096,16384,65536,262144", help="memory tokens in the bank (multiples of 64)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: "<tokens>,<sparse 0|1>"
    args = ap.parse_args()
    if args.one:
        tokens, sparse = args.one.split(",")
        print(json.dumps(one_run(int(tokens), sparse == "1", args.steps)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in map(int, args.sizes.split(",")):
        for sparse in (0, 1):
            res = subprocess.run([sys.executable, __file__, "--one", f"{size},{sparse}", "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"bank {size:>7} sparse={sparse}: step {r['step_s_median']:.3f} s ({r['step_cpu_s_median']:.3f} CPU s)  "
                  f"memory layer fwd+bwd {r['memory_layer_fwd_bwd_cpu_s_median']:.3f} CPU s  peak RSS {r['peak_rss_mb']:.0f} MB",
                  flush=True)
    meta = {"torch": torch.__version__, "argv": sys.argv[1:], "cpu_count": __import__("os").cpu_count()}
    (out / "scaling.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    plot(rows, out / "scaling.png")
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
