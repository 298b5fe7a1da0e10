"""Benchmark the memory kernels against the best plain PyTorch a user would write, and the bytes floor.

    python -m slotwise.kernels.bench [--json bench_out/kernels_bench.json] [--quick]
                                     [--cases 1m-576,1m-1024,retrofit-896,moc-paper] [--dists uniform,zipf] [--budget 1.0]

On CUDA, in one process: measures the device's copy bandwidth, then for each case and id
distribution times every op, ours and the baseline, each for a fixed time budget (>= 20 runs, L2
flushed before each, CUDA events around the op alone) and reports min / median / max ms. Baselines
(bench_ops.py): bf16 matmul + torch.topk with autograd for the lookup, F.embedding_bag with
per_sample_weights (sparse=True for the backward), torch.optim.SparseAdam for the update; never a
reference that upcasts the table. Floors: the bytes the best design must move / copy bandwidth:
forward M*D*e + M*8 + T*D*e, sparse backward U*D*(e+4) + M*12 + T*D*e, fused backward + Adam
U*D*(2e+16) + M*12 + T*D*e (M = T*H*knn entries, U unique rows, e bytes per value). Ids: the
lookup's own (about uniform) or Zipf (s = 1.15 over randomly placed rows: U/M about 10%, one row in
~15% of the entries). Prints a table, writes JSON with the card's name.
Without CUDA it says so and exits 0; --quick then runs a tiny interpreted smoke check instead.
The moc-* cases time routed chapter cross-attention (bench_chapters.py: reference vs Triton vs
scaled_dot_product_attention on the gathered chapters, forward and forward+backward, median ms).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

from .bench_chapters import CHAPTER_CASES, bench_chapter_case, print_chapter_table

# (tokens, heads, knn, n_keys, D, k_dim, d_model): the shapes; N = n_keys**2 slots
CASES = {
    "1m-576": (8192, 4, 32, 1024, 576, 256, 576),
    "1m-1024": (8192, 4, 32, 1024, 1024, 256, 1024),
    "retrofit-896": (8192, 4, 32, 128, 896, 256, 896),
}
QUICK_CASE = (9, 3, 5, 13, 41, 10, 16)  # interpreter smoke shapes
DISTS = ("uniform", "zipf")
ZIPF_S = 1.15
MIN_RUNS = 20


class Timer:
    """ms of fn on the device: warm up, then run for `budget` seconds and at least MIN_RUNS times,
    each run after an L2 flush and timed by CUDA events around fn alone -> dict(min, median, max, runs)."""

    def __init__(self, budget: float):
        self.budget = budget
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> dict:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times, spent = [], 0.0
        while len(times) < MIN_RUNS or spent < self.budget * 1e3:
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            spent += times[-1]
            if len(times) >= 10_000:
                break
        return dict(min=min(times), median=statistics.median(times), max=max(times), runs=len(times))


def copy_bandwidth(timer: Timer) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write): the floors' yardstick."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (timer(lambda: dst.copy_(src))["median"] * 1e-3)


def zipf_ids(shape, n_slots: int, s: float, generator, device: str = "cuda") -> torch.Tensor:
    """Ids with P(rank k) ~ k**-s, the ranks placed on randomly chosen rows."""
    p = torch.arange(1, n_slots + 1, dtype=torch.float64, device=device).pow(-s)
    ranks = torch.multinomial((p / p.sum()).float(), int(torch.Size(shape).numel()), replacement=True,
                              generator=generator)
    return torch.randperm(n_slots, device=device, generator=generator)[ranks].view(shape)


def floors(T, H, knn, D, elt, U) -> dict:
    """Bytes the best design must move, per op."""
    M = T * H * knn
    return {"bag forward": M * D * elt + M * 8 + T * D * elt,
            "bag backward (sparse)": U * D * (elt + 4) + M * 12 + T * D * elt,
            "bag backward + adam (fused)": U * D * (2 * elt + 16) + M * 12 + T * D * elt}


def bench_case(label, case, dist, timer, bw, results, dtype):
    from . import bench_ops

    T, H, knn, n_keys, D, K, d_model = case
    g = torch.Generator(device="cuda").manual_seed(0)
    s = bench_ops.setup(case, dtype, g)
    if dist == "zipf":
        s["ids"] = zipf_ids(s["ids"].shape, n_keys * n_keys, ZIPF_S, g)
    U = int(torch.unique(s["ids"]).numel())
    M = T * H * knn
    shape = f"T{T} H{H} knn{knn} N{n_keys}^2 D{D} {str(dtype).removeprefix('torch.')} {dist} U/M={U / M:.3f}"
    nbytes = floors(T, H, knn, D, s["values"].element_size(), U)
    for op, ours, base in bench_ops.pairs(s, case):
        if dist == "zipf" and op.startswith(("pk_topk", "layer")):
            continue  # the lookup does not see the id distribution; the layer uses the lookup's ids
        r_ours, r_base = timer(ours), timer(base)
        row = dict(case=label, dist=dist, op=op, shape=shape, U=U, M=M, ours_ms=r_ours, baseline_ms=r_base,
                   speedup=r_base["median"] / r_ours["median"])
        if op in nbytes:
            row.update(bytes=nbytes[op], floor_ms=nbytes[op] / bw * 1e3,
                       effective_tb_s=nbytes[op] / (r_ours["median"] * 1e-3) / 1e12)
            row["x_floor"] = r_ours["median"] / row["floor_ms"]
        results.append(row)
        print(_format(row), flush=True)


def _format(r) -> str:
    o, b = r["ours_ms"], r["baseline_ms"]
    floor = f"{r['floor_ms']:8.3f} {r['x_floor']:6.2f}x {r['effective_tb_s']:5.2f}" if "floor_ms" in r else " " * 24
    return (f"{r['case']:13s} {r['dist']:7s} {r['op']:30s} {o['min']:8.3f} {o['median']:8.3f} {o['max']:8.3f} "
            f"{b['median']:9.3f} {r['speedup']:7.1f}x {floor}")


HEADER = (f"{'case':13s} {'ids':7s} {'op':30s} {'min ms':>8s} {'med ms':>8s} {'max ms':>8s} {'torch ms':>9s} "
          f"{'speedup':>8s} {'floor ms':>8s} {'/floor':>7s} {'TB/s':>5s}")


def smoke_check() -> list[dict]:
    """Tiny interpreted run of every Triton op against its reference (CPU, about a minute)."""
    from . import slot_histogram, weighted_bag_backward, weighted_bag_backward_adam_
    from .histogram_reference import slot_histogram_reference
    from .product_key import pk_topk_triton
    from .product_key_reference import pk_topk_reference
    from .weighted_bag_triton import weighted_bag_forward_triton
    from .weighted_bag_reference import weighted_bag_backward_reference, weighted_bag_reference

    T, H, knn, n_keys, D, K, _ = QUICK_CASE
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(T, H, K, generator=g), torch.randn(H, 2, n_keys, K // 2, generator=g)
    values, grad_out = torch.randn(n_keys**2, D, generator=g), torch.randn(T, D, generator=g)
    checks = []
    _, ids = pk_topk_triton(q, keys, knn)
    checks.append(("pk_topk ids", torch.equal(ids, pk_topk_reference(q, keys, knn)[1])))
    w = torch.softmax(torch.randn(ids.shape, generator=g), -1)
    out = weighted_bag_forward_triton(values, ids, w)
    checks.append(("bag forward", torch.allclose(out, weighted_bag_reference(values, ids, w), atol=1e-5)))
    got = weighted_bag_backward(values, ids, w, grad_out, backend="triton")
    ref = weighted_bag_backward_reference(values, ids, w, grad_out)
    checks.append(("bag backward", all(torch.allclose(a.float(), b.float(), atol=1e-5) for a, b in zip(got, ref))))
    tables = [(values.clone(), torch.zeros_like(values), torch.zeros_like(values), torch.zeros(len(values), dtype=torch.long))
              for _ in range(2)]
    for table, backend in zip(tables, ("triton", "torch")):
        weighted_bag_backward_adam_(*table, ids, w, grad_out, 1e-2, backend=backend)
    checks.append(("fused adam", all(torch.allclose(a.float(), b.float(), atol=1e-5) for a, b in zip(*tables))))
    counts, _ = slot_histogram(ids, n_keys * n_keys, backend="triton")
    checks.append(("histogram", torch.equal(counts, slot_histogram_reference(ids, n_keys * n_keys)[0])))
    from .bench_chapters import smoke_check_chapters

    checks += smoke_check_chapters()
    for name, ok in checks:
        print(f"  smoke {name:14s} {'ok' if ok else 'MISMATCH'}")
    return [dict(check=n, ok=bool(ok)) for n, ok in checks]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="bench_out/kernels_bench.json", help="where to write the results")
    p.add_argument("--quick", action="store_true", help="first case, uniform ids, 0.2 s a timing (CPU: smoke check)")
    p.add_argument("--cases", default=",".join([*CASES, *CHAPTER_CASES]),
                   help=f"comma-separated, from {list(CASES) + list(CHAPTER_CASES)}")
    p.add_argument("--dists", default=",".join(DISTS), help=f"comma-separated, from {list(DISTS)}")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of device time per timing (>= 20 runs)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    labels, dists = args.cases.split(","), args.dists.split(",")
    bad = [x for x in labels if x not in CASES and x not in CHAPTER_CASES] + [x for x in dists if x not in DISTS]
    if bad:
        print(f"slotwise.kernels.bench: unknown case or distribution {bad}; cases {list(CASES)}, dists {list(DISTS)}",
              file=sys.stderr)
        return 2
    meta = dict(torch=torch.__version__, python=platform.python_version(), argv=sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("slotwise.kernels.bench: no CUDA device; the timings need a GPU (the Triton kernels run "
              "on CPU only interpreted, which says nothing about speed).", flush=True)
        if args.quick and os.environ.get("TRITON_INTERPRET") != "1":
            # the interpreter must be chosen before triton is imported: run the smoke check in a child
            env = dict(os.environ, TRITON_INTERPRET="1")
            argv = sys.argv[1:] if argv is None else argv
            return subprocess.run([sys.executable, "-m", "slotwise.kernels.bench", *argv], env=env).returncode
        if args.quick:
            meta["smoke"] = smoke_check()
            _write(args.json, dict(meta, device="cpu", results=[]))
            return 0 if all(c["ok"] for c in meta["smoke"]) else 1
        return 0
    import triton

    meta["triton"] = triton.__version__

    dtype = getattr(torch, args.dtype)
    if args.quick:
        labels, dists, args.budget = labels[:1], dists[:1], 0.2
    timer = Timer(args.budget)
    bw = copy_bandwidth(timer)
    meta.update(device=torch.cuda.get_device_name(), copy_bandwidth_bytes_s=bw, budget_s=args.budget, zipf_s=ZIPF_S)
    print(f"{meta['device']}: copy bandwidth {bw / 1e12:.3f} TB/s; times in ms over >= {MIN_RUNS} runs "
          f"and {args.budget} s each\n{HEADER}", flush=True)
    results: list[dict] = []
    chapter_rows: list[dict] = []
    for label in labels:
        if label in CHAPTER_CASES:
            chapter_rows += bench_chapter_case(label, CHAPTER_CASES[label], "cuda", dtype, lambda fn: timer(fn)["median"])
        else:
            for dist in dists:
                bench_case(label, CASES[label], dist, timer, bw, results, dtype)
        torch.cuda.empty_cache()
    if chapter_rows:
        print_chapter_table(chapter_rows)
    _write(args.json, dict(meta, results=results, chapter_attention=chapter_rows))
    return 0


def _write(path, payload):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
