"""The evaluate stage: lm-eval tasks from local YAML on in-memory models, SQuAD EM/F1, perplexity,
memory on/off, fact acquisition, and the CLI. A 2-layer, 32-wide Llama with SmolLM2's real
tokenizer (read from the embedded GGUF once per module) keeps it fast and offline."""
from __future__ import annotations

import importlib.util
import json
import math
import socket
from pathlib import Path

import pytest
import torch
from conftest import small_llama

from slotwise.checkpoint import save_checkpoint
from slotwise.components._cli import run_cli
from slotwise.evaluation.facts import fact_acquisition, score_answers
from slotwise.evaluation.memory_switch import memory_disabled, memory_mode
from slotwise.evaluation.params import EvaluateParams
from slotwise.evaluation.perplexity import heldout_perplexity
from slotwise.evaluation.tasks import TASKS_DIR, evaluate_tasks, lm_eval_names, run_tasks
from slotwise.generation import greedy_answers
from slotwise.memory import MemoryConfig
from slotwise.qa_metrics import exact_match, f1 as f1_score, normalize_answer
from slotwise.retrofit import RetrofitConfig, retrofit
from slotwise.schema import TASKS

from slotwise.components import evaluate as component

MEMORY = MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16, out_init_std=0.05)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer):
    return smol_tokenizer


small_lm = small_llama


def small_retrofit(vocab_size: int, mode: str = "additive"):
    model = small_lm(vocab_size)
    torch.manual_seed(1)
    return retrofit(model, RetrofitConfig(layers=[1], mode=mode, alpha=1.0, memory=MEMORY)).eval()


FIXTURES = {
    "nq_open": [
        {"question": "who wrote hamlet", "answers": ["William Shakespeare", "Shakespeare"]},
        {"question": "what is the capital of france", "answers": ["Paris"]},
        {"question": "how many legs does a spider have", "answers": ["eight", "8"]},
    ],
    "triviaqa": [
        {"question": "Which planet is known as the Red Planet?", "answers": ["Mars", "The Red Planet"]},
        {"question": "What is the chemical symbol for gold?", "answers": ["Au"]},
        {"question": "Who painted the Mona Lisa?", "answers": ["Leonardo da Vinci", "Leonardo"]},
    ],
    "hellaswag": [
        {"ctx": "A man is sitting on a roof. He", "activity_label": "Roof shingle removal",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3},
        {"ctx": "[header] How to make tea [title] Boil water.", "activity_label": "Food and Entertaining",
         "endings": ["[step] Pour it over the leaves.", "Eat the kettle.", "Paint the cup.", "Sing loudly."], "label": 0},
        {"ctx": "A woman walks into a kitchen. She", "activity_label": "Cooking",
         "endings": ["opens the fridge.", "flies away.", "becomes a chair.", "sleeps on the ceiling."], "label": 0},
    ],
    "arc_easy": [
        {"question": "Which of these is a mammal?", "choices": ["shark", "dog", "trout"], "label": 1},
        {"question": "What do plants need to make food?", "choices": ["sunlight", "sand", "plastic", "noise"], "label": 0},
        {"question": "Water freezes at what temperature in Celsius?", "choices": ["100", "50", "0", "-40"], "label": 2},
    ],
    "arc_challenge": [
        {"question": "Which is a gas at room temperature?", "choices": ["ice", "steam", "rock", "wood"], "label": 1},
        {"question": "Which force keeps planets in orbit?", "choices": ["friction", "magnetism", "gravity"], "label": 2},
        {"question": "Which organ pumps blood?", "choices": ["lung", "heart", "liver", "skin"], "label": 1},
    ],
    "piqa": [
        {"goal": "To open a jar", "choices": ["twist the lid", "hit it with a fish"], "label": 0},
        {"goal": "To dry wet hair", "choices": ["use a towel", "use a spoon"], "label": 0},
        {"goal": "To keep bread fresh", "choices": ["leave it in the rain", "store it in a bag"], "label": 1},
    ],
    "lambada": [
        {"context": "He opened the door and saw his", "continuation": "dog"},
        {"context": "She poured the tea into the", "continuation": "cup"},
        {"context": "The children played in the snow until it was time to go", "continuation": "home"},
    ],
    "gsm8k": [
        {"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
        {"question": "Tom has 3 apples and eats one. How many are left?", "answer": "3 - 1 = <<3-1=2>>2\n#### 2"},
        {"question": "A box holds 5 pens. How many pens are in 2 boxes?", "answer": "5 * 2 = <<5*2=10>>10\n#### 10"},
    ],
}

HELDOUT = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the forest.",
    "Paris is the capital and most populous city of France, on the river Seine.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Great Wall of China is a series of fortifications built across northern China.",
]

