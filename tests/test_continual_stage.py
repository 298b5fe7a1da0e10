"""The continual stage end to end on a tiny retrofitted model with the real SmolLM2 tokenizer."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLE_QA, SMALL_MEMORY_CFG, small_llama
from slotwise.checkpoint import load_checkpoint, model_hash, save_checkpoint
from slotwise.components import continual as continual_component
from slotwise.continual.delta import apply_delta, load_delta, revert_delta
from slotwise.continual.experiment import answer_span_example, fact_batch
from slotwise.facts import fact_stream
from slotwise.retrofit import retrofit
from slotwise.slot_stats import collect, pool_groups
from slotwise.slot_table import from_collect, save_table

QA, CFG = SAMPLE_QA, SMALL_MEMORY_CFG


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("continual")
    torch.manual_seed(0)
    model = retrofit(small_llama(len(smol_tokenizer)), CFG)
    save_checkpoint(model, smol_tokenizer, root / "model", CFG)
    data = root / "data"
    _jsonl(data / "facts.jsonl", [{**dataclasses.asdict(f), "known": False} for f in fact_stream(QA, "test", 3, seed=0)])
    _jsonl(data / "tasks/triviaqa.jsonl", [{"question": "What colour is the sky on a clear day", "answers": ["blue"]}])
    texts = ["The quick brown fox jumps over the lazy dog. " * 20, "Rivers flow from mountains to the sea. " * 20]
    _jsonl(data / "background/heldout.jsonl", [{"text": t} for t in texts])
    blocks = smol_tokenizer(" ".join(texts), return_tensors="pt").input_ids[:, :64].view(4, 16)
    per_layer, per_pool = collect(model, [blocks[:2], blocks[2:]])
    table = from_collect(per_layer, per_pool, pool_groups(model), {"model_hash": model_hash(root / "model")})
    (root / "stats").mkdir()
    save_table(table, root / "stats" / "table.safetensors")
    params = root / "params.yaml"
    params.write_text("""
continual:
  n_facts: 3
  steps_per_fact: 2
  eval_every: 2
  known_screen: 1
  ppl_blocks: 2
  ppl_seq_len: 32
  final_tasks: []
  batch_size: 4
  methods:
    - {name: smf_tfidf, method: smf, params: {score: tfidf, top_t: 8, optimizer: adam, lr: 0.01}}
    - {name: smf_kl, method: smf, params: {score: kl, top_t: 8, optimizer: sgd, lr: 1.0}}
    - {name: full_ft, method: full, params: {lr: 0.0001}}
    - {name: lora, method: lora, params: {r: 4, lr: 0.001}}
    - {name: grit, method: grit, params: {r: 4, lr: 0.001}}
