"""SQuAD-style answer matching: normalise, exact match and token F1 against all accepted answers."""
from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze whitespace (as in the SQuAD evaluator)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def f1(prediction: str, answers: list[str]) -> float:
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = collections.Counter(pred_tokens) & collections.Counter(gold)
        overlap = sum(common.values())
        if overlap == 0:
            continue
        precision, recall = overlap / len(pred_tokens), overlap / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def first_line(generation: str) -> str:
    """The answer part of a greedy continuation: up to the first newline, stripped."""
    return generation.strip().split("\n")[0].strip()
