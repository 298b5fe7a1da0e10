"""Sorted runs of a weighted bag's ids: the backward's grouping, shared by weighted_bag and the fused updates.

The bag's M = T*H*knn entries (token t, slot k -> row ids[t, k], weight w[t, k]) are sorted once by
row on the device (stable, so a row's entries keep their flat order); equal ids form a run. The
work unit is a window of CHUNK sorted positions, one program each (one or two warps):

    walk      for each run in the window: load the values row once (prefetching the optimizer
              state of rows it will step), walk the entries UNROLL at a time -- grad_out[t] rows
              gathered together, acc += w * grad_out[t], grad_w[t, k] = values[row] . grad_out[t]
              from the same loads -- then finish the row: SPARSE (rows[u] = grad, uniq[u] = row),
              DENSE (out[row] += grad) or an optimizer step on values[row] (SGD, Adam, row-wise
              Adagrad; _row_update.py), optionally only where row_mask[row] is set.
    combine   a run that crosses window edges (a hot row) left one partial sum per window in a
              scratch buffer (slot 2w: it entered window w from the left, slot 2w+1: it started in
              window w); the program of the window where the run ends finds the run's first
              position by binary search, adds the partials in window order and finishes the row.

So long runs are split across programs and summed in a fixed order (bitwise reproducible), every
row is written by exactly one program (no atomics), grids are known on the host (M / CHUNK) and
nothing waits on the device -- except the SPARSE output, whose row count U the host needs to
allocate it (run_index: one sync). A row is finished only after every read of it: within a
window by the one program that reads it, across windows by the combine kernel launched after.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._row_update import ADAGRAD, ADAM, DENSE, SGD, SPARSE, adagrad_scale, adam_bias_corrections, adam_step, sgd_step


def row_pieces(D: int) -> tuple[int, int]:
    """A row of width D as two power-of-two slices [0, W0) and [W0, W0 + W1): W0 the largest power of
    two <= D (never masked), W1 covering the rest (masked; 1 and empty when D is a power of two).
    576 = 512 + 64 and 768 = 512 + 256 waste no lane; 896 = 512 + 512 wastes 12.5%."""
    w0 = 1 << (D.bit_length() - 1)
    rest = D - w0
    return w0, triton.next_power_of_2(rest) if rest else 1


def launch_shape(D: int) -> tuple[int, int]:
    """(UNROLL entries walked together, num_warps) per program for rows of width D: ~2K elements a tile."""
    w0, _ = row_pieces(D)
    return (4 if w0 <= 512 else 2), (1 if w0 <= 128 else 2 if w0 <= 256 else 4)


class Runs(NamedTuple):
    sorted_ids: torch.Tensor  # (M,) int32 row ids, ascending
    perm: torch.Tensor  # (M,) int64 flat (token, slot) position of each sorted entry
    chunk: int  # sorted positions per window

    @property
    def n_windows(self) -> int:
        return triton.cdiv(self.sorted_ids.numel(), self.chunk)


def sort_runs(ids: torch.Tensor, chunk: int = 64) -> Runs:
    """ids (T, ...) row ids < 2**31 -> their runs: one stable device sort (int32 keys), no host sync."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    sorted_ids, perm = torch.sort(ids.reshape(-1).to(torch.int32), stable=True)
    return Runs(sorted_ids, perm, chunk)


def run_index(runs: Runs) -> tuple[torch.Tensor, int]:
    """-> (u (M,) int64: the run number of each sorted position, U the number of runs). Syncs once."""
    s = runs.sorted_ids
    new = torch.ones_like(s, dtype=torch.int64)
    torch.ne(s[1:], s[:-1], out=new[1:])
    u = torch.cumsum(new, 0) - 1
    return u, int(u[-1].item()) + 1 if u.numel() else 0


# ----------------------------------------------------------------------------- device code