FACTS = [
    {"id": "f1", "source": "triviaqa", "question": "Which planet is known as the Red Planet?", "answers": ["Mars"],
     "statement": "Mars is known as the Red Planet.", "paraphrases": ["The Red Planet is Mars."],
     "probe": "Question: Which planet is known as the Red Planet?\nAnswer:", "known": True},
    {"id": "f2", "source": "nq_open", "question": "who wrote hamlet", "answers": ["William Shakespeare"],
     "statement": "Hamlet was written by William Shakespeare.", "paraphrases": [],
     "probe": "Question: who wrote hamlet\nAnswer:", "known": False},
    {"id": "f3", "source": "nq_open", "question": "what is the capital of france", "answers": ["Paris"],
     "statement": "The capital of France is Paris.", "paraphrases": [],
     "probe": "Question: what is the capital of france\nAnswer:", "known": None},
    {"id": "f4", "source": "triviaqa", "question": "What is the chemical symbol for gold?", "answers": ["Au"],
     "statement": "The chemical symbol for gold is Au.", "paraphrases": [],
     "probe": "Question: What is the chemical symbol for gold?\nAnswer:", "known": False},
]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for task, rows in FIXTURES.items():
        _write_jsonl(root / "tasks" / f"{task}.jsonl", rows)
    _write_jsonl(root / "background" / "heldout.jsonl", [{"text": t} for t in HELDOUT])
    _write_jsonl(root / "facts.jsonl", FACTS)
    return root


@pytest.fixture(scope="module")
def task_scores(tokenizer, data_dir):
    """Every task through lm_eval.simple_evaluate on the retrofitted model, with sockets forbidden."""
    model = small_retrofit(len(tokenizer))

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        return evaluate_tasks(model, tokenizer, list(TASKS), data_dir / "tasks", limits={"piqa": 2}, batch_size=2,
                              max_gen_toks={"nq_open": 4, "triviaqa": 4, "gsm8k": 8}, bootstrap_iters=100,
                              log_samples=True)


# ---------------------------------------------------------------- SQuAD-style EM / F1 (values computed by hand)


