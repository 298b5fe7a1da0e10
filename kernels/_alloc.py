"""Output allocation for the Triton host wrappers, with a poison switch for tests.

Kernels must write every element of their outputs. With POISON set (tests do it), outputs are
filled with NaN (floats) or a sentinel (integers) instead of left uninitialised, so an element a
kernel forgot to write fails the comparison against the reference.
"""
from __future__ import annotations

import torch

POISON = False
INT_SENTINEL = -1234567


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else INT_SENTINEL
    return torch.full(shape, fill, dtype=dtype, device=device)