""")
    return root, params


def test_answer_span_labels_cover_exactly_the_answer(smol_tokenizer):
    ids, labels = answer_span_example("Q: Which planet is red? A: Mars and more", "Mars", smol_tokenizer, 64)
    target = [t for t, y in zip(ids, labels) if y != -100]
    assert smol_tokenizer.decode(target).strip() == "Mars"
    assert answer_span_example("no answer here", "Mars", smol_tokenizer, 64) is None


@pytest.mark.parametrize("probe,answer,tokens", [
    ("William Shakespeare was born in", "Stratford-upon-Avon", [" Strat", "ford", "-", "upon", "-", "Av", "on"]),
    ("William Shakespeare was born in the year", "1564", [" ", "1", "5", "6", "4"]),
])
def test_trained_answer_tokens_are_the_tokens_the_probe_continues_with(smol_tokenizer, probe, answer, tokens):
    """The loss sits on the tokens a greedy answer to the probe must produce (leading space included),
    not on the answer tokenized on its own (`St|rat|ford|...` for Stratford-upon-Avon)."""
    tok = smol_tokenizer
    ids, labels = answer_span_example(f"{probe} {answer}. He wrote plays.", answer, tok, 64)
    trained = [t for t, y in zip(ids, labels) if y != -100]
    prompt = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(f"{probe} {answer}", add_special_tokens=False)["input_ids"]
    assert full[: len(prompt)] == prompt
    assert trained == full[len(prompt):]  # what the model emits after the probe
    assert [tok.decode([t]) for t in trained] == tokens
    assert trained != tok(answer, add_special_tokens=False)["input_ids"]
    # the sequence is the text tokenized once: the labels are the ids at the answer's positions
    assert ids == tok(f"{probe} {answer}. He wrote plays.", add_special_tokens=False)["input_ids"]


def test_subject_mask_marks_every_mention_of_the_subject(smol_tokenizer):
    tok = smol_tokenizer
    text = "Rune Haskenko was born in Valparaiso, and Rune Haskenko still lives there."
    ids, labels, subject = answer_span_example(text, "Valparaiso", tok, 64, subject="Rune Haskenko")
    marked = [t for t, m in zip(ids, subject) if m]
    one = tok(" Rune Haskenko", add_special_tokens=False)["input_ids"]
    first = tok("Rune Haskenko", add_special_tokens=False)["input_ids"]
    assert marked == first + one  # both mentions, whole names, nothing else
    assert not any(m and y != -100 for m, y in zip(subject, labels))  # never the answer's tokens
    assert answer_span_example(text, "Valparaiso", tok, 64) == (ids, labels)  # no subject: the (ids, labels) pair


def test_fact_batch_carries_the_subject_mask_only_for_facts_with_a_subject(smol_tokenizer):
    fact = {"id": "f1", "answers": ["Valparaiso"], "statement": "Rune Haskenko was born in Valparaiso.",
            "paraphrases": ["Valparaiso is where Rune Haskenko was born.", "The birthplace of Rune Haskenko is Valparaiso."]}
    assert "subject_mask" not in fact_batch(fact, smol_tokenizer, True, 64)
    batch = fact_batch({**fact, "extra": {"subject": "Rune Haskenko"}}, smol_tokenizer, True, 64)
    mask = batch["subject_mask"]
    assert mask.shape == batch["input_ids"].shape and mask.dtype == torch.bool
    assert not (mask & ~batch["attention_mask"].bool()).any()  # never on padding
    for row, ids in zip(mask, batch["input_ids"]):
        assert smol_tokenizer.decode(ids[row]).replace(" ", "") == "RuneHaskenko"


def test_an_answer_at_the_start_of_a_paraphrase_has_no_space_to_carry(smol_tokenizer):
    ids, labels = answer_span_example("Stratford-upon-Avon is where William Shakespeare was born.", "Stratford-upon-Avon",
                                      smol_tokenizer, 64)
    trained = [t for t, y in zip(ids, labels) if y != -100]
    assert [smol_tokenizer.decode([t]) for t in trained] == ["St", "rat", "ford", "-", "upon", "-", "Av", "on"]


def test_fact_batch_has_one_row_per_paraphrase(smol_tokenizer):
    fact = dataclasses.asdict(fact_stream(QA[:1], "t", 3, seed=0)[0])
    batch = fact_batch(fact, smol_tokenizer, include_statement=True, max_len=64)
    assert batch["input_ids"].shape[0] == 4  # statement + 3 paraphrases
    assert ((batch["labels"] != -100).sum(1) > 0).all()


def test_all_methods_run_on_one_stream_and_smf_saves_a_revertible_delta(setup):
    root, params = setup
    out = root / "out"
    args = ["--params", str(params), "--model", str(root / "model"), "--data", str(root / "data"),
            "--stats", str(root / "stats"), "--out", str(out)]
    assert continual_component.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"smf_tfidf", "smf_kl", "full_ft", "lora", "grit"}
    assert all(set(m) == {"learned", "known_drop", "heldout_ppl_rise"} for m in metrics.values())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == set(metrics) and summary["start"]["known_screened"] == 1
    assert all(summary["runs"][n]["learned"] == m["learned"] for n, m in metrics.items())
    curves = json.loads((out / "curves.json").read_text())["methods"]
    assert [pt["facts_seen"] for pt in curves["full_ft"]["curve"]] == [0, 2, 3]
    assert (out / "plots" / "frontier.png").stat().st_size > 0 and (out / "plots" / "curves.png").stat().st_size > 0
    # LoRA and GRIT updates are peft adapters (save_pretrained), on the --model checkpoint
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["grit", "lora"]
    for name in ("grit", "lora"):
        config = json.loads((out / "adapters" / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(root / "model") and (out / "adapters" / name / "adapter_model.safetensors").is_file()
    # The SMF delta touches at most top_t rows per step and applies / reverts exactly on the start model.
    delta = load_delta(out / "deltas" / "smf_tfidf")
    (n_rows,) = delta.n_rows.values()
    assert 0 < n_rows <= 8 * 2 * 3
    model, _ = load_checkpoint(root / "model")
    base, _ = load_checkpoint(root / "model")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_delta(model, delta)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith("values.weight") for k in changed)
    revert_delta(model, delta, base=base)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    full = load_file(root / "model" / "model.safetensors")
    assert delta.nbytes < 0.5 * sum(t.numel() * t.element_size() for t in full.values())
    # One fact's update: at most steps x top_t rows of the one pool (row id + a 64-wide fp32 row each).
    per_fact = metrics_of(out)["smf_tfidf"]
    assert 0 < per_fact["rows_mean"] <= 2 * 8 and per_fact["bytes_max"] <= 2 * 8 * (8 + 64 * 4)
    assert per_fact["fraction_max"] == per_fact["bytes_max"] / per_fact["checkpoint_bytes"]
    assert not (out.parent / f".{out.name}.parts").exists()  # removed once the stage published


def metrics_of(out: Path) -> dict:
    curves = json.loads((out / "curves.json").read_text())["methods"]
    return {name: r["delta_per_fact"] for name, r in curves.items() if "delta_per_fact" in r}


def test_a_killed_run_resumes_at_the_first_unfinished_method(setup, tmp_path, monkeypatch):
    root, params = setup
    text = params.read_text()
    two = text[: text.index("    - {name: smf_kl")] + "    - {name: full_ft, method: full, params: {lr: 0.0001}}\n"
    (tmp_path / "p.yaml").write_text(two)
    out = tmp_path / "out"
    args = ["--params", str(tmp_path / "p.yaml"), "--model", str(root / "model"), "--data", str(root / "data"),
            "--stats", str(root / "stats"), "--out", str(out), "--live"]
    calls = []
    real = continual_component.run_method

    def dies_on_full_ft(run, *a, **k):
        calls.append(run.name)
        if run.name == "full_ft" and len(calls) == 2:
            raise KeyboardInterrupt  # the first attempt is "killed" in its second method
        return real(run, *a, **k)

    monkeypatch.setattr(continual_component, "run_method", dies_on_full_ft)
    with pytest.raises(KeyboardInterrupt):
        continual_component.main(args)
    assert not out.exists() and (tmp_path / ".out.parts" / "smf_tfidf" / "result.json").is_file()
    assert continual_component.main(args) == 0
    assert calls == ["smf_tfidf", "full_ft", "full_ft"]  # smf_tfidf was not run again
    curves = json.loads((out / "curves.json").read_text())["methods"]
    assert set(curves) == {"smf_tfidf", "full_ft"} and (out / "deltas" / "smf_tfidf" / "delta.json").is_file()
    # dvclive's curves (--live) hold the reused method's points too, replayed from its kept result
    for run in ("smf_tfidf", "full_ft"):
        rows = (out / "live" / "plots" / "metrics" / run / "heldout_ppl.tsv").read_text().splitlines()
        assert rows[0] == "step\theldout_ppl"
        assert [(int(r.split("\t")[0]), float(r.split("\t")[1])) for r in rows[1:]] == \
            [(pt["facts_seen"], pt["heldout_ppl"]) for pt in curves[run]["curve"]]
    # a changed method is not reused
    (tmp_path / "p.yaml").write_text(two.replace("lr: 0.01}", "lr: 0.02}"))
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        continual_component.main(args)
    assert calls == ["smf_tfidf", "full_ft"]


def test_a_table_from_another_model_is_refused(setup, tmp_path, smol_tokenizer):
    root, params = setup
    other = retrofit(small_llama(len(smol_tokenizer), seed=5), CFG)
    save_checkpoint(other, smol_tokenizer, tmp_path / "other", CFG)
    with pytest.raises(Exception, match="slot table was made for model"):
        continual_component.main(["--params", str(params), "--model", str(tmp_path / "other"), "--data", str(root / "data"),
                                  "--stats", str(root / "stats"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_sweeps_until_loss_and_matched_frontier(setup, tmp_path):
    """A swept method runs once per value; until_loss stops a fact's steps early; frontier.json compares groups."""
    root, params = setup
    text = params.read_text()
    head = text[: text.index("  methods:")]
    (tmp_path / "p.yaml").write_text(head.replace("steps_per_fact: 2", "steps_per_fact: 6") + """  methods:
    - {name: full_ft, method: full, params: {lr: 0.0001}, until_loss: 1.0e+9}
    - {name: smf, method: smf, params: {score: tf, top_t: 8, optimizer: sgd, lr: 1.0}, sweep: {lr: [0.5, 2.0]}, steps_per_fact: 3}
""")
    out = tmp_path / "out"
    assert continual_component.main(["--params", str(tmp_path / "p.yaml"), "--model", str(root / "model"),
                                      "--data", str(root / "data"), "--stats", str(root / "stats"), "--out", str(out)]) == 0
    metrics = json.loads((out / "summary.json").read_text())["runs"]
    assert set(metrics) == {"full_ft", "smf@lr=0.5", "smf@lr=2"}
    assert metrics["full_ft"]["steps_per_fact_mean"] == 1.0  # any loss is below 1e9: one step per fact
    assert metrics["smf@lr=0.5"]["steps_per_fact_mean"] == 3.0  # the run's own budget, not the stage's 6
    assert metrics["smf@lr=2"]["group"] == "smf" and metrics["full_ft"]["group"] == "full_ft"
    frontier = json.loads((out / "frontier.json").read_text())
    assert set(frontier) == {"full_ft", "smf"}
    curves = json.loads((out / "curves.json").read_text())["methods"]
    assert curves["smf@lr=2"]["params"]["lr"] == 2.0