@pytest.mark.parametrize("prediction,answers,em,f1", [
    ("The Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),           # case, article, punctuation dropped
    ("Paris, France", ["Paris"], 0.0, 2 / 3),                      # P = 1/2, R = 1
    ("the cat sat", ["a cat sat on the mat"], 0.0, 2 / 3),        # [cat sat] vs [cat sat on mat]: P = 1, R = 1/2
    ("New York City", ["NYC", "New York"], 0.0, 0.8),             # best answer: P = 2/3, R = 1
    ("nyc", ["New York", "NYC"], 1.0, 1.0),                       # any accepted answer counts
    ("the the cat", ["cat cat"], 0.0, 2 / 3),                     # [cat] vs [cat cat]: overlap counted once
    ("", ["Mars"], 0.0, 0.0),
    ("blue whale", ["elephant"], 0.0, 0.0),
])
def test_squad_exact_match_and_f1(prediction, answers, em, f1):
    assert exact_match(prediction, answers) == em
    assert f1_score(prediction, answers) == pytest.approx(f1)


def test_normalize_answer():
    assert normalize_answer("  An Apple, a day  keeps THE doctor away. ") == "apple day keeps doctor away"


# ---------------------------------------------------------------- lm-eval tasks


@pytest.mark.parametrize("task", TASKS)
def test_task_runs_end_to_end_through_lm_eval(task_scores, task):
    scores = task_scores.scores[task]
    expected_n = 2 if task == "piqa" else len(FIXTURES[task])  # per-task limit honoured
    assert scores["n"] == expected_n
    bounded = {"nq_open": ("exact_match", "f1"), "triviaqa": ("exact_match", "f1"), "lambada": ("acc",),
               "hellaswag": ("acc", "acc_norm"), "arc_easy": ("acc", "acc_norm"), "arc_challenge": ("acc", "acc_norm"),
               "piqa": ("acc", "acc_norm"), "gsm8k": ("exact_match_strict_match", "exact_match_flexible_extract")}[task]
    for metric in bounded:
        assert 0.0 <= scores[metric] <= 1.0, (metric, scores)
        assert scores[f"{metric}_stderr"] >= 0.0, (metric, scores)  # standard errors kept
    if task == "lambada":
        assert math.isfinite(scores["perplexity"]) and scores["perplexity"] > 1.0
    if task == "gsm8k":
        assert 0.0 < scores["nll_per_char"] < scores["nll"]
    for name in lm_eval_names(task):  # lm-eval's own results JSON and per-document records
        assert name.startswith("slotwise_") and name in task_scores.results["results"]
        assert sorted({r["doc_id"] for r in task_scores.samples[name]}) == list(range(expected_n))
        assert task_scores.results["limits"][name] == (2 if task == "piqa" else None)


def test_standard_error_is_lm_evals_closed_form(task_scores):
    """For a mean of 0/1 scores lm-eval's stderr is the sample std / sqrt(n) = sqrt(p (1 - p) / (n - 1))."""
    for task in ("arc_easy", "hellaswag", "piqa"):
        s = task_scores.scores[task]
        p, n = s["acc"], s["n"]
        assert s["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))


def test_gsm8k_exact_match_uses_the_standard_answer_extraction(task_scores):
    """Each generation is cut at "Question:" and reduced to the number after "#### " (strict) or the last
    number (flexible), then compared with the reference's number; recomputed here from lm-eval's records."""
    import re

    by_filter = {f: [r for r in task_scores.samples["slotwise_gsm8k"] if r["filter"] == f]  # one record per filter
                 for f in ("strict-match", "flexible-extract")}
    assert [r["doc"]["question"] for r in by_filter["strict-match"]] == [d["question"] for d in FIXTURES["gsm8k"]]
    strict, flexible = [], []
    for r, rf in zip(by_filter["strict-match"], by_filter["flexible-extract"]):
        text = r["resps"][0][0]
        assert "Question:" not in text and r["arguments"][0][0].count("Question:") == 6  # five worked examples + the question
        gold = r["doc"]["answer"].split("#### ")[-1]
        m = re.search(r"#### (\-?[0-9\.\,]+)", text)
        want_strict = m.group(1) if m else "[invalid]"
        nums = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
        want_flexible = next(g for g in nums[-1] if g) if nums else "[invalid]"
        assert (r["filtered_resps"][0], rf["filtered_resps"][0]) == (want_strict, want_flexible)
        strict.append(float(want_strict.replace(",", "").rstrip(".") == gold))
        flexible.append(float(want_flexible.replace(",", "").replace("$", "").rstrip(".") == gold))
    s = task_scores.scores["gsm8k"]
    assert s["exact_match_strict_match"] == sum(strict) / len(strict)
    assert s["exact_match_flexible_extract"] == sum(flexible) / len(flexible)


def test_plain_model_runs_through_lm_eval(tokenizer, data_dir):
    scores = run_tasks(small_lm(len(tokenizer)), tokenizer, ["nq_open", "arc_easy"], data_dir / "tasks", batch_size=3)
    assert scores["nq_open"]["n"] == 3 and 0.0 <= scores["arc_easy"]["acc_norm"] <= 1.0
    assert "acc_stderr" not in scores["arc_easy"]  # run_tasks: scores only


def load_task_yaml(path: Path) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=Loader)


def test_task_yamls_are_complete_and_namespaced():
    """Ready for `lm_eval --include_path`: no placeholders, every name slotwise_*, one per scored task,
    generation budgets equal to the evaluate stage's defaults (so the CLI gives the stage's numbers)."""
    files = sorted(TASKS_DIR.glob("*.yaml"))
    cfgs = {load_task_yaml(f)["task"]: load_task_yaml(f) for f in files}
    assert sorted(cfgs) == sorted(n for t in TASKS for n in lm_eval_names(t))
    defaults = EvaluateParams()
    for name, cfg in cfgs.items():
        text = (TASKS_DIR / f"{name}.yaml").read_text()
        assert "__" not in text and name.startswith("slotwise_") and cfg["tag"] == ["slotwise"]
        assert cfg["custom_dataset"] == "!function utils.local_jsonl" and cfg["metadata"]["data_dir"] == "runs/data/tasks"
        if cfg["output_type"] == "generate_until":
            budget = defaults.gsm8k_max_new_tokens if name == "slotwise_gsm8k" else defaults.max_new_tokens
            assert cfg["generation_kwargs"]["max_gen_toks"] == budget


def test_task_names_do_not_shadow_lm_evals_own_tasks():
    """An include path adds tasks; a name lm-eval already has would silently replace its own."""
    import re

    import lm_eval.tasks

    builtin = set()
    for f in Path(lm_eval.tasks.__file__).parent.rglob("*.yaml"):
        builtin |= set(re.findall(r"^task: *['\"]?([\w.-]+)", f.read_text(errors="replace"), flags=re.M))
    assert {"arc_easy", "gsm8k", "hellaswag", "lambada_openai", "nq_open", "triviaqa", "piqa"} <= builtin
    ours = {load_task_yaml(f)["task"] for f in TASKS_DIR.glob("*.yaml")}
    assert ours and not ours & builtin


def test_hellaswag_preprocessing_matches_lm_eval():
    import datasets
    from lm_eval.tasks.hellaswag import utils as reference

    spec = importlib.util.spec_from_file_location("sw_task_utils", TASKS_DIR / "utils.py")
    ours = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ours)
    doc = {"ctx_a": "[header] How to make tea [title] Boil water.", "ctx_b": "then", "activity_label": "Food",
           "endings": ["[step] Pour it  over the leaves.", "Eat the kettle."], "label": "0"}
    ref = reference.process_docs(datasets.Dataset.from_list([doc]))[0]
    got = ours.hellaswag_docs(datasets.Dataset.from_list([doc]))[0]
    assert (got["query"], got["options"], got["gold"]) == (ref["query"], ref["choices"], ref["gold"])
    joined = dict(FIXTURES["hellaswag"][1], activity_label="Food", ctx="[header] How to make tea [title] Boil water. Then")
    got = ours.hellaswag_docs(datasets.Dataset.from_list([joined]))[0]
    assert got["query"] == ref["query"] and got["options"] == [reference.preprocess(e) for e in joined["endings"]]


