"""Compile every Triton kernel for a GPU that need not be here; report registers, spills, shared memory.

    python -m slotwise.kernels.compile_check [--arch 90] [--cases 1m-576,...] [--kernels _walk,...] [--json out.json]

Triton ships ptxas and cuobjdump, so the kernels compile for sm_90 (H100) on a machine without a
GPU. Each host wrapper runs on small CPU tensors with the bench cases' widths (D, heads, knn,
n_keys: what the kernels are specialised on); every launch it would make is captured instead of
run, specialised the way the runtime would (dtypes, 16-byte alignment, divisibility by 16) and
compiled. The table shows per kernel: num_warps, REG (registers a thread), STACK / LOCAL (bytes a
thread spills: should be 0) and SHARED (bytes a program). It checks that the kernels compile and
what limits their occupancy (registers x threads against the SM's 64K registers); it says nothing
about speed. Exit 1 if any kernel fails to compile; spills are flagged, not failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile


def _capture(run_wrappers):
    """Run the host wrappers with every JIT launch recorded instead of executed -> [(fn, args, kwargs)]."""
    from triton.runtime.jit import JITFunction

    launches = []
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda self, grid: (lambda *a, **k: launches.append((self, a, k)))
    try:
        run_wrappers()
    finally:
        JITFunction.__getitem__ = original
    return launches


def _compile(fn, args, kwargs, arch: int):
    """Specialise and compile one launch for cuda:arch, as JITFunction.run would -> CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _resources(cubin: bytes) -> dict:
    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", text)}


def _case_wrappers(case):
    """The host wrappers of every kernel at one bench case's widths, on small CPU tensors."""
    import torch

    from . import product_key, product_key_grad, sparse_update, weighted_bag_triton
    from .histogram import slot_histogram_triton

    T, H, knn, n_keys, D, K, _ = case
    T = 64
    N = 4096  # the table's height does not specialise any kernel
    g = torch.Generator().manual_seed(0)

    def run():
        for dtype in (torch.bfloat16, torch.float32):
            q = torch.randn(T, H, K, generator=g).to(dtype)
            keys = torch.randn(H, 2, n_keys, K // 2, generator=g).to(dtype)
            product_key.pk_topk_triton(q, keys, knn)
            product_key.pk_topk_triton(q, keys, knn, usage=True)
            product_key_grad.pk_topk_backward_triton(q, keys, torch.randint(0, n_keys**2, (T, H, knn)),
                                                torch.randn(T, H, knn, generator=g))
        for dtype in (torch.bfloat16, torch.float32):
            values = torch.randn(N, D, generator=g).to(dtype)
            ids = torch.randint(0, N, (T, H, knn), generator=g)
            w = torch.rand(T, H, knn, generator=g)
            grad_out = torch.randn(T, D, generator=g).to(dtype)
            weighted_bag_triton.weighted_bag_forward_triton(values, ids, w)
            weighted_bag_triton.weighted_bag_grad_weights_triton(values, ids, grad_out)
            weighted_bag_triton.weighted_bag_backward_triton(values, ids, w, grad_out)
            weighted_bag_triton.weighted_bag_backward_dense_triton(values, ids, w, grad_out)
            for state_dtype in (torch.float32, torch.bfloat16):
                state = (torch.zeros(N, D, dtype=state_dtype), torch.zeros(N, D, dtype=state_dtype),
                         torch.zeros(N, dtype=torch.int64))
                sparse_update.weighted_bag_backward_step_triton("adam", values, state, ids, w, grad_out, 1e-3,
                                                                return_rows=False)
            sparse_update.weighted_bag_backward_step_triton("adagrad", values, (torch.zeros(N),), ids, w, grad_out,
                                                            1e-2, return_rows=False)
            rows = torch.arange(0, N, 7)
            sparse_update.sparse_step_triton("adam", values, (torch.zeros(N, D), torch.zeros(N, D),
                                                              torch.zeros(N, dtype=torch.int64)),
                                             rows, torch.randn(rows.numel(), D), 1e-3)
        slot_histogram_triton(torch.randint(0, n_keys**2, (T, H, knn)), n_keys**2)

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100, 100 = B200)")
    p.add_argument("--cases", default=None, help="comma-separated bench cases (default: all)")
    p.add_argument("--kernels", default=None, help="only kernels whose name contains one of these (comma-separated)")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    from .bench import CASES

    labels = args.cases.split(",") if args.cases else list(CASES)
    rows, failed = [], False
    for label in labels:
        if label not in CASES:
            print(f"compile_check: unknown case {label!r}; expected one of {list(CASES)}", file=sys.stderr)
            return 2
        seen = set()
        for fn, a, kw in _capture(_case_wrappers(CASES[label])):
            key = (fn.__name__, tuple(sorted((k, str(v)) for k, v in kw.items())),
                   tuple(str(x.dtype) for x in a if hasattr(x, "dtype")))
            if key in seen or (args.kernels and not any(k in fn.__name__ for k in args.kernels.split(","))):
                continue
            seen.add(key)
            consts = {k: v for k, v in kw.items() if k.isupper() or k.startswith("num_")}
            try:
                res = _resources(_compile(fn, a, kw, args.arch).asm["cubin"])
                err = None
            except Exception as e:  # noqa: BLE001 -- report every kernel, then fail
                res, err = {}, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            failed |= err is not None
            spills = bool(res.get("local", 0) or res.get("stack", 0))
            dtypes = ",".join(sorted({str(x.dtype).removeprefix("torch.") for x in a if hasattr(x, "dtype")}))
            rows.append(dict(case=label, kernel=fn.__name__, dtypes=dtypes, config=consts, error=err, spills=spills,
                             **res))
            print(f"{label:13s} {fn.__name__:22s} {dtypes:24s} warps={kw.get('num_warps', 4)} "
                  + (f"REG={res['reg']:3d} STACK={res['stack']:4d} LOCAL={res['local']:4d} SHARED={res['shared']:6d}" if not err else f"FAILED {err}")
                  + (" SPILLS" if spills else "") + f"  {consts}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, kernels=rows), f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
