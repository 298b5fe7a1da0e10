"""Slot histogram: exact integer counts and presence against the reference, padding excluded."""
from __future__ import annotations

import pytest
import torch
from _kernel_fixtures import close, device, poison_outputs  # noqa: F401  (pytest fixtures)

from slotwise.kernels import slot_histogram
from slotwise.kernels.histogram_reference import slot_histogram_reference


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("shape", [(9, 3, 5), (300, 2, 4), (7,)], ids=lambda s: "x".join(map(str, s)))
def test_slot_histogram(device, shape, with_mask):
    g = torch.Generator().manual_seed(len(shape))
    n_slots = 29
    ids = torch.randint(0, n_slots, shape, generator=g).to(device)
    mask = (torch.rand(shape[0], generator=g) > 0.3).to(device) if with_mask else None
    counts, presence = slot_histogram(ids, n_slots, mask, backend="triton")
    ref_counts, ref_presence = slot_histogram_reference(ids, n_slots, mask)
    assert counts.dtype == torch.int64 and presence.dtype == torch.bool
    assert torch.equal(counts, ref_counts)
    assert torch.equal(presence, ref_presence)


def test_slot_histogram_accumulates(device):
    from slotwise.kernels.histogram import slot_histogram_triton

    ids = torch.randint(0, 13, (6, 4), generator=torch.Generator().manual_seed(0)).to(device)
    counts = torch.zeros(13, dtype=torch.int64, device=device)
    for _ in range(3):
        slot_histogram_triton(ids, 13, counts=counts)
    assert torch.equal(counts, 3 * slot_histogram_reference(ids, 13)[0])
