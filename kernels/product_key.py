"""Product-key top-k, the Triton kernel (spec: product_key_reference.pk_topk_reference).

One program per (block of BLOCK_T tokens, head). Each half-query is scored against the head's
n_keys sub-keys with tl.dot, BLOCK_N sub-keys at a time, in two passes instead of a running sort:

  pass 1   the maximum of each of G = 2 * KNN strided groups of sub-keys (group = n mod G). The
           knn-th largest group maximum bounds the half's knn-th best score from below (knn
           distinct sub-keys reach it) and lets few through: Gaussian scores, 1,024 sub-keys,
           knn 32 leave 43 on average, at most 65 in 20,000 draws.
  pass 2   the scores again (tensor-core work is cheaper than holding [BLOCK_T, n_keys] scores);
           every survivor (score >= bound) gets the next slot of its token's scratch row (a
           cumsum over the block), stored as one int64 that orders like (score, -index).
  select   exact top-KNN of at most CAP survivors, sorted: one bitonic tl.topk over CAP.
  fallback a token with more than CAP survivors (adversarial scores, ties) raises its bound by
           bisection on the packed values, one counting pass a step, until at most CAP remain,
           then compacts again: exact always, fast in the common case.

With both halves' lists sorted descending, pair (a, b) can enter the top-knn only if
(a+1)(b+1) <= knn (the (a+1)(b+1) pairs (a' <= a, b' <= b) score at least as much), so 119
candidates instead of 1,024 for knn 32 are gathered from registers (tl.gather) and reduced by one
more tl.topk. The returned scores are the kernel's fp32 sums, bit for bit what it selected on.
With usage=True the same passes also produce each token's log-sum-exp over the sub-keys (pass 1,
online) and the per-block column sums of the softmax (pass 2): the balancing loss's statistics.
The gradients are in product_key_grad.py.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _alloc
from ._dispatch import interpret_mode

INT64_MIN = -9223372036854775807 - 1


@triton.jit
def _key(score):
    """fp32 -> int32 with the same order (flip the magnitude bits of negative floats)."""
    bits = score.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _pack(score, idx):
    """fp32 score, int32 index (same shape) -> int64 that orders like (score, -index)."""
    return (_key(score).to(tl.int64) << 32) | ((~idx).to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _unpack(packed):
    key = (packed >> 32).to(tl.int32)
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), ~((packed & 0xFFFFFFFF).to(tl.int32))


@triton.jit
def _scores(q, k_ptr, n0, n_keys, stride_kn, d, d_mask, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    """Scores of BLOCK_T half-queries against sub-keys [n0, n0 + BLOCK_N) -> (s fp32, n, n_mask)."""
    n = n0 + tl.arange(0, BLOCK_N)
    n_mask = n < n_keys
    k = tl.load(k_ptr + n[:, None] * stride_kn + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:  # the interpreter's tl.dot multiplies bf16 as raw uint16 bits; fp32 is exact here
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), n, n_mask


@triton.jit
def _load_q(q_ptr, t_offs, t_mask, stride_qt, half_dim, BLOCK_KD: tl.constexpr, UPCAST: tl.constexpr):
    d = tl.arange(0, BLOCK_KD)
    d_mask = d < half_dim
    q = tl.load(q_ptr + t_offs[:, None] * stride_qt + d[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, d, d_mask


@triton.jit
def _bound(q, k_ptr, lse_ptr, rows, t_mask, n_keys, stride_kn, knn, d, d_mask, KNN: tl.constexpr, G: tl.constexpr,
           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
           USAGE: tl.constexpr):
    """Pass 1 -> (bound: the knn-th largest of G strided group maxima, top: the largest score, lse),
    score keys as order-preserving int32; with USAGE the online log-sum-exp, stored at lse_ptr."""
    gmax = tl.full([BLOCK_T, G], -2147483648, tl.int32)
    m_run = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_T], tl.float32)
    for n0 in range(0, n_keys, BLOCK_N):
        s, n, n_mask = _scores(q, k_ptr, n0, n_keys, stride_kn, d, d_mask, BLOCK_N, INPUT_PRECISION, UPCAST)
        key = tl.where(n_mask[None, :], _key(s), -2147483648)
        gmax = tl.maximum(gmax, tl.max(tl.reshape(key, [BLOCK_T, BLOCK_N // G, G]), axis=1))
        if USAGE:
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(s, axis=1))
            l_run = l_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_run = m_new
    lse = m_run
    if USAGE:
        lse = m_run + tl.log(l_run)
        tl.store(lse_ptr + rows, lse, mask=t_mask)
    top = tl.topk(gmax, KNN, dim=1)  # (BLOCK_T, KNN) group maxima, descending
    col = tl.arange(0, KNN)
    bound = tl.min(tl.where(col[None, :] < knn, top, 2147483647), axis=1)
    return bound, tl.max(top, axis=1), lse


@triton.jit
def _collect(q, k_ptr, scratch_ptr, usage_ptr, rows, t_mask, lo, lse, n_keys, stride_kn, d, d_mask,
             PACKED: tl.constexpr, STORE: tl.constexpr, USAGE: tl.constexpr, CAP: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Count the scores at or above lo (an int32 score key, or PACKED an int64 (key, -index) value);
    with STORE give each its token's next scratch slot (packed, in sub-key order) -> counts.
    USAGE: also store this block of tokens' column sums of exp(s - lse) at usage_ptr."""
    cnt = tl.zeros([BLOCK_T], tl.int32)
    for n0 in range(0, n_keys, BLOCK_N):
        s, n, n_mask = _scores(q, k_ptr, n0, n_keys, stride_kn, d, d_mask, BLOCK_N, INPUT_PRECISION, UPCAST)
        packed = _pack(s, n[None, :] + tl.zeros([BLOCK_T, BLOCK_N], tl.int32))
        if PACKED:
            sel = packed >= lo[:, None]
        else:
            sel = _key(s) >= lo[:, None]
        sel = sel & n_mask[None, :] & t_mask[:, None]
        one = sel.to(tl.int32)
        if STORE:
            pos = cnt[:, None] + tl.cumsum(one, axis=1) - one
            tl.store(scratch_ptr + rows[:, None] * CAP + pos, packed, mask=sel & (pos < CAP))
        cnt += tl.sum(one, axis=1)
        if USAGE:
            p = tl.where(t_mask[:, None] & n_mask[None, :], tl.exp(s - lse[:, None]), 0.0)
            tl.store(usage_ptr + n, tl.sum(p, axis=0), mask=n_mask)
    return cnt


