"""Slot scores and selection against numbers worked out by hand."""
import math

import pytest
import torch

from slotwise.continual.selection import (
    Background,
    access_counts,
    kl_scores,
    merge_backgrounds,
    random_scores,
    rare_rows,
    select_slots,
    slot_scores,
    tf_scores,
    tfidf_scores,
)

# Four slots. The batch reads slot 0 twice, slots 2 and 3 once, slot 1 never: sum c = 4.
C = torch.tensor([2, 0, 1, 1])
# Background: |B| = 3 batches; counts sum to 16.
BG = Background(counts=torch.tensor([6, 0, 1, 9]), df=torch.tensor([2, 0, 0, 3]), n_batches=3)


def test_access_counts_exclude_masked_tokens():
    ids = torch.tensor([[[[0, 2]], [[0, 3]], [[1, 1]]]])  # (B=1, S=3, H=1, knn=2)
    mask = torch.tensor([[True, True, False]])  # the third token is padding
    assert access_counts(ids, mask, 4).tolist() == [2, 0, 1, 1]
    assert access_counts(ids, None, 4).tolist() == [2, 2, 1, 1]


def test_tf():
    assert tf_scores(C).tolist() == [0.5, 0.0, 0.25, 0.25]
    assert tf_scores(torch.zeros(3, dtype=torch.long)).tolist() == [0, 0, 0]


def test_tfidf_by_hand():
    # idf = log((3+1)/(df+1)) = [log 4/3, log 4, log 4, log 1 = 0]
    want = [0.5 * math.log(4 / 3), 0.0, 0.25 * math.log(4), 0.0]
    assert tfidf_scores(C, BG).tolist() == pytest.approx(want, abs=1e-12)
    # slot 2 (rare in the background) beats slot 0 (read twice, but in 2 of 3 batches)
    assert select_slots(tfidf_scores(C, BG), C, 1).tolist() == [2]
    assert select_slots(tfidf_scores(C, BG), C, 2).tolist() == [0, 2]


def test_kl_by_hand():
    # q = (counts_bg + 1) / (16 + 1 * 4) = [7, 1, 2, 10] / 20; p = [.5, 0, .25, .25]
    want = [0.5 * math.log(0.5 / 0.35), 0.0, 0.25 * math.log(0.25 / 0.10), 0.25 * math.log(0.25 / 0.50)]
    got = kl_scores(C, BG, smoothing=1.0)
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert got.sum().item() == pytest.approx(sum(want))  # the scores sum to KL(p || q)
    assert select_slots(got, C, 1).tolist() == [2]
    with pytest.raises(ValueError, match="smoothing"):
        kl_scores(C, BG, smoothing=0.0)


def test_never_selects_an_unaccessed_slot():
    scores = torch.tensor([0.1, 99.0, 0.2, -5.0])  # slot 1 scores highest but was not read
    assert select_slots(scores, C, 4).tolist() == [0, 2, 3]  # fewer than t candidates: all of them
    assert select_slots(scores, C, 2).tolist() == [0, 2]
    assert select_slots(scores, torch.zeros(4, dtype=torch.long), 3).tolist() == []


def test_ties_go_to_the_lower_id():
    c = torch.tensor([1, 1, 1, 1])
    assert select_slots(torch.ones(4), c, 2).tolist() == [0, 1]


def test_rare_rows_filter():
    # df / |B| <= 0.5  <=>  df <= 1.5: slots 1 and 2
    assert rare_rows(BG, 0.5).tolist() == [False, True, True, False]
    assert select_slots(tfidf_scores(C, BG), C, 3, allowed=rare_rows(BG, 0.5)).tolist() == [2]


def test_random_is_seeded_and_only_accessed():
    a, b = random_scores(C, seed=3), random_scores(C, seed=3)
    assert torch.equal(a, b)
    assert a[1] == 0 and (a[[0, 2, 3]] > 0).all()
    assert not torch.equal(a, random_scores(C, seed=4))
    assert 1 not in select_slots(a, C, 3).tolist()


def test_dispatch_checks_inputs():
    assert torch.equal(slot_scores("tfidf", C, BG), tfidf_scores(C, BG))
    with pytest.raises(ValueError, match="one of"):
        slot_scores("bm25", C, BG)
    with pytest.raises(ValueError, match="background"):
        slot_scores("kl", C, None)
    with pytest.raises(ValueError, match="slots"):
        slot_scores("tfidf", torch.ones(5, dtype=torch.long), BG)


def test_merge_backgrounds_for_a_shared_pool():
    other = Background(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 1, 0, 0]), 3)
    m = merge_backgrounds([BG, other])
    assert m.counts.tolist() == [7, 1, 1, 9]
    assert m.df.tolist() == [3, 1, 0, 3]  # upper bound min(|B|, sum df): slot 0 2+1=3, slot 3 clipped at 3
    with pytest.raises(ValueError, match="disagree"):
        merge_backgrounds([BG, Background(torch.zeros(4), torch.zeros(4), 5)])
