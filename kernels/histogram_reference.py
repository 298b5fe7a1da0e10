"""Slot histogram, the PyTorch reference: access counts and per-batch presence."""
from __future__ import annotations

import torch


def slot_histogram_reference(
    ids: torch.Tensor, n_slots: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (T, ...) slot ids of T tokens, mask (T,) bool (False = padding, not counted).

    Returns counts (n_slots,) int64 (accesses) and presence (n_slots,) bool (used at least once),
    the per-batch term of a document frequency.
    """
    if mask is not None:
        ids = ids[mask.bool()]
    counts = torch.bincount(ids.reshape(-1).long(), minlength=n_slots)
    return counts, counts > 0