@triton.jit
def _select(scratch_ptr, lists_ptr, rows, t_mask, cnt, KNN: tl.constexpr, CAP: tl.constexpr):
    """The exact top-KNN of each token's <= CAP survivors, sorted -> lists[rows] (packed)."""
    tl.debug_barrier()  # the survivors were written by other threads of this program
    slot = tl.arange(0, CAP)
    packed = tl.load(scratch_ptr + rows[:, None] * CAP + slot[None, :],
                     mask=t_mask[:, None] & (slot[None, :] < cnt[:, None]), other=-9223372036854775807 - 1)
    col = tl.arange(0, KNN)
    tl.store(lists_ptr + rows[:, None] * KNN + col[None, :], tl.topk(packed, KNN, dim=1), mask=t_mask[:, None])


@triton.jit
def _program_rows(T, H, BLOCK_T: tl.constexpr):
    """This program's (token block, head, half) -> (block, head, half, t_offs, t_mask, rows of (T, H, 2))."""
    pid_t = tl.program_id(0)
    hs = tl.program_id(1)  # head * 2 + half
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    return pid_t, hs // 2, hs % 2, t_offs, t_offs < T, t_offs.to(tl.int64) * (2 * H) + hs


@triton.jit
def _half_lists_kernel(q_ptr, k_ptr, lists_ptr, scratch_ptr, flag_ptr, lse_ptr, usage_ptr,
                       T, H, n_keys, half_dim, knn, stride_qt, stride_qh, stride_kh, stride_ks, stride_kn,
                       KNN: tl.constexpr, G: tl.constexpr, CAP: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr, USAGE: tl.constexpr):
    """One (token block, head, half): bound, compact, select -> lists[t, h, half] (KNN packed, descending).
    A block with a token over CAP survivors sets its flag and leaves its lists to the fallback kernel."""
    pid_t, h, half, t_offs, t_mask, rows = _program_rows(T, H, BLOCK_T)
    k_ptr += h * stride_kh + half * stride_ks
    q, d, d_mask = _load_q(q_ptr + h * stride_qh + half * half_dim, t_offs, t_mask, stride_qt, half_dim, BLOCK_KD,
                           UPCAST)
    bound, _, lse = _bound(q, k_ptr, lse_ptr, rows, t_mask, n_keys, stride_kn, knn, d, d_mask, KNN, G, BLOCK_T,
                           BLOCK_N, INPUT_PRECISION, UPCAST, USAGE)
    usage_row = usage_ptr + (pid_t * 2 * H + h * 2 + half).to(tl.int64) * n_keys
    cnt = _collect(q, k_ptr, scratch_ptr, usage_row, rows, t_mask, bound, lse, n_keys, stride_kn, d, d_mask,
                   False, True, USAGE, CAP, BLOCK_T, BLOCK_N, INPUT_PRECISION, UPCAST)
    fits = tl.max(cnt) <= CAP
    tl.store(flag_ptr + pid_t * 2 * H + h * 2 + half, (~fits).to(tl.int32) & 1)
    if fits:
        _select(scratch_ptr, lists_ptr, rows, t_mask, cnt, KNN, CAP)


