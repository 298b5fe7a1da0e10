"""What the column-sharded value pool costs: bytes on the wire per rank, and the distributed path's overhead.

    python scripts/bench_distributed.py [--json out.json] [--worlds 2,4] [--tokens 2048] [--device cpu]
    python scripts/bench_distributed.py --device cuda --worlds 1 --tokens 8192 --dim 1024 --n-keys 1024 --knn 32

1. Overhead, in this process: one memory layer's forward + backward with its plain ValuePool
   against the same layer with a ShardedValuePool on a one-rank process group (gloo on CPU, NCCL on
   CUDA), alternating, --repeats times; then the same for a small retrofitted Llama's training step
   (plain vs DDP + sharded pools at world size 1). Medians and (sharded - plain) / plain.
2. Bytes, for each world size in --worlds: this script reruns itself under torchrun and every rank
   counts what it writes to its sockets (/proc/self/io wchar) during one forward and one backward
   of the sharded layer; the table sets that beside slotwise.distributed.exchange_bytes' model (gloo), and
   scales the measured/model ratio up to the paper's scale (8 ranks, 8,192 tokens per rank, 4
   heads, knn 32, D 1024, N 1M, bf16), next to row sharding and replicated data parallelism.
Prints tables; --json writes everything.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from slotwise.distributed.exchange_bytes import Scale, column_sharded, replicated, row_sharded
from slotwise.memory import MemoryConfig, ProductKeyMemory
from slotwise.distributed.memory import ShardedValuePool

PAPER = Scale(world=8, tokens=8192, heads=4, knn=32, dim=1024, n_slots=1 << 20)


def layer(a, device) -> ProductKeyMemory:
    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=a.n_keys, heads=a.heads, knn=a.knn, k_dim=a.k_dim, v_dim=a.dim, out_init_std=0.02,
                       balance="none")
    return ProductKeyMemory(a.d_model, a.d_model, cfg).to(device).train()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(mem, x) -> None:
    out = mem(x).out
    out.float().square().mean().backward()
    _sync(x.device)


def _alternate(fns: dict, repeats: int, device) -> dict[str, float]:
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm up
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def overhead(a, device) -> dict:
    """Plain vs distributed path at world size 1 (this process)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slotwise.distributed import Dist
    from slotwise.distributed.training import prepare
    from slotwise.retrofit import RetrofitConfig, retrofit

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    plain = layer(a, device)
    sharded = layer(a, device)
    sharded.values = ShardedValuePool.from_pool(sharded.values)
    x = torch.randn(a.tokens, a.d_model, device=device)
    res = {"layer": _alternate({"plain": lambda: _step(plain, x), "sharded_w1": lambda: _step(sharded, x)}, a.repeats, device)}

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=a.d_model, intermediate_size=3 * a.d_model, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=4096, max_position_embeddings=512)
        m = AutoModelForCausalLM.from_config(cfg)
        mem = MemoryConfig(n_keys=a.n_keys, heads=a.heads, knn=a.knn, k_dim=a.k_dim, out_init_std=0.02)
        return retrofit(m, RetrofitConfig(layers=[1, 3], memory=mem)).to(device).train()

    m_plain = model()
    d = Dist(0, 1, 0, device)
    m_dist = prepare(model(), d, "memory")
    from slotwise.optim import trainable_groups

    trainable_groups(m_plain, "memory")
    ids = torch.randint(0, 4096, (max(1, a.tokens // 128), 128), device=device)

    def train_step(m):
        m(input_ids=ids, labels=ids).loss.backward()
        _sync(device)

    res["model_step"] = _alternate({"plain": lambda: train_step(m_plain), "ddp_sharded_w1": lambda: train_step(m_dist)},
                                   a.repeats, device)
    dist.destroy_process_group()
    return res


def wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def worker(a) -> None:
    """Under torchrun: bytes and time of one sharded forward + backward per rank; rank 0 writes JSON."""
    from slotwise.distributed import init_from_env

    d = init_from_env(a.device)
    mem = layer(a, d.device)
    mem.values = ShardedValuePool.from_pool(mem.values)
    x = torch.randn(a.tokens, a.d_model, device=d.device)
    _step(mem, x)  # warm up (connections, allocations)
    mem.zero_grad(set_to_none=True)
    dist.barrier()
    t0, w0 = time.perf_counter(), wchar()
    out = mem(x).out
    _sync(d.device)
    t1, w1 = time.perf_counter(), wchar()
    out.float().square().mean().backward()
    _sync(d.device)
    t2, w2 = time.perf_counter(), wchar()
    mine = {"forward_bytes": w1 - w0, "backward_bytes": w2 - w1, "forward_s": t1 - t0, "backward_s": t2 - t1}
    every = [None] * d.world
    dist.all_gather_object(every, mine)
    if d.is_main:
        Path(a.worker_out).write_text(json.dumps(every))
    dist.destroy_process_group()


def measure(a, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w.json"
        argv = [str(Path(__file__).resolve()), "--worker-out", str(out), "--device", a.device, "--threads", str(a.threads)]
        for k in ("tokens", "d_model", "dim", "n_keys", "heads", "knn", "k_dim"):
            argv += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONWARNINGS": "ignore"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *argv],
                       env=env, check=True, capture_output=True)
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worlds", default="2,4", help="world sizes for the byte measurement (comma separated)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--dim", type=int, default=256, help="value width D")
    p.add_argument("--n-keys", type=int, default=256, help="N = n_keys^2 slots")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--knn", type=int, default=32)
    p.add_argument("--k-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker_out:
        return worker(a)
    device = torch.device(a.device)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads,
                          "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"},
              "shape": {k: getattr(a, k) for k in ("tokens", "d_model", "dim", "n_keys", "heads", "knn", "k_dim")}}
    ov = overhead(a, device)
    result["overhead"] = ov
    print(f"\nsingle-process overhead of the distributed path ({result['machine']['device']}, {a.threads} threads, medians of {a.repeats})")
    for what, t in ov.items():
        base, other = t["plain"], next(v for k, v in t.items() if k != "plain")
        print(f"  {what:<12} plain {base * 1e3:9.2f} ms   distributed, world 1 {other * 1e3:9.2f} ms   {100 * (other - base) / base:+.1f}%")
    bytes_rows, ratios = [], []
    for world in [int(w) for w in a.worlds.split(",") if int(w) > 1]:
        small = Scale(world=world, tokens=a.tokens, heads=a.heads, knn=a.knn, dim=a.dim, n_slots=a.n_keys**2,
                      value_bytes=4, weight_bytes=4)
        for rank, m in enumerate(measure(a, world)):
            model = column_sharded(small, rank, backend="gloo" if device.type == "cpu" else "ring")
            fwd = model["counts"] + model["ids"] + model["weights"] + model["outputs"]
            bwd = model["output_grads"] + model["weight_grads"]
            bytes_rows.append({"world": world, "rank": rank, **m, "forward_model": fwd, "backward_model": bwd})
            ratios.append((m["forward_bytes"] + m["backward_bytes"]) / (fwd + bwd))
    result["bytes"] = bytes_rows
    if bytes_rows:
        print(f"\nbytes sent per rank, one forward + backward of a sharded layer ({a.tokens} tokens/rank, fp32, gloo)")
        print("  world rank  fwd measured   fwd model  bwd measured   bwd model   fwd ms   bwd ms")
        for r in bytes_rows:
            print(f"  {r['world']:5d} {r['rank']:4d} {r['forward_bytes']:13,d} {r['forward_model']:11,d} "
                  f"{r['backward_bytes']:13,d} {r['backward_model']:11,d} {r['forward_s'] * 1e3:8.1f} {r['backward_s'] * 1e3:8.1f}")
    ring = sum(column_sharded(PAPER).values())
    gloo = sum(column_sharded(PAPER, backend="gloo").values())
    ratio = statistics.mean(ratios) if ratios else None
    paper = {"column_ring_model": ring, "column_gloo_model": gloo,
             "column_measured_scaled": gloo * ratio if ratio else None, "measured_over_model": ratio,
             "row_model": sum(row_sharded(PAPER).values()), "replicated_dense_fp32": sum(replicated(PAPER).values()),
             "replicated_sparse_rows": sum(replicated(PAPER, sparse=True).values()),
             "column_by_collective": column_sharded(PAPER)}
    result["paper_scale"] = paper
    print("\nper rank and memory read at the paper's scale (8 ranks, 8,192 tokens/rank, H 4, knn 32, D 1024, N 1M, bf16)")
    for k in ("column_ring_model", "column_gloo_model", "column_measured_scaled", "row_model", "replicated_dense_fp32",
              "replicated_sparse_rows"):
        if paper[k] is not None:
            print(f"  {k:<26} {paper[k] / 1e6:10.1f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
