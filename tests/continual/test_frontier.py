"""Sweeps expand into one run each; frontiers are compared at matched acquisition."""
import pytest

from slotwise.continual.experiment import MethodRun
from slotwise.continual.frontier import common_levels, efficient, expand_sweeps, interpolate, matched


def test_a_sweep_expands_into_one_named_run_per_value_grouped_under_the_method():
    runs = expand_sweeps([MethodRun("full_ft", "full", {"lr": 1e-5}, sweep={"lr": [3e-6, 3e-5]}),
                          MethodRun("smf", "smf", {"score": "tfidf"}, sweep={"top_t": [50.0, 500.0], "steps_per_fact": [2, 8]})])
    assert [r.name for r in runs] == ["full_ft@lr=3e-06", "full_ft@lr=3e-05",
                                      "smf@top_t=50@steps_per_fact=2", "smf@top_t=50@steps_per_fact=8",
                                      "smf@top_t=500@steps_per_fact=2", "smf@top_t=500@steps_per_fact=8"]
    assert {r.group for r in runs} == {"full_ft", "smf"} and all(not r.sweep for r in runs)
    assert runs[0].params.lr == 3e-6 and runs[1].params.lr == 3e-5  # typed params (FullFTConfig)
    assert runs[2].params.score == "tfidf" and runs[2].params.top_t == 50 and isinstance(runs[2].params.top_t, int)
    assert runs[3].steps_per_fact == 8 and runs[3].params.top_t == 50
    # no sweep: the run itself, its own group
    (plain,) = expand_sweeps([MethodRun("lora", "lora", {"r": 4})])
    assert plain.name == "lora" and plain.group == "lora"


def test_sweep_errors_are_named():
    with pytest.raises(ValueError, match="sweep.lr"):
        MethodRun("a", "full", sweep={"lr": []})
    with pytest.raises(ValueError, match=r"sweep.lrr': not a full param \(expected one of: .*lr"):
        MethodRun("a", "full", sweep={"lrr": [0.1]})
    with pytest.raises(ValueError, match="unique"):
        expand_sweeps([MethodRun("a", "full", sweep={"lr": [1.0]}), MethodRun("a@lr=1", "full")])


def test_interpolate_is_piecewise_linear_and_never_extrapolates():
    pts = [(0.2, 0.10), (0.6, 0.30), (0.4, 0.50), (0.4, 0.30)]  # two points at 0.4 average to 0.4
    assert interpolate(pts, 0.2) == pytest.approx(0.10)
    assert interpolate(pts, 0.3) == pytest.approx(0.25)  # halfway between (0.2, 0.1) and (0.4, 0.4)
    assert interpolate(pts, 0.5) == pytest.approx(0.35)
    assert interpolate(pts, 0.1) is None and interpolate(pts, 0.7) is None
    assert interpolate([(0.5, 0.2)], 0.5) == pytest.approx(0.2)


def test_matched_compares_groups_at_the_same_acquisition():
    summary = {  # 10 facts: smf learns 2 / 6 with small drops, full FT 4 / 8 with large ones
        "smf@lr=1": {"learned": 2, "n_facts": 10, "known_drop": 0.0, "heldout_ppl_rise": 0.01},
        "smf@lr=10": {"learned": 6, "n_facts": 10, "known_drop": 0.1, "heldout_ppl_rise": 0.03},
        "ft@lr=1": {"learned": 4, "n_facts": 10, "known_drop": 0.4, "heldout_ppl_rise": 0.05},
        "ft@lr=10": {"learned": 8, "n_facts": 10, "known_drop": 0.8, "heldout_ppl_rise": 0.09},
    }
    groups = {"smf@lr=1": "smf", "smf@lr=10": "smf", "ft@lr=1": "ft", "ft@lr=10": "ft"}
    levels = common_levels(summary, groups)
    assert levels == [0.4, 0.6]  # the runs' acquisitions where both frontiers ([0.2, 0.6], [0.4, 0.8]) can be read
    table = matched(summary, groups, levels)
    assert table["smf"]["acquisition_range"] == [0.2, 0.6]
    assert table["smf"]["at"]["0.4"]["known_drop"] == pytest.approx(0.05)
    assert table["ft"]["at"]["0.4"]["known_drop"] == pytest.approx(0.4)
    assert table["ft"]["at"]["0.6"]["heldout_ppl_rise"] == pytest.approx(0.07)
    assert matched(summary, groups, [0.9])["smf"]["at"]["0.9"]["known_drop"] is None
    one_run = {"learned": 5, "n_facts": 10, "known_drop": 0.7, "heldout_ppl_rise": 0.1}
    far_run = {"learned": 9, "n_facts": 10, "known_drop": 0, "heldout_ppl_rise": 0}
    # a single run inside both frontiers adds its level; one outside every other range adds nothing and,
    # unlike the ranges' intersection, empties nothing
    assert common_levels({**summary, "lora": one_run, "x": far_run}, {**groups, "lora": "lora", "x": "x"}) == [0.4, 0.5, 0.6]
    assert common_levels({"a": one_run, "b": far_run}, {"a": "a", "b": "b"}) == []  # no two groups meet


def test_a_run_past_the_best_lr_is_not_on_the_frontier():
    """An lr that learns less and forgets more than another run of its group is left out of the interpolation."""
    summary = {  # lr 300 overshoots: fewer facts than lr 30 and twice the drop
        "smf@lr=10": {"learned": 14, "n_facts": 100, "known_drop": 0.10, "heldout_ppl_rise": 0.4},
        "smf@lr=30": {"learned": 25, "n_facts": 100, "known_drop": 0.17, "heldout_ppl_rise": 0.6},
        "smf@lr=100": {"learned": 25, "n_facts": 100, "known_drop": 0.35, "heldout_ppl_rise": 0.9},
        "smf@lr=300": {"learned": 22, "n_facts": 100, "known_drop": 0.67, "heldout_ppl_rise": 1.5},
    }
    groups = dict.fromkeys(summary, "smf")
    at = matched(summary, groups, [0.2, 0.25])["smf"]["at"]
    assert at["0.2"]["known_drop"] == pytest.approx(0.10 + 0.07 * 6 / 11)  # on the lr 10 -> lr 30 segment
    assert at["0.25"]["known_drop"] == pytest.approx(0.17)  # lr 100 learns as much for more: not averaged in
    assert efficient([(0.14, 0.1), (0.25, 0.17), (0.25, 0.35), (0.22, 0.67)]) == [(0.14, 0.1), (0.25, 0.17)]


def test_order_seed_streams_the_same_facts_in_another_order_and_none_keeps_the_file_order():
    from slotwise.continual.experiment import stream_order

    facts = [{"id": f"f{i}"} for i in range(30)]
    assert [f["id"] for f in stream_order(facts, None)] == [f"f{i}" for i in range(30)]
    a, b, a2 = (stream_order(facts, s) for s in (1, 2, 1))
    assert a == a2 and a != b and a != facts  # deterministic per seed; seeds differ
    assert sorted(f["id"] for f in a) == sorted(f["id"] for f in facts)  # the same facts
    assert [f["id"] for f in facts] == [f"f{i}" for i in range(30)]  # the input is left alone