@triton.jit
def _half_lists_fallback_kernel(q_ptr, k_ptr, lists_ptr, scratch_ptr, flag_ptr,
                                T, H, n_keys, half_dim, knn, stride_qt, stride_qh, stride_kh, stride_ks, stride_kn,
                                KNN: tl.constexpr, G: tl.constexpr, CAP: tl.constexpr, BLOCK_T: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                                UPCAST: tl.constexpr):
    """For flagged blocks only: raise each over-full token's bound by bisection on the packed values
    (distinct, so it ends with at most knn <= CAP survivors), then compact and select again."""
    pid_t, h, half, t_offs, t_mask, rows = _program_rows(T, H, BLOCK_T)
    if tl.load(flag_ptr + pid_t * 2 * H + h * 2 + half) != 0:
        k_ptr += h * stride_kh + half * stride_ks
        q, d, d_mask = _load_q(q_ptr + h * stride_qh + half * half_dim, t_offs, t_mask, stride_qt, half_dim,
                               BLOCK_KD, UPCAST)
        bound, top, _ = _bound(q, k_ptr, flag_ptr, rows, t_mask, n_keys, stride_kn, knn, d, d_mask, KNN, G, BLOCK_T,
                               BLOCK_N, INPUT_PRECISION, UPCAST, False)
        lo = bound.to(tl.int64) << 32  # the smallest packed value with the bound's score
        hi = (top.to(tl.int64) + 1) << 32  # above every packed score
        cnt = _collect(q, k_ptr, scratch_ptr, flag_ptr, rows, t_mask, lo, bound, n_keys, stride_kn, d,
                       d_mask, True, False, False, CAP, BLOCK_T, BLOCK_N, INPUT_PRECISION, UPCAST)
        while tl.max(cnt) > CAP:
            need = cnt > CAP
            mid = tl.where(need, (lo >> 1) + (hi >> 1) + (lo & hi & 1), lo)
            c = _collect(q, k_ptr, scratch_ptr, flag_ptr, rows, t_mask, mid, bound, n_keys, stride_kn, d,
                         d_mask, True, False, False, CAP, BLOCK_T, BLOCK_N, INPUT_PRECISION, UPCAST)
            up = need & (c >= knn)
            lo = tl.where(up, mid, lo)
            cnt = tl.where(up, c, cnt)
            hi = tl.where(need & (c < knn), mid, hi)
        cnt = _collect(q, k_ptr, scratch_ptr, flag_ptr, rows, t_mask, lo, bound, n_keys, stride_kn, d, d_mask,
                       True, True, False, CAP, BLOCK_T, BLOCK_N, INPUT_PRECISION, UPCAST)
        _select(scratch_ptr, lists_ptr, rows, t_mask, cnt, KNN, CAP)


