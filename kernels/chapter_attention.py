"""Routed chapter cross-attention, the Triton kernels (spec: chapter_attention_reference).

The (token, head) pairs of q (T, H, M) are rows of a (T*H, M) matrix; segment r owns rows
offsets[r]*H .. offsets[r+1]*H, and every row of it reads the same chapters, so a tile of
BLOCK_M rows shares each key/value tile it loads from the bank (no gathered copy of the bank).

forward   one program per (segment, BLOCK_M rows): for each of the segment's C chapters an
          online softmax over the chapter's CT bank rows (tiles of BLOCK_N), the chapter's output
          scaled by its router weight and summed; the log-sum-exp of every (row, chapter) is kept.
backward  dq: the same grid; per chapter one pass recomputes the chapter's output o_j and
          delta = grad_out . o_j (router-weight gradients are segment sums of delta), a second
          pass accumulates dq (flash-attention 2, with dO_j = w_j * grad_out).
          dkv: one program per (chapter read by someone, BLOCK_N bank rows): it walks the list
          of (segment, entry) pairs that read the chapter (sorted on the host) and their rows,
          and writes the rows' key and value gradients once: deterministic, no atomics, and
          sparse (only the chapters read have gradient rows).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _alloc
from ._dispatch import interpret_mode


@triton.jit
def _scores(q, k, scale, INPUT_PRECISION: tl.constexpr):
    return tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, off_ptr, ch_ptr, w_ptr, out_ptr, lse_ptr,
                H, M, C, CT, stride_k, stride_v, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    r = tl.program_id(0)
    row_start = tl.load(off_ptr + r) * H
    row_end = tl.load(off_ptr + r + 1) * H
    rows = row_start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < row_end
    d = tl.arange(0, BLOCK_D)
    d_mask = d < M
    q = tl.load(q_ptr + rows[:, None] * M + d[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:  # the interpreter's tl.dot multiplies bf16 as raw uint16 bits
        q = q.to(tl.float32)
    out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in range(0, C):
        ch = tl.load(ch_ptr + r * C + j)
        w = tl.load(w_ptr + r * C + j).to(tl.float32)
        n_end = tl.where(ch >= 0, CT, 0)  # an empty entry reads nothing
        base = ch.to(tl.int64) * CT
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, n_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < CT
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + (base + n)[:, None] * stride_k + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + (base + n)[:, None] * stride_v + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.where(n_mask[None, :], _scores(q, k, scale, INPUT_PRECISION), float("-inf"))  # (BLOCK_M, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
            m_i = m_new
        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        out += (w / l_safe)[:, None] * acc
        tl.store(lse_ptr + rows * C + j, tl.where(has, m_i + tl.log(l_safe), 0.0), mask=r_mask)
    tl.store(out_ptr + rows[:, None] * M + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, off_ptr, ch_ptr, w_ptr, lse_ptr, g_ptr, dq_ptr, delta_ptr,
                   H, M, C, CT, stride_k, stride_v, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    r = tl.program_id(0)
    row_start = tl.load(off_ptr + r) * H
    row_end = tl.load(off_ptr + r + 1) * H
    rows = row_start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < row_end
    d = tl.arange(0, BLOCK_D)
    d_mask = d < M
    qd_mask = r_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + rows[:, None] * M + d[None, :], mask=qd_mask, other=0.0)
    g = tl.load(g_ptr + rows[:, None] * M + d[None, :], mask=qd_mask, other=0.0)
    if UPCAST:
        q, g = q.to(tl.float32), g.to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in range(0, C):
        ch = tl.load(ch_ptr + r * C + j)
        w = tl.load(w_ptr + r * C + j).to(tl.float32)
        n_end = tl.where(ch >= 0, CT, 0)
        base = ch.to(tl.int64) * CT
        lse = tl.load(lse_ptr + rows * C + j, mask=r_mask, other=0.0)
        o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, n_end, BLOCK_N):  # pass 1: the chapter's output o_j, for delta = g . o_j
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < CT
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + (base + n)[:, None] * stride_k + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + (base + n)[:, None] * stride_v + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            p = tl.exp(tl.where(n_mask[None, :], _scores(q, k, scale, INPUT_PRECISION), float("-inf")) - lse[:, None])
            o += tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        delta = tl.sum(o * g, axis=1)  # (BLOCK_M,)
        tl.store(delta_ptr + rows * C + j, delta, mask=r_mask)
        for n0 in range(0, n_end, BLOCK_N):  # pass 2: dS = w * P * (g V^T - delta); dq += dS K * scale
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < CT
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + (base + n)[:, None] * stride_k + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + (base + n)[:, None] * stride_v + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            p = tl.exp(tl.where(n_mask[None, :], _scores(q, k, scale, INPUT_PRECISION), float("-inf")) - lse[:, None])
            dp = tl.dot(g, tl.trans(v), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = w * p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    tl.store(dq_ptr + rows[:, None] * M + d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _bwd_dkv_kernel(q_ptr, k_ptr, v_ptr, off_ptr, w_ptr, lse_ptr, g_ptr, delta_ptr,
                    uniq_ptr, rseg_ptr, perm_ptr, dk_ptr, dv_ptr,
                    H, M, C, CT, stride_k, stride_v, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    u = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < CT
    d = tl.arange(0, BLOCK_D)
    d_mask = d < M
    kv_mask = n_mask[:, None] & d_mask[None, :]
    base = tl.load(uniq_ptr + u) * CT
    k = tl.load(k_ptr + (base + n)[:, None] * stride_k + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + (base + n)[:, None] * stride_v + d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i in range(tl.load(rseg_ptr + u), tl.load(rseg_ptr + u + 1)):  # every (segment, entry) reading it
        pos = tl.load(perm_ptr + i)  # flat r * C + j
        r = pos // C
        j = pos % C
        w = tl.load(w_ptr + pos).to(tl.float32)
        row_end = tl.load(off_ptr + r + 1) * H
        for m0 in range(tl.load(off_ptr + r) * H, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            r_mask = rows < row_end
            qd_mask = r_mask[:, None] & d_mask[None, :]
            q = tl.load(q_ptr + rows[:, None] * M + d[None, :], mask=qd_mask, other=0.0)
            g = tl.load(g_ptr + rows[:, None] * M + d[None, :], mask=qd_mask, other=0.0)
            if UPCAST:
                q, g = q.to(tl.float32), g.to(tl.float32)
            lse = tl.load(lse_ptr + rows * C + j, mask=r_mask, other=0.0)
            delta = tl.load(delta_ptr + rows * C + j, mask=r_mask, other=0.0)
            s_t = _scores(k, q, scale, INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
            p_t = tl.where(n_mask[:, None] & r_mask[None, :], tl.exp(s_t - lse[None, :]), 0.0)
            dv += tl.dot((w * p_t).to(g.dtype), g, input_precision=INPUT_PRECISION)
            dp_t = tl.dot(v, tl.trans(g), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
            ds_t = w * p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PRECISION)
    out = (u * CT + n)[:, None] * M + d[None, :]
    tl.store(dk_ptr + out, dk * scale, mask=kv_mask)
    tl.store(dv_ptr + out, dv, mask=kv_mask)


def _blocks(M: int, CT: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N bank rows, BLOCK_D); tl.dot wants every dimension >= 16."""
    block_d = max(16, triton.next_power_of_2(M))
    block_n = max(16, min(64, triton.next_power_of_2(CT)))
    block_m = 64 if block_d <= 64 else 32
    return block_m, block_n, block_d


