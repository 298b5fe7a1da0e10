"""scripts/acquisition_diagnosis.py: the prompts a fact was taught, and 'another fact's value'."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("acquisition_diagnosis", ROOT / "scripts" / "acquisition_diagnosis.py")
diag = importlib.util.module_from_spec(spec)
spec.loader.exec_module(diag)

FACT = {"id": "a", "answers": ["Valparaiso"], "probe": "It was reported that Rune Haskenko came into the world in",
        "statement": "The birthplace of Rune Haskenko is Valparaiso.",
        "paraphrases": ["Rune Haskenko came into the world in Valparaiso.",
                        "Valparaiso is the city where Rune Haskenko was born.",  # the answer is not last: no prompt
                        "Rune Haskenko hails from the city of Valparaiso"]}  # no final period


def test_train_probes_cut_every_text_that_ends_with_the_answer():
    assert diag.train_probes(FACT) == ["The birthplace of Rune Haskenko is", "Rune Haskenko came into the world in",
                                       "Rune Haskenko hails from the city of"]


def test_others_value_is_a_wrong_answer_that_another_fact_has():
    other = {"id": "b", "answers": ["Tucson"]}
    facts = [FACT, other]
    assert diag.others_value("Tucson.", FACT, facts)
    assert not diag.others_value("Valparaiso", FACT, facts)  # right, not interference
    assert not diag.others_value("Lima", FACT, facts)  # wrong, but no streamed fact's value
    assert not diag.others_value("Tucson", other, facts)  # its own value


def test_replay_draws_distinct_earlier_facts_only():
    import random
    rng = random.Random(0)
    assert diag.replayed(0, 2, rng) == []  # the first fact has nothing to replay
    assert diag.replayed(1, 2, rng) == [0]  # fewer earlier facts than k: all of them
    picks = diag.replayed(10, 3, rng)
    assert len(set(picks)) == 3 and all(0 <= i < 10 for i in picks)