@triton.jit
def _pairs_kernel(lists_ptr, pair_a_ptr, pair_b_ptr, scores_ptr, ids_ptr, T, H, n_keys, knn, n_pairs,
                  KNN: tl.constexpr, PP: tl.constexpr, BLOCK_T: tl.constexpr):
    """One (token block, head): the top-knn of the pruned pairs of its two sorted half lists."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < T
    rows = (t_offs.to(tl.int64) * H + h) * 2
    col = tl.arange(0, KNN)
    s1, i1 = _unpack(tl.load(lists_ptr + rows[:, None] * KNN + col[None, :], mask=t_mask[:, None], other=0))
    s2, i2 = _unpack(tl.load(lists_ptr + (rows + 1)[:, None] * KNN + col[None, :], mask=t_mask[:, None], other=0))
    # pairs (a, b) with (a + 1) * (b + 1) <= knn
    p = tl.arange(0, PP)
    a = tl.load(pair_a_ptr + p)[None, :] + tl.zeros([BLOCK_T, PP], tl.int32)
    b = tl.load(pair_b_ptr + p)[None, :] + tl.zeros([BLOCK_T, PP], tl.int32)
    cand = tl.gather(s1, a, axis=1) + tl.gather(s2, b, axis=1)
    cand_ids = tl.gather(i1, a, axis=1) * n_keys + tl.gather(i2, b, axis=1)  # slot id < 2**31
    packed = tl.where((p < n_pairs)[None, :], _pack(cand, cand_ids), -9223372036854775807 - 1)
    top_s, top_i = _unpack(tl.topk(packed, KNN, dim=1))  # (BLOCK_T, KNN)
    out = (t_offs[:, None].to(tl.int64) * H + h) * knn + col[None, :]
    out_mask = t_mask[:, None] & (col[None, :] < knn)
    tl.store(scores_ptr + out, top_s, mask=out_mask)
    tl.store(ids_ptr + out, top_i.to(tl.int64), mask=out_mask)


@functools.cache
def pruned_pairs(knn: int, device: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Positions (a, b) in the two sorted half lists with (a + 1)(b + 1) <= knn, padded to a power of two."""
    pairs = [(a, b) for a in range(knn) for b in range(knn) if (a + 1) * (b + 1) <= knn]
    size = max(triton.next_power_of_2(len(pairs)), triton.next_power_of_2(knn))
    a = torch.zeros(size, dtype=torch.int32)
    b = torch.zeros(size, dtype=torch.int32)
    a[: len(pairs)] = torch.tensor([p[0] for p in pairs], dtype=torch.int32)
    b[: len(pairs)] = torch.tensor([p[1] for p in pairs], dtype=torch.int32)
    return a.to(device), b.to(device), len(pairs)


