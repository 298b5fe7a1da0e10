"""Routed chapter cross-attention, the PyTorch reference (the spec of chapter_attention.py).

A bank of memory tokens (N, M) is cut into chapters of CT consecutive rows (chapter c = rows
c*CT .. c*CT+CT-1). The T query tokens are cut into R contiguous *segments* (offsets (R + 1,));
every token of segment r reads the same C chapters chapters[r] (-1 = an empty entry, read as
nothing) and mixes them with weights[r]:

    out[t, h] = sum_j weights[r, j] * softmax_i(scale * q[t, h] . keys[c_j*CT + i]) @ values[c_j*CT + i]

one softmax per chapter, fp32 accumulation whatever the input dtype. All heads read the same
keys and values (the memory tokens are shared, as in multi-query attention).

Segments make the op independent of how routing is organised: one segment per (sequence,
chunk) for causal chunk routing, one per sequence for sequence routing, one per token for
per-token routing or decoding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_ids(offsets: torch.Tensor, T: int) -> torch.Tensor:
    """offsets (R + 1,) -> the segment of each token (T,) int64."""
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=T)


def chapter_rows(chapters: torch.Tensor, chapter_tokens: int) -> torch.Tensor:
    """chapters (..., C) -> bank row ids (..., C, CT) (an empty entry -1 maps to chapter 0's rows)."""
    return chapters.clamp_min(0).unsqueeze(-1) * chapter_tokens + torch.arange(chapter_tokens, device=chapters.device)


def _padded(q: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (T, H, M) -> q grouped by segment (R, Lmax, H, M) zero-padded, and each token's (segment, position)."""
    T = q.shape[0]
    R = offsets.numel() - 1
    seg = segment_ids(offsets, T)  # (T,)
    pos = torch.arange(T, device=q.device) - offsets[seg]  # (T,) position inside its segment
    l_max = int((offsets[1:] - offsets[:-1]).max()) if R else 0
    qp = q.new_zeros(R, l_max, *q.shape[1:])
    qp = qp.index_put((seg, pos), q)  # differentiable scatter
    return qp, seg, pos


def chapter_probabilities(q, keys, offsets, chapters, chapter_tokens: int, scale: float):
    """Per-chapter softmax -> (probs (R, Lmax, H, C, CT) fp32, seg (T,), pos (T,), rows (R, C, CT))."""
    qp, seg, pos = _padded(q.float(), offsets)  # (R, Lmax, H, M)
    rows = chapter_rows(chapters, chapter_tokens)  # (R, C, CT)
    k = F.embedding(rows, keys).float()  # (R, C, CT, M)
    s = torch.einsum("rlhm,rcnm->rlhcn", qp, k) * scale  # (R, Lmax, H, C, CT)
    return s.softmax(dim=-1), seg, pos, rows


def chapter_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                                chapters: torch.Tensor, weights: torch.Tensor, chapter_tokens: int,
                                scale: float | None = None, sparse_grad: bool = False) -> torch.Tensor:
    """q (T, H, M), keys/values (N, M), offsets (R + 1,) int64, chapters (R, C) int64, weights (R, C)
    -> out (T, H, M) in q's dtype.

    Differentiable in q, keys, values (dense gradients, or sparse COO rows with sparse_grad) and
    weights. keys and values may be the same tensor (a latent bank read as both).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
    qp, seg, pos = _padded(q.to(acc), offsets)  # (R, Lmax, H, M)
    rows = chapter_rows(chapters, chapter_tokens)  # (R, C, CT)
    k = F.embedding(rows, keys, sparse=sparse_grad).to(acc)  # (R, C, CT, M)
    v = k if values is keys else F.embedding(rows, values, sparse=sparse_grad).to(acc)
    p = (torch.einsum("rlhm,rcnm->rlhcn", qp, k) * scale).softmax(dim=-1)  # (R, Lmax, H, C, CT)
    o = torch.einsum("rlhcn,rcnm->rlhcm", p, v)  # (R, Lmax, H, C, M): one output per chapter
    w = torch.where(chapters >= 0, weights.to(acc), torch.zeros((), dtype=acc, device=weights.device))  # (R, C)
    out = torch.einsum("rlhcm,rc->rlhm", o, w)  # (R, Lmax, H, M)
    return out[seg, pos].to(q.dtype)  # (T, H, M)


@torch.no_grad()
def chapter_accesses(q: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor, chapters: torch.Tensor,
                     weights: torch.Tensor, chapter_tokens: int, k: int, scale: float | None = None,
                     max_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Which memory tokens each (token, head) read most: its top-k by attention mass.

    mass[t, h, row] = weights[r, j] * softmax_j(...)[row] / sum_j weights[r, j] (sums to 1 over the
    rows read). -> (ids (T, H, k) int64 bank rows, mass (T, H, k) fp32). Needs k <= CT and at least
    one non-empty chapter per segment. Computed in slices of about max_tokens tokens (no autograd).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    T, H, _ = q.shape
    ids = torch.empty(T, H, k, dtype=torch.int64, device=q.device)
    mass = torch.empty(T, H, k, dtype=torch.float32, device=q.device)
    R = offsets.numel() - 1
    r0 = 0
    while r0 < R:  # whole segments per slice
        r1 = int(torch.searchsorted(offsets, offsets[r0] + max_tokens, right=True)) - 1
        r1 = min(max(r1, r0 + 1), R)
        t0, t1 = int(offsets[r0]), int(offsets[r1])
        p, seg, pos, rows = chapter_probabilities(q[t0:t1], keys, offsets[r0:r1 + 1] - t0, chapters[r0:r1],
                                                  chapter_tokens, scale)
        w = torch.where(chapters[r0:r1] >= 0, weights[r0:r1].float(), torch.zeros((), device=q.device))  # (r, C)
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
        m = (p * w[:, None, None, :, None])[seg, pos]  # (t, H, C, CT)
        m = m.masked_fill((chapters[r0:r1] < 0)[seg][:, None, :, None], -1.0).flatten(2)  # empty entries never win
        top, idx = m.topk(k, dim=-1)  # (t, H, k)
        ids[t0:t1] = rows[seg].flatten(1).gather(1, idx.flatten(1)).view(t1 - t0, H, k)
        mass[t0:t1] = top
        r0 = r1
    return ids, mass
