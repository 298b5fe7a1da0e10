"""Product-key top-k, the Triton kernel (spec: product_key_reference.pk_topk_reference).

One program per (block of BLOCK_T tokens, head). For each half-query it streams the head's
sub-keys in blocks of BLOCK_N, scores them with tl.dot and keeps a running top-knn; then it
forms the knn x knn candidate sums in registers and takes their top-knn. The (T, n_keys)
score matrices never reach memory and nothing is sorted by a general-purpose top-k.

Selection uses tl.topk (a bitonic network, values only), so each score travels packed with
its index in one int64: the high 32 bits are the fp32 score mapped to an order-preserving
int32, the low 32 bits the bitwise-inverted index (ties go to the smaller index). Unpacking is
exact, so the returned scores are the kernel's fp32 scores bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _alloc
from ._dispatch import interpret_mode


@triton.jit
def _pack(score, idx):
    """fp32 score (any shape), int32 index -> int64 that orders like (score, -idx)."""
    bits = score.to(tl.int32, bitcast=True)
    # flip the magnitude bits of negative floats so signed int order equals float order
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    low = (~idx).to(tl.int64) & 0xFFFFFFFF
    return (key.to(tl.int64) << 32) | low


@triton.jit
def _unpack(packed):
    key = (packed >> 32).to(tl.int32)
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    idx = ~((packed & 0xFFFFFFFF).to(tl.int32))
    return bits.to(tl.float32, bitcast=True), idx


@triton.jit
def _half_topk(q_ptr, k_ptr, t_offs, t_mask, stride_qt, n_keys, half_dim, stride_kn,
               KNN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Top-KNN (packed) of one half-query against its n_keys sub-keys, for BLOCK_T tokens."""
    d = tl.arange(0, BLOCK_KD)
    d_mask = d < half_dim
    q = tl.load(q_ptr + t_offs[:, None] * stride_qt + d[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:  # the interpreter's tl.dot multiplies bf16 as raw uint16 bits; fp32 is exact here
        q = q.to(tl.float32)
    best = tl.full([BLOCK_T, KNN], -9223372036854775807 - 1, tl.int64)  # below any packed score
    for n0 in range(0, n_keys, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < n_keys
        k = tl.load(k_ptr + n[:, None] * stride_kn + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_T, BLOCK_N) fp32
        s = tl.where(n_mask[None, :], s, float("-inf"))
        blk = tl.topk(_pack(s, n[None, :] + tl.zeros([BLOCK_T, BLOCK_N], tl.int32)), KNN, dim=1)
        both = tl.reshape(tl.join(best, blk), [BLOCK_T, 2 * KNN])  # order is irrelevant to topk
        best = tl.topk(both, KNN, dim=1)
    return best


@triton.jit
def _pk_topk_kernel(q_ptr, k_ptr, scores_ptr, ids_ptr,
                    T, H, n_keys, half_dim, knn,
                    stride_qt, stride_qh, stride_kh, stride_ks, stride_kn,
                    KNN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < T
    q_head = q_ptr + h * stride_qh
    k_head = k_ptr + h * stride_kh
    best1 = _half_topk(q_head, k_head, t_offs, t_mask, stride_qt, n_keys, half_dim, stride_kn,
                       KNN, BLOCK_T, BLOCK_N, BLOCK_KD, INPUT_PRECISION, UPCAST)
    best2 = _half_topk(q_head + half_dim, k_head + stride_ks, t_offs, t_mask, stride_qt, n_keys, half_dim, stride_kn,
                       KNN, BLOCK_T, BLOCK_N, BLOCK_KD, INPUT_PRECISION, UPCAST)
    s1, i1 = _unpack(best1)  # (BLOCK_T, KNN) each, sorted descending
    s2, i2 = _unpack(best2)
    # the knn x knn candidate sums; slot id = i * n_keys + j fits the packed int32 (N < 2**31)
    cand = s1[:, :, None] + s2[:, None, :]  # (BLOCK_T, KNN, KNN)
    cand_ids = i1[:, :, None] * n_keys + i2[:, None, :]
    packed = tl.reshape(_pack(cand, cand_ids), [BLOCK_T, KNN * KNN])
    top_s, top_i = _unpack(tl.topk(packed, KNN, dim=1))  # (BLOCK_T, KNN)
    col = tl.arange(0, KNN)
    out_offs = (t_offs[:, None] * H + h) * knn + col[None, :]
    out_mask = t_mask[:, None] & (col[None, :] < knn)
    tl.store(scores_ptr + out_offs, top_s, mask=out_mask)
    tl.store(ids_ptr + out_offs, top_i.to(tl.int64), mask=out_mask)


def pk_topk_triton(query: torch.Tensor, keys: torch.Tensor, knn: int, tf32: bool = False,
                   block_t: int = 16, block_n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """query (T, H, K), keys (H, 2, n_keys, K // 2) -> scores (T, H, knn) fp32, ids (T, H, knn) int64.

    tf32=True lets fp32 inputs use TF32 tensor cores (faster on GPU, but near-ties may then pick
    different slots than the fp32 reference). bf16 inputs are exact products with fp32 sums.
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

    KNN = triton.next_power_of_2(knn)  # tl.topk wants a power of two
    BLOCK_N = max(KNN, 16, min(block_n, triton.next_power_of_2(n_keys)))
    BLOCK_KD = max(16, triton.next_power_of_2(half_dim))  # tl.dot wants >= 16
    BLOCK_T = max(16, block_t)
    scores = _alloc.empty((T, H, knn), torch.float32, query.device)
    ids = _alloc.empty((T, H, knn), torch.int64, query.device)
    precision = "tf32" if (tf32 and query.dtype == torch.float32) else "ieee"
    grid = (triton.cdiv(T, BLOCK_T), H)
    _pk_topk_kernel[grid](
        query, keys, scores, ids, T, H, n_keys, half_dim, knn,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        KNN=KNN, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_KD=BLOCK_KD, INPUT_PRECISION=precision,
        UPCAST=interpret_mode(), num_warps=4,
    )
    return scores, ids
