"""Functions the task YAMLs next to this file name with `!function utils.<name>`.

lm-eval imports this file by path (from --include_path), so the logic lives in importable
slotwise modules and this file only points at them.
"""
import json
import re
from pathlib import Path

from slotwise.qa_metrics import exact_match, f1, first_line


def local_jsonl(file: str, data_dir: str = "runs/data/tasks", **_metadata):
    """custom_dataset: <data_dir>/<file> (the data stage's normalised task file) as the test split.

    data_dir comes from the task's metadata: the YAML's default, or lm-eval's
    `--metadata '{"data_dir": "..."}'` / TaskManager(metadata=...) (the evaluate stage's).
    """
    import datasets

    path = Path(data_dir) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: task data not found; run the data stage, or point at its tasks/ folder with "
                                "--metadata '{\"data_dir\": \"<data stage output>/tasks\"}'")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocessing (brackets are WikiHow artifacts)
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    """lm-eval's hellaswag process_docs. With ctx_a / ctx_b it is exactly lm-eval's (which capitalises
    ctx_b); with only the joined `ctx` that capitalisation cannot be redone."""
    def _doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize() if doc.get("ctx_a") is not None else doc["ctx"]
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "options": [_hellaswag_clean(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }
    return dataset.map(_doc)


def qa_results(doc, results):
    """generate_until -> EM and F1 of the first line of the generation against every accepted answer."""
    prediction = first_line(results[0])
    return {"exact_match": exact_match(prediction, doc["answers"]), "f1": f1(prediction, doc["answers"])}


def nll_results(doc, results):
    """loglikelihood of the reference answer -> (NLL, characters) for the corpus-level aggregations."""
    ll, _ = results[0]
    n_chars = len(" " + doc["answer"])
    return {"nll_per_char": (-ll, n_chars), "nll": -ll}


def per_char(items):
    """Sum of NLL over sum of characters: the NLL per answer character of the whole slice."""
    return sum(nll for nll, _ in items) / max(1, sum(n for _, n in items))