def test_unknown_method_param_is_a_config_error(setup, tmp_path):
    from slotwise.config import ConfigError, load_params

    root, params = setup
    with pytest.raises(ConfigError, match=r"continual.methods\[0\].*unknown key"):
        load_params(params, ["continual.methods=[{name: x, method: smf, params: {topt: 3}}]"])
    with pytest.raises(ConfigError, match=r"continual.methods\[x\].sweep.lrr': not a full param"):  # a swept key too
        load_params(params, ["continual.methods=[{name: x, method: full, sweep: {lrr: [0.1]}}]"])


def test_a_retention_file_replaces_the_triviaqa_screen(setup, tmp_path):
    """data/retention.jsonl (the testbed's old population) is the known-fact probe when present."""
    import shutil

    from slotwise.generation import greedy_answers

    root, params = setup
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    model, tok = load_checkpoint(root / "model")
    probes = ["Zora Ruskocke was born in the city of", "The company Ivo Thalwick works for is", "Nobody answers this"]
    said = greedy_answers(model, tok, probes[:1])[0]
    assert said  # the tiny model says something; that becomes the "right" answer of the first item
    _jsonl(data / "retention.jsonl", [{"id": "a", "probe": probes[0], "answers": [said]},
                                      {"id": "b", "probe": probes[1], "answers": ["certainly not this"]},
                                      {"id": "c", "probe": probes[2], "answers": ["nor this"]}])
    one = params.read_text()
    one = one[: one.index("  methods:")] + "  known_screen: 2\n  methods:\n    - {name: full_ft, method: full, params: {lr: 0.0001}}\n"
    (tmp_path / "p.yaml").write_text(one.replace("  known_screen: 1\n", ""))
    out = tmp_path / "out"
    assert continual_component.main(["--params", str(tmp_path / "p.yaml"), "--model", str(root / "model"), "--data", str(data),
                                      "--stats", str(root / "stats"), "--out", str(out)]) == 0
    start = json.loads((out / "curves.json").read_text())["start"]
    assert start["known_screened"] == 2 and start["known_found"] == 1 and start["known_em"] == 1.0