def _check(q, keys, values, offsets, chapters, weights, chapter_tokens):
    T, H, M = q.shape
    if keys.shape != values.shape or keys.dim() != 2 or keys.shape[1] != M:
        raise ValueError(f"keys and values must both be (N, {M}), got {tuple(keys.shape)} and {tuple(values.shape)}")
    if keys.shape[0] % chapter_tokens:
        raise ValueError(f"the bank's {keys.shape[0]} rows are not whole chapters of {chapter_tokens}")
    R = offsets.numel() - 1
    if chapters.shape != weights.shape or chapters.dim() != 2 or chapters.shape[0] != R:
        raise ValueError(f"chapters {tuple(chapters.shape)} and weights {tuple(weights.shape)} must be (R={R}, C)")


def _prep(q, keys, values):
    dtype = q.dtype if q.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    q = q.to(dtype).contiguous()
    keys = keys.to(dtype)
    values = values.to(dtype)
    if keys.stride(1) != 1:
        keys = keys.contiguous()
    if values.stride(1) != 1:
        values = values.contiguous()
    return q, keys, values


def _common(q, CT, scale, tf32):
    M = q.shape[-1]
    BLOCK_M, BLOCK_N, BLOCK_D = _blocks(M, CT)
    precision = "tf32" if (tf32 and q.dtype == torch.float32) else "ieee"
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, INPUT_PRECISION=precision, UPCAST=interpret_mode())


