"""The nightly update's components: `slotwise update` (SMF -> cumulative sparse delta) and `slotwise gate`.

A tiny retrofitted Llama with the real SmolLM2 tokenizer, its slot table, a data folder and a drop
of facts (`make_world`, also used by tests/test_flows.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_QA, SMALL_MEMORY_CFG, small_llama
from slotwise.checkpoint import load_checkpoint, model_hash, save_checkpoint
from slotwise.components._cli import run_cli
from slotwise.components import gate as gate_component
from slotwise.components import update as update_component
from slotwise.continual.delta import apply_delta, load_delta, state_hash
from slotwise.facts import fact_stream
from slotwise.retrofit import retrofit
from slotwise.slot_stats import collect, pool_groups
from slotwise.slot_table import from_collect, save_table

REPO = Path(__file__).resolve().parents[1]
QA, CFG = SAMPLE_QA, SMALL_MEMORY_CFG
PARAMS = """
nightly:
  smf: {score: tfidf, top_t: 8, lr: 0.01, optimizer: adam}
  steps_per_fact: 2
  max_retention_drop: 10.0
  device: cpu
  eval: {known_screen: 2, ppl_blocks: 2, ppl_seq_len: 32, tasks: [], batch_size: 4}
"""
# A destructive update: facts written in the held-out text's own words (so they read the same
# slots), every slot they read trained (tf, count_on all, top_t = all 256) by SGD at a rate that
# swamps the residual stream: the held-out perplexity the world's model was fitted to (make_world)
# rises many-fold. TF-IDF on ordinary facts instead picks rows the held-out text never reads.
BREAK = ["nightly.smf.score=tf", "nightly.smf.count_on=all", "nightly.smf.top_t=256", "nightly.smf.optimizer=sgd",
         "nightly.smf.lr=100000.0", "nightly.max_retention_drop=0.05"]
HELDOUT = ["The quick brown fox jumps over the lazy dog. " * 20, "Rivers flow from mountains to the sea. " * 20]


def poison_facts() -> list[dict]:
    return [{"id": f"poison-{i}", "answers": [answer], "statement": text[:200], "paraphrases": [text[:300], text[:150]],
             "probe": f"Which word? {answer}\nAnswer:"} for i, (text, answer) in enumerate(zip(HELDOUT, ("fox", "sea")))]


def jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def facts(qa: list[dict], source: str) -> list[dict]:
    return [dataclasses.asdict(f) for f in fact_stream(qa, source, 3, seed=0)]


def fit(model, blocks: torch.Tensor, steps: int = 30) -> None:
    """A few Adam steps on the held-out text (a repetitive 64 tokens): its perplexity falls to a few."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=blocks, labels=blocks).loss.backward()
        opt.step()
    model.eval()


