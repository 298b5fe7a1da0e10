"""Choose between a kernel's Triton path and its PyTorch reference.

`backend` on every public op: "auto" (Triton on CUDA tensors when Triton imports, the
reference elsewhere), "triton" (force; on CPU it needs TRITON_INTERPRET=1) or "torch".
The environment variable SLOTWISE_KERNELS sets the default for "auto" calls.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on a machine without a driver
        return False
    return True


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for this call."""
    if backend == "auto":
        backend = os.environ.get("SLOTWISE_KERNELS", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was forced but triton does not import")
        if not on_cuda and not interpret_mode():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
        return "triton"
    return "triton" if on_cuda and triton_available() else "torch"
