"""The per-row optimizer steps as Triton helpers, shared by every kernel that updates value rows.

Private to slotwise.kernels: the row-grad kernels (sparse_update.py) and the fused
backward + update walk (_segments.py) call these, so each step's arithmetic is written once.
Each helper works on one slice of a row (fp32 tiles of any shape); whatever is per row (the step
counter, row-wise Adagrad's sum of squares) the caller reads and writes once per row.

    sgd      p -= lr * (g + wd p)
    adam     lazy per-row Adam (torch.optim.SparseAdam's rule, plus L2 weight decay): bias
             corrections from the row's own step count bc1 = 1 - beta1**t, bc2 = 1 - beta2**t
    adagrad  row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one fp32 accumulator per row,
             G += mean_d (g + wd p)**2, p -= lr * (g + wd p) / (sqrt(G) + eps)
"""
from __future__ import annotations

import triton
import triton.language as tl

# what a fused walk does with a finished row gradient (the kernels' constexpr MODE; jit code may
# read only constexpr globals, the host passes int(...))
SPARSE, DENSE, SGD, ADAM, ADAGRAD = (tl.constexpr(i) for i in range(5))


@triton.jit
def sgd_step(p, g, lr, weight_decay, HAS_WD: tl.constexpr):
    if HAS_WD:
        g = g + weight_decay * p
    return p - lr * g


@triton.jit
def adam_step(p, g, m, v, lr, beta1, beta2, bc1, bc2, eps, weight_decay, HAS_WD: tl.constexpr):
    """-> new (p, m, v), fp32; bc1, bc2 are this row's bias corrections."""
    if HAS_WD:
        g = g + weight_decay * p
    m = m * beta1 + (1.0 - beta1) * g
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p - lr * (m / bc1) / (tl.sqrt(v / bc2) + eps)
    return p, m, v


@triton.jit
def adam_bias_corrections(step_ptr, row, log2_beta1, log2_beta2):
    """Bump the row's step counter; -> (1 - beta1**t, 1 - beta2**t) for its new count t."""
    t = tl.load(step_ptr + row) + 1
    tl.store(step_ptr + row, t)
    tf = t.to(tl.float32)
    return 1.0 - tl.exp2(tf * log2_beta1), 1.0 - tl.exp2(tf * log2_beta2)


@triton.jit
def adagrad_scale(state_ptr, row, sq_sum, D, lr, eps):
    """Add the row's mean squared gradient to its accumulator; -> lr / (sqrt(G) + eps)."""
    acc = tl.load(state_ptr + row) + sq_sum / D
    tl.store(state_ptr + row, acc)
    return lr / (tl.sqrt(acc) + eps)