def pk_topk_triton(query: torch.Tensor, keys: torch.Tensor, knn: int, tf32: bool = False, usage: bool = False,
                   block_t: int | None = None, block_n: int = 64, cap: int | None = None,
                   num_warps: int | None = None):
    """query (T, H, K), keys (H, 2, n_keys, K // 2) -> scores (T, H, knn) fp32, ids (T, H, knn) int64.

    usage=True adds (usage (H, 2, n_keys) fp32: the mean over tokens of the softmax over sub-keys,
    lse (T, H, 2) fp32: each token's log-sum-exp over them). tf32: let fp32 inputs use TF32 tensor
    cores (near-ties may then pick other slots than the fp32 reference); bf16 inputs are exact
    products with fp32 sums. cap: survivor slots per token (default 4 * KNN; tests shrink it to
    force the bisection fallback).
    """
    T, H, K = query.shape
    n_keys = keys.shape[2]
    half_dim = K // 2
    if keys.shape != (H, 2, n_keys, half_dim) or K % 2:
        raise ValueError(f"keys must be (H={H}, 2, n_keys, {half_dim}) for query {tuple(query.shape)}, got {tuple(keys.shape)}")
    if knn > n_keys:
        raise ValueError(f"knn={knn} exceeds n_keys={n_keys}")
    if n_keys * n_keys >= 2**31:
        raise ValueError(f"n_keys={n_keys}: slot ids must fit in int32 inside the kernel")
    if query.dtype != keys.dtype or query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        query, keys = query.float(), keys.float()
    query, keys = query.contiguous(), keys.contiguous()

    # exact fp32 products run on CUDA cores (FMA): smaller blocks keep them within the registers
    fma = query.dtype == torch.float32 and not tf32
    block_t = block_t or (16 if fma else 32)
    num_warps = num_warps or (4 if fma else 8)
    KNN = triton.next_power_of_2(knn)  # tl.topk wants powers of two
    G = 2 * KNN
    CAP = max(cap or 4 * KNN, KNN)
    BLOCK_N = max(G, 16, min(block_n, triton.next_power_of_2(n_keys)))
    BLOCK_KD = max(16, triton.next_power_of_2(half_dim))  # tl.dot wants >= 16
    BLOCK_T = max(16, block_t)
    n_tblocks = triton.cdiv(T, BLOCK_T)
    pair_a, pair_b, n_pairs = pruned_pairs(knn, str(query.device))
    scores = _alloc.empty((T, H, knn), torch.float32, query.device)
    ids = _alloc.empty((T, H, knn), torch.int64, query.device)
    lists = torch.empty((T, H, 2, KNN), dtype=torch.int64, device=query.device)
    scratch = torch.empty((T, H, 2, CAP), dtype=torch.int64, device=query.device)  # the survivors, packed
    flags = torch.empty((n_tblocks, H, 2), dtype=torch.int32, device=query.device)
    lse = _alloc.empty((T, H, 2), torch.float32, query.device) if usage else flags
    partial = _alloc.empty((n_tblocks, H, 2, n_keys), torch.float32, query.device) if usage else flags
    precision = "tf32" if (tf32 and query.dtype == torch.float32) else "ieee"
    if T:
        common = (T, H, n_keys, half_dim, knn, query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
                  keys.stride(2))
        meta = dict(KNN=KNN, G=G, CAP=CAP, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_KD=BLOCK_KD,
                    INPUT_PRECISION=precision, UPCAST=interpret_mode(), num_warps=num_warps)
        grid = (n_tblocks, 2 * H)
        _half_lists_kernel[grid](query, keys, lists, scratch, flags, lse, partial, *common, USAGE=usage, **meta)
        _half_lists_fallback_kernel[grid](query, keys, lists, scratch, flags, *common, **meta)
        _pairs_kernel[(triton.cdiv(T, 16), H)](lists, pair_a, pair_b, scores, ids, T, H, n_keys, knn, n_pairs,
                                               KNN=KNN, PP=pair_a.numel(), BLOCK_T=16, num_warps=4)
    if not usage:
        return scores, ids
    return scores, ids, partial.sum(0) / max(T, 1), lse
