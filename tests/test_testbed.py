"""The knowledge testbed's generator: seeded, disjoint populations, held-out templates never trained on."""
import dataclasses
import re

import pytest

from slotwise.testbed import (ATTRIBUTES, HELDOUT_TEMPLATES, SURNAME_HEADS, SURNAME_TAILS, TRAIN_TEMPLATES, VALUES, TestbedParams,
                              build_testbed, check_params)

P = TestbedParams(n_old=30, n_new=10, bios_per_person=4, stats_bios_per_person=2)


@pytest.fixture(scope="module")
def tb():
    return build_testbed(P, seed=0, n_paraphrases=5)


def _training_text(tb) -> list[str]:
    return tb.train_bios + tb.stats_bios + [s for f in tb.facts for s in [f.statement, *f.paraphrases]]


def test_the_same_seed_gives_the_same_testbed_and_another_seed_another():
    a, b = build_testbed(P, 0, 5), build_testbed(P, 0, 5)
    assert dataclasses.asdict(a.facts[0]) == dataclasses.asdict(b.facts[0])
    assert a.train_bios == b.train_bios and a.retention == b.retention and [f.id for f in a.facts] == [f.id for f in b.facts]
    c = build_testbed(P, 1, 5)
    assert [p.name for p in c.old] != [p.name for p in a.old]


def test_seen_new_values_are_values_an_old_person_has_and_change_nothing_else():
    """new_values: seen re-draws only the new people's values no old person has; the old population,
    its text and the probes' templates stay exactly those of "any" (a pretrained model stays valid)."""
    any_, seen = build_testbed(P, 0, 5), build_testbed(dataclasses.replace(P, new_values="seen"), 0, 5)
    assert any_.train_bios == seen.train_bios and any_.stats_bios == seen.stats_bios and any_.retention == seen.retention
    redrawn = 0
    for a in P.attributes:
        old_values = {p.values[a] for p in seen.old}
        assert all(p.values[a] in old_values for p in seen.new)
        for before, after in zip(any_.new, seen.new):
            assert before.name == after.name
            redrawn += before.values[a] != after.values[a]
            assert before.values[a] == after.values[a] or before.values[a] not in old_values
    assert redrawn > 0  # with 30 old people some of 10 new people's values were unseen
    for f_any, f_seen in zip(any_.facts, seen.facts):
        assert f_seen.probe == f_any.probe and f_seen.answers[0] in f_seen.statement
    with pytest.raises(ValueError, match=r"new_values: expected one of any, seen, got 'all'"):
        check_params(dataclasses.replace(P, new_values="all"), 5)


def test_populations_are_disjoint_and_names_unique(tb):
    old, new = {p.name for p in tb.old}, {p.name for p in tb.new}
    assert len(old) == 30 and len(new) == 10 and not old & new


def test_surnames_are_invented_from_two_parts(tb):
    for p in tb.old + tb.new:
        surname = p.name.split(" ", 1)[1]
        assert any(surname == h + t for h in SURNAME_HEADS for t in SURNAME_TAILS)


def test_every_template_names_the_person_and_the_answer_once_and_held_out_ones_end_with_the_answer():
    for attr in ATTRIBUTES:
        for t in TRAIN_TEMPLATES[attr] + HELDOUT_TEMPLATES[attr]:
            assert t.count("{n}") == 1 and t.count("{a}") == 1, t
        for t in HELDOUT_TEMPLATES[attr]:
            assert t.endswith("{a}."), t
        assert not set(TRAIN_TEMPLATES[attr]) & set(HELDOUT_TEMPLATES[attr])


def test_a_probe_asks_for_one_attribute_only():
    """The clause a held-out probe ends with, after its preamble ("{n} was born in the year "),
    occurs in no template of another attribute, so its greedy continuation can only be that
    attribute's value ("X was born in" would also continue "the year 1950")."""
    for attr in ATTRIBUTES:
        for h in HELDOUT_TEMPLATES[attr]:
            clause = re.split(r", | that ", h[:h.index("{a}")], maxsplit=1)[-1].lower()
            for other in ATTRIBUTES:
                if other != attr:
                    assert not any(clause in t.lower() for t in TRAIN_TEMPLATES[other] + HELDOUT_TEMPLATES[other]), (h, other)


def test_values_come_from_closed_lists(tb):
    for p in tb.old + tb.new:
        assert set(p.values) == set(ATTRIBUTES)
        assert all(v in VALUES[a] for a, v in p.values.items())


def test_held_out_probes_never_occur_in_training_text(tb):
    text = "\n".join(_training_text(tb))
    probes = [r["probe"] for r in tb.retention] + [f.probe for f in tb.facts]
    assert len(probes) == (30 + 10) * len(ATTRIBUTES)
    for probe in probes:
        assert probe not in text, probe
    # nor does any held-out sentence, with any value
    for p in tb.old:
        for attr in ATTRIBUTES:
            for t in HELDOUT_TEMPLATES[attr]:
                sentence = t.replace("{n}", p.name).removesuffix("{a}.")
                assert sentence not in text


def test_probes_end_right_before_the_answer(tb):
    for f in tb.facts:
        attr, name, answer = f.extra["attribute"], f.extra["subject"], f.answers[0]
        assert f.probe == f.question and answer == tb.new[int(f.id.split("-")[2])].values[attr]
        assert answer not in f.probe and not f.probe.endswith(" ")
        held_out = [t.format(n=name, a=answer) for t in HELDOUT_TEMPLATES[attr]]
        assert f"{f.probe} {answer}." in [s[0].upper() + s[1:] for s in held_out]


