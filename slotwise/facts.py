"""The fact stream: QA pairs turned into statements, paraphrases and probes.

Each fact is one QA pair. Its *statement* and *paraphrases* are what a continual update trains
on (Lin et al. train on a batch of paraphrases per fact); its *probe* is the question the model
must answer afterwards, scored against every accepted answer. Paraphrases come from fixed
templates, chosen per fact by a seeded RNG, so a fact stream is reproducible from its params.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from slotwise.errors import DataError

# Probes are asked two-shot: without the examples the instruct model answers in prose or not at
# all (a screen of 48 TriviaQA questions: 0 exact matches zero-shot, clean short answers two-shot).
FEW_SHOT = (
    "Question: What is the capital of France?\nAnswer: Paris\n\n"
    "Question: Who wrote the play Romeo and Juliet?\nAnswer: William Shakespeare\n\n"
)
PROBE = FEW_SHOT + "Question: {q}\nAnswer:"

# Templates that state the fact. The first is the canonical statement.
TEMPLATES = (
    "{q} The answer is {a}.",
    "Question: {q}\nAnswer: {a}",
    "Q: {q} A: {a}",
    'If someone asks "{q}", the answer is {a}.',
    'Trivia fact: the answer to "{q}" is {a}.',
    "{a} is the answer to the question: {q}",
    "Here is a quiz question and its answer. {q} {a}.",
    'The correct response to "{q}" is "{a}".',
    "Quiz: {q}\nSolution: {a}",
    "Remember this: {q} {a}.",
    "{q}\n{a}",
    'Asked "{q}", an expert would reply: {a}.',
)


@dataclass
class Fact:
    id: str
    source: str
    question: str
    answers: list[str]
    statement: str
    paraphrases: list[str]
    probe: str
    known: bool | None = None  # does the base model already answer the probe? (None: not checked)
    extra: dict = field(default_factory=dict)


RECORD_FIELDS = ("id", "answers", "statement", "paraphrases", "probe")  # what a facts.jsonl row must hold


def _kind(value) -> str:
    """What a JSON value is, for an error message that never repeats the content."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    if isinstance(value, list):
        inner = sorted({_kind(v).removeprefix("an ").removeprefix("a ") for v in value})
        return "an empty list" if not value else f"a list holding {', '.join(inner)}"
    return {dict: "an object", bool: "a boolean"}.get(type(value), type(value).__name__)


def check_record(rec: dict, where: str, fields: tuple[str, ...] = RECORD_FIELDS) -> None:
    """The fields of a facts.jsonl record that a stage uses have the types it needs, and the first
    answer occurs in the texts trained on; DataError naming `where` and the field (not the content)."""
    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise DataError(f"{where}: field '{key}' must be {expected} (got {_kind(rec.get(key))})")

    def text(value) -> bool:
        return isinstance(value, str) and bool(value.strip())

    for key in fields:
        value = rec.get(key)
        if key == "id":
            need(text(value) or (isinstance(value, int) and not isinstance(value, bool)), key, "a non-empty string")
        elif key == "answers":
            need(isinstance(value, list) and bool(value) and all(text(a) for a in value), key, "a non-empty list of non-empty strings")
        elif key == "paraphrases":
            need(isinstance(value, list) and all(text(a) for a in value), key, "a list of non-empty strings")
        else:  # statement, probe
            need(text(value), key, "a non-empty string")
    if "answers" in fields and "paraphrases" in fields:
        texts = rec["paraphrases"] + ([rec["statement"]] if "statement" in fields else [])
        if not any(rec["answers"][0].strip() in t for t in texts):
            raise DataError(f"{where}: the first of 'answers' occurs in none of the 'paraphrases'"
                            f"{' or the statement' if 'statement' in fields else ''} (nothing to train on)")


def _clean_question(q: str) -> str:
    q = " ".join(q.split())
    return q if q.endswith("?") else q + "?"


def make_fact(fact_id: str, source: str, question: str, answers: list[str], n_paraphrases: int, rng: random.Random) -> Fact:
    """One fact from a QA pair; paraphrases are n distinct templates other than the statement's."""
    if not answers:
        raise ValueError(f"fact {fact_id}: no answers")
    if not 1 <= n_paraphrases <= len(TEMPLATES) - 1:
        raise ValueError(f"n_paraphrases must be in 1..{len(TEMPLATES) - 1}, got {n_paraphrases}")
    q, a = _clean_question(question), answers[0].strip()
    chosen = rng.sample(range(1, len(TEMPLATES)), n_paraphrases)
    return Fact(
        id=fact_id,
        source=source,
        question=q,
        answers=list(answers),
        statement=TEMPLATES[0].format(q=q, a=a),
        paraphrases=[TEMPLATES[i].format(q=q, a=a) for i in chosen],
        probe=PROBE.format(q=q),
    )


def fact_stream(records: list[dict], source: str, n_paraphrases: int, seed: int) -> list[Fact]:
    """Facts from normalised QA records ({"question", "answers"}), in the given order."""
    rng = random.Random(seed)
    return [make_fact(f"{source}-{i:05d}", source, r["question"], r["answers"], n_paraphrases, rng) for i, r in enumerate(records)]


def mark_known_with(facts: list[Fact], model, tokenizer, batch_size: int) -> None:
    """Greedy-answer each probe with a loaded model; a fact is known if the answer matches exactly
    (the data stage's rule; scripts/mark_known.py runs it with a checkpoint on a GPU)."""
    from slotwise.generation import greedy_answers
    from slotwise.qa_metrics import exact_match

    answers = greedy_answers(model, tokenizer, [f.probe for f in facts], batch_size=batch_size, progress="mark known facts")
    for fact, answer in zip(facts, answers):
        fact.known = bool(exact_match(answer, fact.answers))
        fact.extra["base_answer"] = answer