@triton.jit
def _finish_row(row, u, r0, r1, p0, p1, m0, m1, v0, v1, c0, c1, cm1, D,
                values_ptr, stride_v, out_ptr, uniq_ptr, stride_out, ma_ptr, va_ptr, step_ptr, stride_m,
                lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay, MODE: tl.constexpr, HAS_WD: tl.constexpr):
    """Finish one row from its gradient (r0, r1) and its prefetched values (p) and state (m, v)."""
    if MODE == SPARSE:
        dst = out_ptr + u.to(tl.int64) * stride_out
        tl.store(dst + c0, r0)
        tl.store(dst + c1, r1, mask=cm1)
        tl.store(uniq_ptr + u, row)
    elif MODE == DENSE:
        dst = out_ptr + row * stride_out
        tl.store(dst + c0, tl.load(dst + c0) + r0)  # one program per row: no race
        tl.store(dst + c1, tl.load(dst + c1, mask=cm1, other=0.0) + r1, mask=cm1)
    else:
        dst = values_ptr + row * stride_v
        if MODE == SGD:
            p0 = sgd_step(p0, r0, lr, weight_decay, HAS_WD)
            p1 = sgd_step(p1, r1, lr, weight_decay, HAS_WD)
        elif MODE == ADAM:
            bc1, bc2 = adam_bias_corrections(step_ptr, row, log2_beta1, log2_beta2)
            p0, m0, v0 = adam_step(p0, r0, m0, v0, lr, beta1, beta2, bc1, bc2, eps, weight_decay, HAS_WD)
            p1, m1, v1 = adam_step(p1, r1, m1, v1, lr, beta1, beta2, bc1, bc2, eps, weight_decay, HAS_WD)
            st = row * stride_m
            tl.store(ma_ptr + st + c0, m0.to(ma_ptr.dtype.element_ty))
            tl.store(ma_ptr + st + c1, m1.to(ma_ptr.dtype.element_ty), mask=cm1)
            tl.store(va_ptr + st + c0, v0.to(va_ptr.dtype.element_ty))
            tl.store(va_ptr + st + c1, v1.to(va_ptr.dtype.element_ty), mask=cm1)
        else:  # ADAGRAD, row-wise: one accumulator per row
            if HAS_WD:
                r0 = r0 + weight_decay * p0
                r1 = r1 + weight_decay * p1
            scale = adagrad_scale(ma_ptr, row, tl.sum(r0 * r0, 0) + tl.sum(r1 * r1, 0), D, lr, eps)
            p0 = p0 - scale * r0
            p1 = p1 - scale * r1
        tl.store(dst + c0, p0.to(values_ptr.dtype.element_ty))
        tl.store(dst + c1, p1.to(values_ptr.dtype.element_ty), mask=cm1)


@triton.jit
def _prefetch(row, when, c0, c1, cm1, values_ptr, stride_v, ma_ptr, va_ptr, stride_m,
              NEED_P: tl.constexpr, MODE: tl.constexpr):
    """The values row (if read) and, where `when` (the row will be stepped here), its Adam state, as fp32."""
    p0 = tl.zeros(c0.shape, tl.float32)
    p1 = tl.zeros(c1.shape, tl.float32)
    if NEED_P:
        src = values_ptr + row * stride_v
        p0 = tl.load(src + c0).to(tl.float32)
        p1 = tl.load(src + c1, mask=cm1, other=0.0).to(tl.float32)
    m0, m1, v0, v1 = p0 * 0.0, p1 * 0.0, p0 * 0.0, p1 * 0.0
    if MODE == ADAM:
        st = row * stride_m
        when0 = tl.full(c0.shape, 1, tl.int1) & when  # a vector mask (the interpreter rejects scalar ones)
        when1 = cm1 & (tl.full(c1.shape, 1, tl.int1) & when)
        m0 = tl.load(ma_ptr + st + c0, mask=when0, other=0.0).to(tl.float32)
        m1 = tl.load(ma_ptr + st + c1, mask=when1, other=0.0).to(tl.float32)
        v0 = tl.load(va_ptr + st + c0, mask=when0, other=0.0).to(tl.float32)
        v1 = tl.load(va_ptr + st + c1, mask=when1, other=0.0).to(tl.float32)
    return p0, p1, m0, m1, v0, v1


