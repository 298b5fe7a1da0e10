"""scripts/mark_known.py: marks exactly the facts the model answers right, keeps every other field."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from conftest import SAMPLE_QA, small_llama
from slotwise.checkpoint import save_checkpoint
from slotwise.facts import fact_stream
from slotwise.generation import greedy_answers

ROOT = Path(__file__).resolve().parents[1]


def test_marks_known_facts_in_place(tmp_path, smol_tokenizer):
    model = small_llama(len(smol_tokenizer)).eval()
    save_checkpoint(model, smol_tokenizer, tmp_path / "model", None)
    facts = [dataclasses.asdict(f) for f in fact_stream(SAMPLE_QA[:3], "t", 2, seed=0)]
    # Make the first fact "known": accept whatever this random model answers to its probe.
    (said,) = greedy_answers(model, smol_tokenizer, [facts[0]["probe"]], batch_size=1)
    facts[0]["answers"] = [said]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "mark_known.py"), str(path), str(tmp_path / "model"),
                          "--batch-size", "2"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["known"] for r in rows] == [True, False, False]
    assert [r["paraphrases"] for r in rows] == [f["paraphrases"] for f in facts]
    assert "1 of 3 facts known" in out.stdout and not list(tmp_path.glob("*.tmp"))