def chapter_attention_forward_triton(q, keys, values, offsets, chapters, weights, chapter_tokens: int,
                                     scale: float, max_seg_len: int | None = None, tf32: bool = False):
    """-> (out (T, H, M) in q's dtype, lse (T, H, C) fp32)."""
    _check(q, keys, values, offsets, chapters, weights, chapter_tokens)
    q, keys, values = _prep(q, keys, values)
    T, H, M = q.shape
    R, C = chapters.shape
    meta = _common(q, chapter_tokens, scale, tf32)
    out = _alloc.empty((T, H, M), q.dtype, q.device)
    lse = _alloc.empty((T, H, C), torch.float32, q.device)
    if max_seg_len is None:
        max_seg_len = int((offsets[1:] - offsets[:-1]).max()) if R else 0
    if R and T:
        grid = (R, triton.cdiv(max_seg_len * H, meta["BLOCK_M"]))
        _fwd_kernel[grid](q, keys, values, offsets.contiguous(), chapters.contiguous(), weights.contiguous(), out, lse,
                          H, M, C, chapter_tokens, keys.stride(0), values.stride(0), scale, num_warps=4, **meta)
    return out, lse


def chapter_readers(chapters: torch.Tensor):
    """(R, C) chapters -> (unique chapters read (U,), reader segments (U + 1,), perm: flat r*C+j grouped by chapter)."""
    flat = chapters.reshape(-1)
    valid = (flat >= 0).nonzero().squeeze(1)
    sorted_ch, order = torch.sort(flat[valid], stable=True)
    uniq, counts = torch.unique_consecutive(sorted_ch, return_counts=True)
    rseg = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=chapters.device)
    torch.cumsum(counts, 0, out=rseg[1:])
    return uniq, rseg, valid[order]


def chapter_attention_backward_triton(q, keys, values, offsets, chapters, weights, lse, grad_out, chapter_tokens: int,
                                      scale: float, max_seg_len: int | None = None, need_kv: bool = True,
                                      tf32: bool = False):
    """-> (dq (T, H, M) q's dtype, grad weights (R, C) fp32, unique chapters (U,), dkeys rows (U*CT, M) fp32,
    dvalues rows (U*CT, M) fp32); the row grads belong to bank rows uniq[u]*CT + i, in that order."""
    q, keys, values = _prep(q, keys, values)
    grad_out = grad_out.to(q.dtype).contiguous()
    T, H, M = q.shape
    R, C = chapters.shape
    CT = chapter_tokens
    meta = _common(q, CT, scale, tf32)
    offsets, chapters, weights = offsets.contiguous(), chapters.contiguous(), weights.contiguous()
    dq = _alloc.empty((T, H, M), q.dtype, q.device)
    delta = _alloc.empty((T, H, C), torch.float32, q.device)
    if max_seg_len is None:
        max_seg_len = int((offsets[1:] - offsets[:-1]).max()) if R else 0
    if R and T:
        grid = (R, triton.cdiv(max_seg_len * H, meta["BLOCK_M"]))
        _bwd_dq_kernel[grid](q, keys, values, offsets, chapters, weights, lse, grad_out, dq, delta,
                             H, M, C, CT, keys.stride(0), values.stride(0), scale, num_warps=4, **meta)
    # grad w[r, j] = sum of delta over segment r's rows: differences of an fp64 running sum (deterministic)
    run = torch.zeros(T * H + 1, C, dtype=torch.float64, device=q.device)
    torch.cumsum(delta.reshape(T * H, C).double(), 0, out=run[1:])
    grad_w = (run[offsets[1:] * H] - run[offsets[:-1] * H]).float()
    grad_w = torch.where(chapters >= 0, grad_w, torch.zeros_like(grad_w))
    uniq = torch.empty(0, dtype=torch.int64, device=q.device)
    dk = dv = torch.empty(0, M, dtype=torch.float32, device=q.device)
    if need_kv:
        uniq, rseg, perm = chapter_readers(chapters)
        dk = _alloc.empty((uniq.numel() * CT, M), torch.float32, q.device)
        dv = _alloc.empty((uniq.numel() * CT, M), torch.float32, q.device)
        if uniq.numel():
            grid = (uniq.numel(), triton.cdiv(CT, meta["BLOCK_N"]))
            _bwd_dkv_kernel[grid](q, keys, values, offsets, weights, lse, grad_out, delta, uniq, rseg, perm, dk, dv,
                                  H, M, C, CT, keys.stride(0), values.stride(0), scale, num_warps=4, **meta)
    return dq, grad_w, uniq, dk, dv


