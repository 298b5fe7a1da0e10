"""Kernel tests: the Triton kernels run on CPU under TRITON_INTERPRET=1 against the PyTorch references.

Fixtures for tests/kernels, imported by each test module (`from _kernel_fixtures import ...`)
rather than living in a conftest.py: tests elsewhere do `from conftest import ...`, and a second
conftest module would shadow tests/conftest.py in sys.modules.

The interpreter is chosen when a @triton.jit function is *defined*, so the variable is set here,
at collection, before any Triton kernel module (slotwise.kernels.product_key, ...) is imported.
slotwise.kernels itself imports no Triton at load time. But triton.language defines its own
@jit helpers (tl.zeros, tl.sum, tl.topk, ...) when triton is first imported, and transformers
imports triton (through torch) from tests/conftest.py before this module loads; those helpers are
then rebuilt as interpreted functions below. (Setting TRITON_INTERPRET=1 before pytest starts,
or at the top of tests/conftest.py, makes that unnecessary.) If a kernel module itself was
compiled for a GPU earlier in this process, or the variable was set to 0 on a machine without
CUDA, the Triton tests skip with the reason.

    pytest tests/kernels -q
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _interpret_triton_stdlib() -> None:
    """Rebuild triton.language's @jit helpers as interpreted functions if triton was imported earlier."""
    if "triton.language" not in sys.modules or torch.cuda.is_available():
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    rebuilt: dict[int, InterpretedFunction] = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("triton.language") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if isinstance(value, JITFunction):
                if id(value) not in rebuilt:
                    rebuilt[id(value)] = InterpretedFunction(value.fn)
                setattr(mod, attr, rebuilt[id(value)])


def _fast_interpreted_xor_reduce() -> None:
    """Give the interpreter a numpy path for xor reductions: tl.sort / tl.topk (bitonic networks) xor
    along size-2 axes, which the interpreter otherwise reduces one element at a time in Python
    (~90% of the interpreted product-key search's time). Same results, bit for bit."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter.ReduceOps, "_slotwise_fast_xor", False):
        return
    slow = interpreter.ReduceOps.apply_impl

    def apply_impl(self, input):
        if self.combine_fn is tl.standard._xor_combine and len(input) == 1:
            data = input[0].handle.data
            out = np.bitwise_xor.reduce(data, axis=self.axis, keepdims=self.keep_dims) if self.axis is not None \
                else np.bitwise_xor.reduce(data.flatten())
            return self.to_tensor(out, input[0].dtype)
        return slow(self, input)

    interpreter.ReduceOps.apply_impl = apply_impl
    interpreter.ReduceOps._slotwise_fast_xor = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpret_triton_stdlib()
    _fast_interpreted_xor_reduce()

KERNEL_MODULES = ("product_key", "weighted_bag_triton", "_segments", "histogram", "sparse_update")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def _why_triton_cannot_run() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"triton does not import: {e!r}"
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run here"
    from triton.runtime.interpreter import InterpretedFunction

    for name in KERNEL_MODULES:
        mod = sys.modules.get(f"slotwise.kernels.{name}")
        if mod is None:
            continue
        jitted = [v for k, v in vars(mod).items() if k.endswith("_kernel")]
        if jitted and not all(isinstance(f, InterpretedFunction) for f in jitted):
            return (f"slotwise.kernels.{name} was imported before TRITON_INTERPRET=1 was set, so its kernels "
                    "were built for a GPU; run the kernel tests in their own process")
    return None


@pytest.fixture(scope="session")
def device() -> str:
    """Where the Triton kernels run: CUDA when present, else the CPU interpreter (or skip)."""
    reason = _why_triton_cannot_run()
    if reason:
        pytest.skip(reason)
    for name in KERNEL_MODULES:
        importlib.import_module(f"slotwise.kernels.{name}")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN / a sentinel, so an element a kernel never writes fails the test."""
    from slotwise.kernels import _alloc

    monkeypatch.setattr(_alloc, "POISON", True)


@pytest.fixture
def close():
    """close(actual, expected, dtype): allclose with per-dtype tolerances; NaN anywhere fails."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32, scale: float = 1.0):
        tol = {k: v * scale for k, v in TOL[dtype].items()}
        torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), **tol)

    return check