# ---------------------------------------------------------------- perplexity and memory on / off


def test_perplexity_is_exp_of_mean_nll(tokenizer):
    model = small_lm(len(tokenizer))
    seq_len, max_blocks = 16, 3
    ids = []
    for text in HELDOUT:
        ids += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    blocks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(max_blocks)]
    nlls = []
    with torch.no_grad():
        for block in blocks:  # one block at a time, log-softmax by hand
            x = torch.tensor([block])
            logp = torch.log_softmax(model(x).logits[0].double(), dim=-1)
            nlls += [-logp[t, block[t + 1]].item() for t in range(seq_len - 1)]
    expected = math.exp(sum(nlls) / len(nlls))
    got = heldout_perplexity(model, tokenizer, HELDOUT, seq_len=seq_len, max_blocks=max_blocks, batch_size=2)
    assert got["blocks"] == max_blocks and got["tokens"] == max_blocks * (seq_len - 1)
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert len(ids) // seq_len > max_blocks  # the cap, not the text, limited it


def test_memory_disabled_gives_base_logits_and_restores(tokenizer):
    x = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = small_lm(len(tokenizer))(x).logits
        model = small_retrofit(len(tokenizer))
        on = model(x).logits
        assert (on - base).abs().max() > 1e-4  # the memory contributes
        with memory_disabled(model):
            off = model(x).logits
        again = model(x).logits
    assert torch.allclose(off, base, atol=1e-6, rtol=0)
    assert torch.equal(again, on)
    assert memory_mode(model) == "additive" and memory_mode(small_lm(len(tokenizer))) is None
    replace = small_retrofit(len(tokenizer), mode="replace")
    assert memory_mode(replace) == "replace"
    with pytest.raises(ValueError, match="replace"):
        with memory_disabled(replace):
            pass


def test_perplexity_memory_off_is_null_for_replace_mode(tokenizer, data_dir):
    p = component.EvaluateParams()
    p.perplexity.seq_len, p.perplexity.max_blocks = 16, 2
    replace = component.perplexity_metrics(small_retrofit(len(tokenizer), mode="replace"), tokenizer, p, data_dir)
    assert replace["heldout"] > 1 and replace["heldout_memory_off"] is None and replace["nll_memory_off"] is None
    plain = component.perplexity_metrics(small_lm(len(tokenizer)), tokenizer, p, data_dir)
    assert plain["heldout_memory_off"] is None and plain["blocks"] == 2