def _bank_grad(uniq, rows, bank: torch.Tensor, CT: int, sparse: bool):
    ids = (uniq[:, None] * CT + torch.arange(CT, device=uniq.device)).reshape(-1)  # ascending, unique
    if sparse:
        return torch.sparse_coo_tensor(ids.unsqueeze(0), rows.to(bank.dtype), bank.shape, is_coalesced=True,
                                       check_invariants=False)
    grad = torch.zeros(bank.shape, dtype=bank.dtype, device=bank.device)
    grad[ids] = rows.to(bank.dtype)
    return grad


class _ChapterAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, keys, values, offsets, chapters, weights, chapter_tokens, scale, max_seg_len, sparse_grad, tf32):
        out, lse = chapter_attention_forward_triton(q, keys, values, offsets, chapters, weights, chapter_tokens, scale,
                                                    max_seg_len, tf32)
        ctx.save_for_backward(q, keys, values, offsets, chapters, weights, lse)
        ctx.cfg = (chapter_tokens, scale, max_seg_len, sparse_grad, tf32)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, keys, values, offsets, chapters, weights, lse = ctx.saved_tensors
        CT, scale, max_seg_len, sparse, tf32 = ctx.cfg
        need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, grad_w, uniq, dk, dv = chapter_attention_backward_triton(
            q, keys, values, offsets, chapters, weights, lse, grad_out, CT, scale, max_seg_len, need_kv, tf32)
        g_keys = _bank_grad(uniq, dk, keys, CT, sparse) if ctx.needs_input_grad[1] else None
        g_values = _bank_grad(uniq, dv, values, CT, sparse) if ctx.needs_input_grad[2] else None
        return (dq.to(q.dtype), g_keys, g_values, None, None, grad_w.to(weights.dtype),
                None, None, None, None, None)


def chapter_attention_triton(q, keys, values, offsets, chapters, weights, chapter_tokens: int, scale: float,
                             max_seg_len: int | None = None, sparse_grad: bool = False, tf32: bool = False):
    """Autograd op with the contract of chapter_attention_reference."""
    if values is keys:
        # autograd would add the two gradients of one tensor; the Function returns their sum once instead
        return _SameBank.apply(q, keys, offsets, chapters, weights, chapter_tokens, scale, max_seg_len, sparse_grad, tf32)
    return _ChapterAttention.apply(q, keys, values, offsets, chapters, weights, chapter_tokens, scale, max_seg_len,
                                   sparse_grad, tf32)


class _SameBank(torch.autograd.Function):
    """keys is values: one bank input, its gradient dk + dv."""

    @staticmethod
    def forward(ctx, q, bank, offsets, chapters, weights, chapter_tokens, scale, max_seg_len, sparse_grad, tf32):
        out, lse = chapter_attention_forward_triton(q, bank, bank, offsets, chapters, weights, chapter_tokens, scale,
                                                    max_seg_len, tf32)
        ctx.save_for_backward(q, bank, offsets, chapters, weights, lse)
        ctx.cfg = (chapter_tokens, scale, max_seg_len, sparse_grad, tf32)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, bank, offsets, chapters, weights, lse = ctx.saved_tensors
        CT, scale, max_seg_len, sparse, tf32 = ctx.cfg
        need = ctx.needs_input_grad[1]
        dq, grad_w, uniq, dk, dv = chapter_attention_backward_triton(
            q, bank, bank, offsets, chapters, weights, lse, grad_out, CT, scale, max_seg_len, need, tf32)
        g_bank = _bank_grad(uniq, dk + dv, bank, CT, sparse) if need else None
        return dq.to(q.dtype), g_bank, None, None, grad_w.to(weights.dtype), None, None, None, None, None
