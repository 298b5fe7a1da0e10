"""SQuAD-style answer scoring: normalise, exact match and token F1, each the best over all accepted answers.

Normalisation as in the SQuAD v1.1 evaluator: lower-case, drop punctuation, drop the articles
a/an/the, squeeze whitespace.
"""
from __future__ import annotations

import collections
import re
import string

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: list[str]) -> float:
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        if not pred or not gold:  # SQuAD: both empty -> 1, one empty -> 0
            best = max(best, float(pred == gold))
            continue
        overlap = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if overlap:
            precision, recall = overlap / len(pred), overlap / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def answer_span(generation: str) -> str:
    """The answer part of a greedy continuation: its first line, stripped."""
    return generation.strip().split("\n")[0].strip()
