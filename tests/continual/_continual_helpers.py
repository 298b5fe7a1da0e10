"""Helpers for the continual tests (not a conftest.py: tests/conftest.py must stay the only one)."""
from __future__ import annotations

import torch

from conftest import tiny_model, tiny_retrofit_cfg
from slotwise.continual.selection import Background
from slotwise.retrofit import retrofit

VOCAB = 101


def retrofitted(family: str = "llama", seed: int = 0, **memory):
    """A tiny decoder with memory in layers 1 and 3 (64 slots, 2 heads, knn 4); W2 std 0.1 by default."""
    memory.setdefault("out_init_std", 0.1)
    model = tiny_model(family, seed)
    retrofit(model, tiny_retrofit_cfg(**memory))
    return model


def fact_batch(seed: int = 1, batch: int = 2, seq: int = 11, answer: int = 4, pad: int = 1) -> dict:
    """input_ids (B, S), attention_mask with `pad` right-padding tokens in row 0, labels on the last
    `answer` real tokens of each row (-100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    labels = torch.full((batch, seq), -100)
    for b in range(batch):
        n = seq - (pad if b == 0 else 0)
        am[b, n:] = 0
        labels[b, n - answer:n] = ids[b, n - answer:n]
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def random_background(n_slots: int, n_batches: int = 20, seed: int = 0) -> Background:
    g = torch.Generator().manual_seed(seed)
    df = torch.randint(0, n_batches + 1, (n_slots,), generator=g)
    counts = df * torch.randint(1, 5, (n_slots,), generator=g)
    return Background(counts, df, n_batches)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