def make_world(root: Path, tokenizer, seed: int = 0) -> dict[str, Path]:
    """model/ (checkpoint), stats/ (its slot table), data/ (heldout text, triviaqa), drop/, params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = retrofit(small_llama(len(tokenizer), seed=seed), CFG)
    texts = HELDOUT
    blocks = tokenizer(" ".join(texts), return_tensors="pt").input_ids[:, :64].view(4, 16)
    fit(model, blocks)  # something to retain: a random model's perplexity cannot get worse
    save_checkpoint(model, tokenizer, root / "model", CFG)
    jsonl(root / "data/background/heldout.jsonl", [{"text": t} for t in texts])
    jsonl(root / "data/tasks/triviaqa.jsonl", [{"question": q["question"], "answers": q["answers"]} for q in QA])
    per_layer, per_pool = collect(model, [blocks[:2], blocks[2:]])
    (root / "stats").mkdir()
    save_table(from_collect(per_layer, per_pool, pool_groups(model), {"model_hash": model_hash(root / "model")}),
               root / "stats" / "table.safetensors")
    jsonl(root / "drop" / "batch1.jsonl", facts(QA[:2], "batch1"))
    (root / "params.yaml").write_text(PARAMS)
    return {k: root / k for k in ("model", "stats", "data", "drop")} | {"params": root / "params.yaml", "root": root}


@pytest.fixture(scope="module")
def world(tmp_path_factory, smol_tokenizer):
    return make_world(tmp_path_factory.mktemp("update"), smol_tokenizer)


def update_args(w, out, facts_path=None, deltas=None, *extra):
    args = ["--params", str(w["params"]), "--model", str(w["model"]), "--stats", str(w["stats"]),
            "--facts", str(facts_path or w["drop"]), "--out", str(out)]
    return args + (["--deltas", str(deltas)] if deltas else []) + list(extra)


def test_update_writes_a_cumulative_delta_that_stacks_on_the_served_one(world, tmp_path):
    assert update_component.main(update_args(world, tmp_path / "d1")) == 0
    d1 = load_delta(tmp_path / "d1")
    assert d1.meta["updates"] == 1 and len(d1.meta["update"]["facts"]) == 2
    second = jsonl(tmp_path / "b2.jsonl", facts(QA[2:], "batch2"))
    assert update_component.main(update_args(world, tmp_path / "d2", second, tmp_path / "d1")) == 0
    d2 = load_delta(tmp_path / "d2")
    base, _ = load_checkpoint(world["model"])
    assert d2.base_hash == d1.base_hash == state_hash(base)  # cumulative: both apply to the base checkpoint
    assert d2.meta["updates"] == 2 and [h["n_facts"] for h in d2.meta["history"]] == [2, 2]
    apply_delta(base, d2)  # verifies the result hash too
    assert state_hash(base) == d2.new_hash != d1.new_hash


def test_no_facts_means_nothing_written(world, tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    caplog.set_level("INFO")
    assert update_component.main(update_args(world, tmp_path / "out", tmp_path / "empty")) == 0
    assert not (tmp_path / "out").exists()
    assert "nothing to do" in caplog.text


def _cli_error(main, args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(main, args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_corrupt_inputs_are_refused_with_one_line(world, tmp_path, smol_tokenizer, capsys):
    import shutil

    # a truncated checkpoint
    bad = tmp_path / "truncated"
    shutil.copytree(world["model"], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    w = {**world, "model": bad}
    assert "sha256 does not match" in _cli_error(update_component.main, update_args(w, tmp_path / "o1"), capsys)
    # a slot table made for another model
    other = make_world(tmp_path / "other", smol_tokenizer, seed=3)
    w = {**world, "stats": other["stats"]}
    assert "slot table was made for model" in _cli_error(update_component.main, update_args(w, tmp_path / "o2"), capsys)
    # a malformed params file, and a value of the wrong type
    (tmp_path / "bad.yaml").write_text("nightly:\n  smf: {top_t: 8\n")
    w = {**world, "params": tmp_path / "bad.yaml"}
    assert "not valid YAML" in _cli_error(update_component.main, update_args(w, tmp_path / "o3"), capsys)
    err = _cli_error(update_component.main, update_args(world, tmp_path / "o4") + ["nightly.smf.top_t=many"], capsys)
    assert "nightly.smf.top_t" in err
    # a malformed facts file
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "x", "answers": ["a"]}\n')
    assert "missing field 'paraphrases'" in _cli_error(update_component.main, update_args(world, tmp_path / "o5", broken), capsys)
    # a served delta for another base model
    assert update_component.main(["--params", str(other["params"]), "--model", str(other["model"]), "--stats", str(other["stats"]),
                                  "--facts", str(world["drop"]), "--out", str(tmp_path / "other_delta")]) == 0
    err = _cli_error(update_component.main, update_args(world, tmp_path / "o6", None, tmp_path / "other_delta"), capsys)
    assert "does not apply" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


KILL_DURING_WRITE = textwrap.dedent("""
    import os, signal, sys
    import slotwise.continual.delta as delta
    real = delta.save_file
    def save_then_die(tensors, path, *a, **k):
        real(tensors, path, *a, **k)                       # the weights are in the staging folder ...
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)          # ... half written ...
        os.kill(os.getpid(), signal.SIGKILL)                # ... and the process dies before delta.json / the rename
    delta.save_file = save_then_die
    from slotwise.components import update
    update.main(sys.argv[1:])