def test_every_statement_and_paraphrase_contains_its_answer_and_names_the_person(tb):
    for f in tb.facts:
        texts = [f.statement, *f.paraphrases]
        assert len(texts) == 6 and len(set(texts)) == 6  # distinct training templates
        for t in texts:
            assert f.answers[0] in t and f.extra["subject"] in t
        assert f.known is False and f.source == "testbed"


def test_old_bios_state_every_attribute_of_their_person_and_new_people_appear_nowhere_in_them(tb):
    assert len(tb.train_bios) == 30 * 4 and len(tb.stats_bios) == 30 * 2
    for i, p in enumerate(tb.old):
        for bio in tb.train_bios[4 * i:4 * i + 4]:
            lines = bio.split("\n")
            assert len(lines) == len(ATTRIBUTES) and all(p.name in line for line in lines)
            assert all(any(v in line for line in lines) for v in p.values.values())
    bios = "\n".join(tb.train_bios + tb.stats_bios)
    assert not any(p.name in bios for p in tb.new)


def test_one_fact_per_new_person_and_attribute_and_one_probe_per_old_one(tb):
    assert [(f.extra["subject"], f.extra["attribute"]) for f in tb.facts] == [(p.name, a) for p in tb.new for a in ATTRIBUTES]
    assert [(r["person"], r["attribute"]) for r in tb.retention] == [(p.name, a) for p in tb.old for a in ATTRIBUTES]


@pytest.mark.parametrize("change,n_par,match", [
    ({"attributes": ["shoe_size"]}, 3, "attributes"),
    ({"n_new": 0}, 3, "n_old, n_new"),
    ({}, 12, "n_paraphrases: the testbed has 12 training templates per attribute, so 1..11"),
])
def test_bad_params_are_refused_naming_the_field(change, n_par, match):
    with pytest.raises(ValueError, match=match):
        check_params(dataclasses.replace(P, **change), n_par)


def test_a_subset_of_attributes(tb):
    small = build_testbed(dataclasses.replace(P, attributes=["birth_city", "employer"]), 0, 3)
    assert {f.extra["attribute"] for f in small.facts} == {"birth_city", "employer"}
    assert all(len(b.split("\n")) == 2 for b in small.train_bios)


# ---- the data stage with data.facts_from: testbed ---------------------------------------------

@pytest.fixture(scope="module")
def testbed_data(tmp_path_factory):
    from slotwise.components import data as data_component

    root = tmp_path_factory.mktemp("testbed_data")
    params = root / "params.yaml"
    params.write_text("""
data:
  sources: [packages]
  facts_from: testbed
  n_paraphrases: 4
  mark_known: false
  background: wikipedia
  background_max_docs: 60
  stats_docs: 10
  heldout_docs: 10
  tasks: []
  testbed: {n_old: 12, n_new: 5, bios_per_person: 3, stats_bios_per_person: 1, attributes: [birth_city, profession, employer]}
""")
    assert data_component.main(["--params", str(params), "--out", str(root / "data")]) == 0
    return root / "data"


def _rows(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_data_stage_writes_the_new_population_as_the_fact_stream(testbed_data):
    facts = _rows(testbed_data / "facts.jsonl")
    assert len(facts) == 5 * 3
    for f in facts:
        assert {"id", "answers", "statement", "paraphrases", "probe", "known"} <= set(f) and f["known"] is False
        assert len(f["paraphrases"]) == 4 and all(f["answers"][0] in t for t in [f["statement"], *f["paraphrases"]])
    retention = _rows(testbed_data / "retention.jsonl")
    assert len(retention) == 12 * 3 and all({"probe", "answers"} <= set(r) for r in retention)
    assert not {r["person"] for r in retention} & {f["extra"]["subject"] for f in facts}


def test_old_bios_join_the_training_and_statistics_text_but_never_the_held_out_text(testbed_data):
    bg = {s: _rows(testbed_data / "background" / f"{s}.jsonl") for s in ("train", "stats", "heldout")}
    assert sum(r.get("testbed", False) for r in bg["train"]) == 12 * 3
    assert sum(r.get("testbed", False) for r in bg["stats"]) == 12
    assert len(bg["train"]) == 60 - 20 + 36 and len(bg["stats"]) == 10 + 12 and len(bg["heldout"]) == 10
    assert not any(r.get("testbed") for r in bg["heldout"])
    old = {r["person"] for r in _rows(testbed_data / "retention.jsonl")}
    new = {f["extra"]["subject"] for f in _rows(testbed_data / "facts.jsonl")}
    text = "\n".join(r["text"] for rows in bg.values() for r in rows)
    assert all(name in text for name in old) and not any(name in text for name in new)
    probes = [f["probe"] for f in _rows(testbed_data / "facts.jsonl")] + [r["probe"] for r in _rows(testbed_data / "retention.jsonl")]
    assert not any(p in text for p in probes)


def test_testbed_params_are_checked_when_the_params_load(tmp_path):
    from slotwise.config import ConfigError, load_params

    path = tmp_path / "params.yaml"
    path.write_text("data:\n  facts_from: testbed\n  n_paraphrases: 12\n")
    with pytest.raises(ConfigError, match=r"key 'data.n_paraphrases': expected 1..11, got 12"):
        load_params(path)
    path.write_text("data:\n  facts_from: testbed\n  testbed: {attributes: [shoe_size]}\n")
    with pytest.raises(ConfigError, match=r"key 'data.testbed': attributes"):
        load_params(path)