# ---------------------------------------------------------------- fact acquisition


def test_fact_scores_split_by_known():
    predictions = ["Mars", "Shakespeare", "paris", "Ag"]
    summary, rows = score_answers(FACTS, predictions)
    # f1: Mars 1 (known); [shakespeare] vs [william shakespeare] = 2/3, Ag 0 (unknown); paris 1 (unlabelled)
    assert summary["n"] == 4 and summary["exact_match"] == pytest.approx(2 / 4)
    assert summary["f1"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert summary["known"] == {"exact_match": 1.0, "f1": 1.0, "n": 1}
    assert summary["unknown"] == {"exact_match": 0.0, "f1": pytest.approx(1 / 3), "n": 2}
    assert summary["unlabelled"] == {"exact_match": 1.0, "f1": 1.0, "n": 1}
    assert [r["id"] for r in rows] == ["f1", "f2", "f3", "f4"]
    empty, _ = score_answers(FACTS[:1], ["Mars"])
    assert empty["unknown"] == {"exact_match": None, "f1": None, "n": 0}


def test_fact_acquisition_batched_left_padding_matches_one_by_one(tokenizer):
    model = small_retrofit(len(tokenizer))
    summary, rows = fact_acquisition(model, tokenizer, FACTS, max_new_tokens=4, batch_size=4)
    single = greedy_answers(model, tokenizer, [f["probe"] for f in FACTS], max_new_tokens=4, batch_size=1)
    assert [r["prediction"] for r in rows] == single
    assert summary["n"] == 4 and [summary[k]["n"] for k in ("known", "unknown", "unlabelled")] == [1, 2, 1]
    assert all("\n" not in p for p in single)


# ---------------------------------------------------------------- the CLI


def _params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(
        "evaluate:\n  limit: 2\n  limits: {gsm8k: 1}\n  batch_size: 2\n  max_new_tokens: 3\n  gsm8k_max_new_tokens: 4\n  device: cpu\n"
        "  perplexity: {seq_len: 16, max_blocks: 2, batch_size: 2}\n  facts: {limit: 3, max_new_tokens: 3}\n")
    return path


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        run_cli(component.main, [str(a) for a in argv])
    return info.value.code, capsys.readouterr().err


def test_cli_writes_metrics_plots_and_params(tmp_path, tokenizer, data_dir, capsys):
    ckpt = save_checkpoint(small_retrofit(len(tokenizer)), tokenizer, tmp_path / "ckpt",
                           RetrofitConfig(layers=[1], memory=MEMORY))
    out = tmp_path / "runs" / "evaluate"
    code, err = _cli(capsys, "--params", _params(tmp_path), "--model", ckpt, "--data", data_dir, "--out", out,
                     "evaluate.tasks=[triviaqa,arc_easy,gsm8k]")
    assert code == 0, err
    metrics = json.loads((out / "results.json").read_text())
    assert set(metrics) == {"triviaqa", "arc_easy", "gsm8k", "perplexity", "facts"}
    # metrics.json (what `dvc metrics show` lists): one headline number per task, perplexity on/off, fact EM
    headline = json.loads((out / "metrics.json").read_text())
    assert headline == {"triviaqa": {"exact_match": metrics["triviaqa"]["exact_match"]},
                        "arc_easy": {"acc_norm": metrics["arc_easy"]["acc_norm"]},
                        "gsm8k": {"nll_per_char": metrics["gsm8k"]["nll_per_char"]},
                        "heldout_ppl": {"memory_on": metrics["perplexity"]["heldout"],
                                        "memory_off": metrics["perplexity"]["heldout_memory_off"]},
                        "facts": {"exact_match": metrics["facts"]["exact_match"]}}
    assert metrics["arc_easy"]["n"] == 2 and metrics["gsm8k"]["n"] == 1
    assert {"acc_stderr", "nll", "exact_match_strict_match", "exact_match_flexible_extract"} <= set(metrics["arc_easy"]) | set(metrics["gsm8k"])
    results = json.loads((out / "lm_eval_results.json").read_text())
    assert set(results["results"]) == {"slotwise_triviaqa", "slotwise_arc_easy", "slotwise_gsm8k_nll", "slotwise_gsm8k"}
    assert results["results"]["slotwise_arc_easy"]["acc,none"] == metrics["arc_easy"]["acc"]
    assert "date" not in results and "total_evaluation_time_seconds" not in results
    assert not (out / "lm_eval_samples").exists()  # evaluate.log_samples is false by default
    ppl = metrics["perplexity"]
    assert ppl["blocks"] == 2 and ppl["heldout"] > 1 and ppl["heldout_memory_off"] > 1
    assert ppl["heldout"] != ppl["heldout_memory_off"]
    assert metrics["facts"]["n"] == 3 and set(metrics["facts"]) >= {"known", "unknown", "unlabelled"}
    assert (out / "plots" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (out / "plots" / "scores.csv").read_text().splitlines()
    assert csv_lines[0] == "task,metric,score" and any(l.startswith("arc_easy,acc_norm,") for l in csv_lines)
    assert "limit: 2" in (out / "params.resolved.yaml").read_text()
    assert len((out / "facts_predictions.jsonl").read_text().splitlines()) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["memory_mode"] == "additive"
    assert not {"device", "load_seconds", "eval_seconds"} & set(summary)  # environment and timings: in the log
    assert sorted(p.name for p in out.parent.iterdir()) == ["evaluate"]  # no staging dirs left behind


@pytest.mark.parametrize("override,missing,match", [
    ("evaluate.tasks=[nq_open,mmlu]", None, r"key 'evaluate.tasks': unknown task 'mmlu' \(known tasks: nq_open, triviaqa"),
    ("evaluate.limits.mmlu=3", None, r"unknown key 'evaluate.limits.mmlu' \(expected one of: arc_challenge"),
    ("evaluate.tasks=[piqa]", "tasks/piqa.jsonl", r"piqa.jsonl: data file not found"),
    ("evaluate.tasks=[]", "background/heldout.jsonl", r"heldout.jsonl: data file not found"),
])
def test_cli_refuses_bad_input_with_one_line(tmp_path, data_dir, capsys, override, missing, match):
    data = data_dir
    if missing is not None:  # a copy of the fixture data without one file
        import shutil
        data = tmp_path / "data"
        shutil.copytree(data_dir, data)
        (data / missing).unlink()
    code, err = _cli(capsys, "--params", _params(tmp_path), "--model", tmp_path / "no_model", "--data", data,
                     "--out", tmp_path / "out", override)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    import re
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_closed_book_qa_prompts_use_the_fact_probe_examples():
    """nq_open / triviaqa ask two-shot with exactly the examples the fact probes use."""
    from slotwise.facts import FEW_SHOT, PROBE

    for task in ("nq_open", "triviaqa"):
        text = (TASKS_DIR / f"slotwise_{task}.yaml").read_text()
        line = next(x for x in text.splitlines() if x.startswith("doc_to_text:"))
        rendered = line.split(":", 1)[1].strip().strip('"').encode().decode("unicode_escape")
        assert rendered == PROBE.format(q="{{question}}")[: len(rendered)] == FEW_SHOT + "Question: {{question}}\nAnswer:"


def test_tasks_the_data_stage_skipped_are_left_out(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"skipped": {"lambada": "no source has it"}}))
    p = EvaluateParams(tasks=["hellaswag", "lambada"])
    assert component.drop_skipped_tasks(p, tmp_path).tasks == ["hellaswag"]
    assert component.drop_skipped_tasks(p, tmp_path / "elsewhere").tasks == ["hellaswag", "lambada"]


def test_lm_eval_results_and_samples_are_written_as_lm_eval_serialises_them(tmp_path, task_scores):
    component.write_lm_eval(task_scores, tmp_path)
    results = json.loads((tmp_path / "lm_eval_results.json").read_text())
    assert results["results"]["slotwise_piqa"]["acc,none"] == task_scores.scores["piqa"]["acc"]
    assert results["configs"]["slotwise_gsm8k"]["num_fewshot"] == 5
    assert not set(results) & {"date", "total_evaluation_time_seconds", "pretty_env_info", "git_hash"}
    assert "0x" not in (tmp_path / "lm_eval_results.json").read_text()  # no object addresses: the same bytes every run
    rows = [json.loads(line) for line in (tmp_path / "lm_eval_samples" / "slotwise_arc_easy.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == [0, 1, 2] and all("resps" in r and "acc" in r for r in rows)
