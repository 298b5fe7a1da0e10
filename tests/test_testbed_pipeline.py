"""The knowledge testbed end to end, shrunk (profiles/testbed-ci.yaml): the real stages, the real ordering.

data -> train (pretrain from scratch) -> slot_stats -> continual -> evaluate, each stage's own CLI
entry point on the CI profile, in a temporary directory. It pins what the testbed exists to show:
the pretrained model knows the old people (probed with held-out templates) and sparse memory
finetuning learns more of the new people than full finetuning does. The numbers are measured here;
nothing expected is computed by the code under test.
"""
import json
from pathlib import Path

import pytest

from slotwise.components import continual, data, evaluate, slot_stats, train

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "testbed-ci.yaml"


@pytest.mark.slow
def test_the_testbed_pipeline_learns_old_people_and_smf_acquires_more_than_full_finetuning(tmp_path):
    run = lambda *a: ["--params", str(PROFILE), *map(str, a)]  # noqa: E731
    assert data.main(run("--out", tmp_path / "data")) == 0
    assert train.main(run("--model", "embedded:smollm2-135m-instruct", "--data", tmp_path / "data", "--out", tmp_path / "train",
                          "--state", tmp_path / "train_state")) == 0
    assert slot_stats.main(run("--model", tmp_path / "train", "--data", tmp_path / "data", "--out", tmp_path / "slot_stats")) == 0
    assert continual.main(run("--model", tmp_path / "train", "--data", tmp_path / "data", "--stats", tmp_path / "slot_stats",
                              "--out", tmp_path / "continual")) == 0
    assert evaluate.main(run("--model", tmp_path / "train", "--data", tmp_path / "data", "--out", tmp_path / "evaluate")) == 0

    ev = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    old = ev["retention"]["exact_match"]  # the old people, asked with templates pretraining never used
    new_before = ev["facts"]["exact_match"]  # the new people before the stream: guessing
    m = json.loads((tmp_path / "continual" / "metrics.json").read_text())
    smf, full = m["smf_tfidf"], m["full_ft"]
    print(f"old facts {old:.2f}, new facts before {new_before:.2f}; smf learned {smf['learned']}/{smf['n_facts']} "
          f"known_drop {smf['known_drop']}; full FT learned {full['learned']}/{full['n_facts']} known_drop {full['known_drop']}")
    assert old >= 0.5 and new_before <= 0.2
    assert m["start"]["known_found"] >= 0.5 * m["start"]["known_screened"]
    assert smf["learned"] > full["learned"] and smf["acquisition_em"] >= 0.3