@triton.jit
def _walk_kernel(sorted_ptr, perm_ptr, runidx_ptr, values_ptr, w_ptr, g_ptr, gw_ptr, out_ptr, uniq_ptr, part_ptr,
                 ma_ptr, va_ptr, step_ptr, rowmask_ptr,
                 M, D, stride_v, stride_g, stride_out, stride_m,
                 lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
                 HK: tl.constexpr, MODE: tl.constexpr, NEED_GW: tl.constexpr, HAS_WD: tl.constexpr,
                 ROW_MASK: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr,
                 W0: tl.constexpr, W1: tl.constexpr):
    win = tl.program_id(0)
    wstart = win * CHUNK
    wend = tl.minimum(wstart + CHUNK, M)
    offs = wstart + tl.arange(0, CHUNK)
    win_ids = tl.load(sorted_ptr + offs, mask=offs < wend, other=-1)  # the window's ids, loaded once
    c0 = tl.arange(0, W0)
    c1 = W0 + tl.arange(0, W1)
    cm1 = c1 < D
    NEED_P: tl.constexpr = NEED_GW or MODE >= SGD
    s = wstart
    while s < wend:
        row_id = tl.load(sorted_ptr + s)
        e = tl.min(tl.where((offs > s) & (win_ids != row_id), offs, wend))  # end of this run's piece
        starts = tl.load(sorted_ptr + s - 1, mask=s > 0, other=-1) != row_id
        ends = tl.load(sorted_ptr + e, mask=e < M, other=-1) != row_id
        finish = starts & ends  # the whole run lies in this window
        if ROW_MASK:
            finish_here = finish & (tl.load(rowmask_ptr + row_id) != 0)
        else:
            finish_here = finish
        row = row_id.to(tl.int64)
        p0, p1, m0, m1, v0, v1 = _prefetch(row, finish_here, c0, c1, cm1, values_ptr, stride_v, ma_ptr, va_ptr,
                                           stride_m, NEED_P, MODE)
        acc0 = tl.zeros([UNROLL, W0], tl.float32)
        acc1 = tl.zeros([UNROLL, W1], tl.float32)
        for s0 in range(s, e, UNROLL):
            k = s0 + tl.arange(0, UNROLL)
            km = k < e
            pos = tl.load(perm_ptr + k, mask=km, other=0)
            wt = tl.load(w_ptr + pos, mask=km, other=0.0).to(tl.float32)
            tok = (pos.to(tl.int32) // HK).to(tl.int64)  # HK constexpr: a multiply, not a division
            g_rows = g_ptr + tok[:, None] * stride_g
            g0 = tl.load(g_rows + c0[None, :], mask=km[:, None], other=0.0).to(tl.float32)
            g1 = tl.load(g_rows + c1[None, :], mask=km[:, None] & cm1[None, :], other=0.0).to(tl.float32)
            acc0 += wt[:, None] * g0
            acc1 += wt[:, None] * g1
            if NEED_GW:
                gw = tl.sum(g0 * p0[None, :], 1) + tl.sum(g1 * p1[None, :], 1)
                tl.store(gw_ptr + pos, gw, mask=km)
        r0 = tl.sum(acc0, 0)
        r1 = tl.sum(acc1, 0)
        if finish:
            if finish_here:
                u = s
                if MODE == SPARSE:
                    u = tl.load(runidx_ptr + s)
                _finish_row(row, u, r0, r1, p0, p1, m0, m1, v0, v1, c0, c1, cm1, D,
                            values_ptr, stride_v, out_ptr, uniq_ptr, stride_out, ma_ptr, va_ptr, step_ptr, stride_m,
                            lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay, MODE, HAS_WD)
        else:
            slot = 2 * win + starts.to(tl.int32)
            dst = part_ptr + slot.to(tl.int64) * D
            tl.store(dst + c0, r0)
            tl.store(dst + c1, r1, mask=cm1)
        s = e


@triton.jit
def _combine_kernel(sorted_ptr, runidx_ptr, values_ptr, out_ptr, uniq_ptr, part_ptr, ma_ptr, va_ptr, step_ptr,
                    rowmask_ptr, M, D, stride_v, stride_out, stride_m,
                    lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
                    MODE: tl.constexpr, HAS_WD: tl.constexpr, ROW_MASK: tl.constexpr, CHUNK: tl.constexpr,
                    UNROLL: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr):
    win = tl.program_id(0) + 1  # window 0 continues no run
    wstart = win * CHUNK
    row_id = tl.load(sorted_ptr + wstart)
    if tl.load(sorted_ptr + wstart - 1) == row_id:  # a run enters this window from the left
        wend = tl.minimum(wstart + CHUNK, M)
        offs = wstart + tl.arange(0, CHUNK)
        win_ids = tl.load(sorted_ptr + offs, mask=offs < wend, other=-1)
        e = tl.min(tl.where(win_ids != row_id, offs, wend))
        ends = tl.load(sorted_ptr + e, mask=e < M, other=-1) != row_id
        here = ends
        if ROW_MASK:
            here = ends & (tl.load(rowmask_ptr + row_id) != 0)
        if here:  # ... and ends in it: this program finishes the row
            row = row_id.to(tl.int64)
            c0 = tl.arange(0, W0)
            c1 = W0 + tl.arange(0, W1)
            cm1 = c1 < D
            p0, p1, m0, m1, v0, v1 = _prefetch(row, here, c0, c1, cm1, values_ptr, stride_v, ma_ptr, va_ptr,
                                               stride_m, MODE >= SGD, MODE)
            lo = wstart * 0  # binary search for the run's first position in [0, wstart)
            hi = wstart
            while lo < hi:
                mid = (lo + hi) // 2
                below = tl.load(sorted_ptr + mid) < row_id
                lo = tl.where(below, mid + 1, lo)
                hi = tl.where(below, hi, mid)
            w0 = lo // CHUNK
            first = part_ptr + (2 * w0 + 1).to(tl.int64) * D  # the piece that started the run
            r0 = tl.load(first + c0)
            r1 = tl.load(first + c1, mask=cm1, other=0.0)
            acc0 = tl.zeros([UNROLL, W0], tl.float32)
            acc1 = tl.zeros([UNROLL, W1], tl.float32)
            for wb in range(w0 + 1, win + 1, UNROLL):  # then one piece per later window, in order
                ws = wb + tl.arange(0, UNROLL)
                wm = ws <= win
                src = part_ptr + (2 * ws).to(tl.int64)[:, None] * D
                acc0 += tl.load(src + c0[None, :], mask=wm[:, None], other=0.0)
                acc1 += tl.load(src + c1[None, :], mask=wm[:, None] & cm1[None, :], other=0.0)
            r0 += tl.sum(acc0, 0)
            r1 += tl.sum(acc1, 0)
            u = lo
            if MODE == SPARSE:
                u = tl.load(runidx_ptr + lo)
            _finish_row(row, u, r0, r1, p0, p1, m0, m1, v0, v1, c0, c1, cm1, D,
                        values_ptr, stride_v, out_ptr, uniq_ptr, stride_out, ma_ptr, va_ptr, step_ptr, stride_m,
                        lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay, MODE, HAS_WD)


# ----------------------------------------------------------------------------- host


def walk(runs: Runs, mode: int, values: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, HK: int, *,
         need_grad_w: bool, out: torch.Tensor | None = None, uniq: torch.Tensor | None = None,
         run_idx: torch.Tensor | None = None, state: tuple = (), row_mask: torch.Tensor | None = None,
         lr: float = 0.0, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
         grad_w: torch.Tensor | None = None) -> None:
    """Run the walk (+ combine) over the sorted entries of a bag with HK entries per token.

    values (N, D) unit column stride; weights (M,) in flat order; grad_out (T, D);
    mode SPARSE: out (U, D) fp32, uniq (U,), run_idx from run_index; DENSE: out (N, D) fp32;
    SGD / ADAM (state = exp_avg, exp_avg_sq (N, D) fp32 or bf16, step (N,) int64) / ADAGRAD
    (state = (sum (N,) fp32,)): values stepped in place; row_mask (N,) bool: step only those rows.
    grad_w (M,) fp32 is written when need_grad_w.
    """
    M, D = runs.sorted_ids.numel(), values.shape[1]
    mode = int(getattr(mode, "value", mode))
    if M == 0:
        return
    W0, W1 = row_pieces(D)
    unroll, num_warps = launch_shape(D)
    n_win = runs.n_windows
    dummy = runs.perm
    part = torch.empty((2 * n_win, D), dtype=torch.float32, device=values.device) if n_win > 1 else dummy
    ma = state[0] if state else dummy
    va = state[1] if len(state) > 1 else dummy
    step = state[2] if len(state) > 2 else dummy
    out = out if out is not None else dummy
    mask = row_mask.to(torch.uint8) if row_mask is not None else dummy
    hyper = (float(lr), float(beta1), float(beta2), math.log2(beta1), math.log2(beta2), float(eps), float(weight_decay))
    strides = (values.stride(0), out.stride(0) if out.dim() == 2 else 0, ma.stride(0) if ma.dim() == 2 else 0)
    flags = dict(MODE=mode, HAS_WD=weight_decay != 0, ROW_MASK=row_mask is not None, CHUNK=runs.chunk, W0=W0, W1=W1)
    _walk_kernel[(n_win,)](
        runs.sorted_ids, runs.perm, run_idx if run_idx is not None else dummy, values, weights, grad_out,
        grad_w if need_grad_w else dummy, out, uniq if uniq is not None else dummy, part, ma, va, step, mask,
        M, D, strides[0], grad_out.stride(0), strides[1], strides[2], *hyper,
        HK=HK, NEED_GW=need_grad_w, UNROLL=unroll, num_warps=num_warps, **flags)
    if n_win > 1:
        _combine_kernel[(n_win - 1,)](
            runs.sorted_ids, run_idx if run_idx is not None else dummy, values, out, uniq if uniq is not None else dummy,
            part, ma, va, step, mask, M, D, strides[0], strides[1], strides[2], *hyper,
            UNROLL=16, num_warps=8 if W0 >= 512 else 4, **flags)  # a hot row's partials: wide tiles