""")


def test_killed_while_writing_leaves_the_previous_delta_intact(world, tmp_path):
    out = tmp_path / "candidate"
    assert update_component.main(update_args(world, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    served = tmp_path / "served"
    shutil.copytree(out, served)
    second = jsonl(tmp_path / "b2.jsonl", facts(QA[2:], "batch2"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, *update_args(world, out, second, served)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous output, whole
    load_delta(out)  # and still valid


@pytest.mark.slow
def test_killed_at_random_points_the_output_is_absent_or_complete(world, tmp_path):
    """SIGKILL `python -m slotwise.components.update` at random times: --out is never half written."""
    import random
    import time

    rng = random.Random(0)
    for i in range(4):
        out = tmp_path / f"out{i}"
        proc = subprocess.Popen([sys.executable, "-m", "slotwise.components.update", *update_args(world, out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(4.0, 14.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            load_delta(out)  # complete: the manifest parses and the weights match their sha256


# ---- gate ------------------------------------------------------------------------------------

def test_decide_uses_relative_drops_and_perplexity_rises():
    cur = {"heldout_ppl": 10.0, "known_em": 1.0, "hellaswag": 0.5, "new_facts_em": 0.0}
    ok, drops, reasons = gate_component.decide(cur, {"heldout_ppl": 10.4, "known_em": 0.96, "hellaswag": 0.5, "new_facts_em": 1.0}, 0.05)
    assert ok and reasons == [] and drops["heldout_ppl"] == pytest.approx(0.04) and "new_facts_em" not in drops
    ok, drops, reasons = gate_component.decide(cur, {"heldout_ppl": 10.6, "known_em": 1.0, "hellaswag": 0.4, "new_facts_em": 1.0}, 0.05)
    assert not ok and [r.split()[0] for r in reasons] == ["heldout_ppl", "hellaswag"]
    ok, drops, _ = gate_component.decide({"known_em": None, "heldout_ppl": 5.0}, {"known_em": None, "heldout_ppl": 5.0}, 0.0)
    assert ok and drops["known_em"] is None


def test_gate_passes_a_gentle_update_and_fails_a_destructive_one(world, tmp_path):
    assert update_component.main(update_args(world, tmp_path / "good")) == 0
    poison = jsonl(tmp_path / "poison.jsonl", poison_facts())
    assert update_component.main(update_args(world, tmp_path / "bad", poison, None, *BREAK)) == 0
    common = ["--params", str(world["params"]), "--model", str(world["model"]), "--data", str(world["data"]), "--facts", str(world["drop"])]
    assert gate_component.main(common + ["--candidate", str(tmp_path / "good"), "--out", str(tmp_path / "g1")]) == 0
    good = json.loads((tmp_path / "g1" / "gate.json").read_text())
    assert good["passed"] and set(good["current"]) == {"heldout_ppl", "known_em", "new_facts_em"}
    assert gate_component.main(common + ["--candidate", str(tmp_path / "bad"), "--out", str(tmp_path / "g2")] + BREAK) == 0
    bad = json.loads((tmp_path / "g2" / "gate.json").read_text())
    assert not bad["passed"] and bad["reasons"][0].startswith("heldout_ppl dropped")
    assert bad["current"]["heldout_ppl"] == pytest.approx(good["current"]["heldout_ppl"])  # same served model, same probes


def test_decide_fails_a_candidate_whose_metric_is_not_finite():
    ok, _, reasons = gate_component.decide({"heldout_ppl": 5.0}, {"heldout_ppl": float("nan")}, 0.05)
    assert not ok and "not measurable" in reasons[0]
