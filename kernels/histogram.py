"""Slot histogram, the Triton kernel (spec: histogram_reference.slot_histogram_reference).

One program per block of tokens adds 1 to counts[id] for each of the tokens' slot ids with
tl.atomic_add (integer adds commute, so the result is exact and deterministic); padding tokens
(mask False) are skipped. Presence, the per-batch term of a document frequency, is counts > 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _histogram_kernel(ids_ptr, mask_ptr, counts_ptr, T, PER, HAS_MASK: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < T
    if HAS_MASK:
        t_mask = t_mask & (tl.load(mask_ptr + t, mask=t_mask, other=0) != 0)
    ones = tl.full([BLOCK_T, BLOCK_P], 1, tl.int64)
    for p0 in range(0, PER, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = t_mask[:, None] & (p[None, :] < PER)
        slot = tl.load(ids_ptr + t[:, None].to(tl.int64) * PER + p[None, :], mask=m, other=0)
        tl.atomic_add(counts_ptr + slot, ones, mask=m)


def slot_histogram_triton(ids: torch.Tensor, n_slots: int, mask: torch.Tensor | None = None,
                          counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (T, ...) and mask (T,) (False = padding) -> counts (n_slots,) int64, presence (n_slots,) bool.

    counts: an int64 (n_slots,) buffer to accumulate into (e.g. over a background corpus).
    """
    T = ids.shape[0]
    PER = ids[0].numel() if T else 0
    if counts is None:
        counts = torch.zeros(n_slots, dtype=torch.int64, device=ids.device)
    elif counts.dtype != torch.int64 or counts.shape != (n_slots,):
        raise ValueError(f"counts must be an int64 ({n_slots},) buffer")
    if T and PER:
        ids = ids.reshape(T, PER).contiguous()
        if mask is not None:
            mask = mask.reshape(T).to(torch.int8).contiguous()
        BLOCK_P = min(triton.next_power_of_2(PER), 128)
        BLOCK_T = max(1024 // BLOCK_P, 1)
        _histogram_kernel[(triton.cdiv(T, BLOCK_T),)](ids, mask if mask is not None else ids, counts, T, PER,
                                                      HAS_MASK=mask is not None, BLOCK_T=BLOCK_T, BLOCK_P=BLOCK_P)
    return counts, counts > 0
