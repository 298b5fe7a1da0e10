"""Fact acquisition: greedy answers to each fact's probe, scored by SQuAD EM / F1, split by `known`.

The same generation (slotwise.generation) and scoring (slotwise.qa_metrics) as the continual stage,
so acquisition means the same thing in both.

    facts = [row for _, row in slotwise.sources.read_jsonl(data_dir / "facts.jsonl")]
    summary, rows = fact_acquisition(model, tokenizer, facts, max_new_tokens=16)
    summary["unknown"]["exact_match"]   # facts the base model did not know (known: false)

known: true -> "known", false -> "unknown", null -> "unlabelled".
"""
from __future__ import annotations

from slotwise.generation import greedy_answers
from slotwise.qa_metrics import exact_match, f1

SPLITS = {True: "known", False: "unknown", None: "unlabelled"}


def score_answers(facts: list[dict], predictions: list[str]) -> tuple[dict, list[dict]]:
    """-> (summary: overall and per `known` split {exact_match, f1, n}, per-fact rows)."""
    rows = [{"id": f.get("id"), "known": f.get("known"), "prediction": p,
             "exact_match": exact_match(p, f["answers"]), "f1": f1(p, f["answers"])}
            for f, p in zip(facts, predictions)]

    def agg(rs: list[dict]) -> dict:
        n = len(rs)
        return {"exact_match": sum(r["exact_match"] for r in rs) / n if n else None,
                "f1": sum(r["f1"] for r in rs) / n if n else None, "n": n}

    summary = agg(rows)
    for value, name in SPLITS.items():
        summary[name] = agg([r for r in rows if r["known"] is value])
    return summary, rows


def fact_acquisition(model, tokenizer, facts: list[dict], max_new_tokens: int = 16, batch_size: int = 8,
                     progress: str | None = None) -> tuple[dict, list[dict]]:
    predictions = greedy_answers(model, tokenizer, [f["probe"] for f in facts], max_new_tokens, batch_size, progress)
    return score_answers(facts, predictions)
