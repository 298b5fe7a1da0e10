"""The continual-learning experiment: a stream of facts, one update per fact, measured as it goes.

Each step of the stream is one fact, trained as a batch of its paraphrases (Lin et al.) for a few
optimizer steps, with the loss on the answer tokens. Every `eval_every` facts the model is probed:

    acquisition   EM / F1 on the probes of the facts seen so far (that it did not know before)
    retention     answers to held-out questions the starting model got right (known facts: the
                  data stage's retention.jsonl probes if it wrote them, else held-out TriviaQA),
                  and held-out perplexity; at the end also lm-eval tasks (HellaSwag, ARC, PIQA, ...)
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from slotwise.continual.baselines import FullFTConfig, LoraParams
from slotwise.continual.grit import GritParams
from slotwise.continual.smf import SMFConfig
from slotwise.continual.updaters import Method, build_params
from slotwise.evaluation.perplexity import perplexity
from slotwise.facts import PROBE
from slotwise.generation import greedy_answers
from slotwise.qa_metrics import exact_match, f1
from slotwise.schema import Device, Task, at_least, block_len, check, positive, unique
from slotwise.text_blocks import pad_examples


@dataclass
class MethodRun:
    """One entry of `continual.methods`: a tagged union, `params` typed by `method` (updaters.METHODS)."""
    name: str = "smf_tfidf"
    method: Method = Method.smf
    params: Any = field(default_factory=dict)  # -> SMFConfig | FullFTConfig | LoraParams | GritParams (a dict merges onto it)
    # The acquisition budget of this method (None: continual.steps_per_fact / continual.until_loss).
    steps_per_fact: int | None = positive(None)
    until_loss: float | None = None
    # One run per value, e.g. {lr: [1e-5, 3e-5]} -> runs "<name>@lr=1e-05", ...: the points of this
    # method's learning-vs-forgetting frontier (see continual.frontier).
    sweep: dict[str, list[float]] = field(default_factory=dict)
    group: str | None = None  # the frontier line a run belongs to (set by the sweep; default: name)

    def __post_init__(self):
        check(self)
        self.params = build_params(self.method, self.params)
        known = {f.name for f in dataclasses.fields(self.params)} | {"steps_per_fact", "until_loss"}
        for key, values in self.sweep.items():
            if key not in known:
                raise ValueError(f"key 'continual.methods[{self.name}].sweep.{key}': not a {self.method.value} param "
                                 f"(expected one of: {', '.join(sorted(known))})")
            if not values:
                raise ValueError(f"key 'continual.methods[{self.name}].sweep.{key}': expected a non-empty list of values")


@dataclass
class ContinualParams:
    n_facts: int = positive(20)  # facts streamed (unknown to the starting model when only_unknown)
    only_unknown: bool = True
    steps_per_fact: int = positive(3)  # optimizer steps per fact (with until_loss: the most it may take)
    until_loss: float | None = None  # stop a fact's steps once its answer loss (before a step) is below this
    eval_every: int = positive(10)  # facts between measurements
    include_statement: bool = True
    max_len: int = positive(96)  # tokens per paraphrase
    known_screen: int = at_least(0, 150, "an integer >= 0")  # retention items screened for facts the model already knows: data/retention.jsonl
                             # when the data stage wrote one (testbed), else held-out TriviaQA questions
    ppl_blocks: int = positive(4)
    ppl_seq_len: int = block_len(128)
    final_tasks: list[Task] = field(default_factory=lambda: [Task.hellaswag, Task.arc_easy, Task.piqa])
    final_task_limit: int = positive(40)
    batch_size: int = positive(16)  # generation / perplexity batch
    device: Device = Device.auto
    seed: int = 0
    order_seed: int | None = None  # None: the facts in file order; N: the same facts shuffled by seed N (a seed of the stream)
    save_deltas: bool = True  # SMF sparse deltas (deltas/) and LoRA / GRIT peft adapters (adapters/)
    methods: list[MethodRun] = unique(lambda: [
        MethodRun("smf_tfidf", Method.smf, SMFConfig(score="tfidf", top_t=500, optimizer="adam", lr=2e-3, count_on="answer")),
        MethodRun("smf_kl", Method.smf, SMFConfig(score="kl", top_t=500, optimizer="adam", lr=2e-3, count_on="answer")),
        MethodRun("full_ft", Method.full, FullFTConfig(lr=1e-5)),
        MethodRun("lora", Method.lora, LoraParams(r=16, lr=2e-4)),
        MethodRun("grit", Method.grit, GritParams(r=16, lr=2e-4)),
    ], by="name", what="method names must be unique")


def stream_order(facts: list[dict], order_seed: int | None) -> list[dict]:
    """The facts in the order the stream sees them: as given, or shuffled by order_seed (the same
    facts, another order: what varies between seeds of a continual run whose updates are deterministic)."""
    if order_seed is None:
        return list(facts)
    out = list(facts)
    random.Random(f"continual-order-{order_seed}").shuffle(out)
    return out


def answer_span_example(text: str, answer: str, tokenizer, max_len: int,
                        subject: str | None = None) -> tuple[list[int], list[int]] | tuple[list[int], list[int], list[bool]] | None:
    """(input ids, labels) of text with the loss on the answer's tokens only (its last occurrence).

    The text is tokenized once (offsets from a fast tokenizer) and the answer's span includes the
    whitespace before it: after "was born in" the model must produce ` Strat|ford|...`, the tokens a
    probe's greedy continuation produces, not the `St|rat|ford|...` of the answer tokenized alone.
    A label covers every token that overlaps the span.
    subject: also return a third list, True at every token that overlaps an occurrence of the
    subject in the text (SMF's count_on="subject")."""
    at = text.rfind(answer)
    if at < 0 or not answer:
        return None
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"answer spans need a fast tokenizer (offset mapping); got {type(tokenizer).__name__}")
    start, end = at, at + len(answer)
    while start > 0 and text[start - 1] in " \t":  # the answer's leading space belongs to its first token
        start -= 1
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_len], enc["offset_mapping"][:max_len]
    labels = [t if s < end and e > start else -100 for t, (s, e) in zip(ids, offsets)]
    if not any(t != -100 for t in labels):
        return None
    if subject is None:
        return ids, labels
    spans = [(m, m + len(subject)) for m in _occurrences(text, subject)]
    return ids, labels, [any(s < b and e > a for a, b in spans) for s, e in offsets]


def _occurrences(text: str, sub: str) -> list[int]:
    out, at = [], text.find(sub)
    while sub and at >= 0:
        out.append(at)
        at = text.find(sub, at + len(sub))
    return out


def fact_subject(fact: dict) -> str | None:
    """The entity a fact is about (facts.jsonl `extra.subject`, written by the testbed), or None."""
    subject = (fact.get("extra") or {}).get("subject")
    return subject.strip() if isinstance(subject, str) and subject.strip() else None


def fact_batch(fact: dict, tokenizer, include_statement: bool, max_len: int) -> dict[str, torch.Tensor]:
    """The fact's statement and paraphrases as one padded batch, loss on the answer tokens; with a
    subject (fact_subject) also `subject_mask` (B, S) bool: the tokens of the subject's mentions."""
    texts = ([fact["statement"]] if include_statement else []) + list(fact["paraphrases"])
    answer, subject = fact["answers"][0].strip(), fact_subject(fact)
    examples = [e for t in texts if (e := answer_span_example(t, answer, tokenizer, max_len, subject)) is not None]
    if not examples:
        raise ValueError(f"fact {fact['id']}: the answer {answer!r} appears in none of its paraphrases")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = pad_examples([e[:2] for e in examples], pad)
    if subject is not None:
        mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for r, e in enumerate(examples):
            mask[r, : len(e[2])] = torch.tensor(e[2], dtype=torch.bool)
        batch["subject_mask"] = mask
    return batch


def qa_score(model, tokenizer, items: list[dict], batch_size: int) -> dict:
    """EM / F1 of greedy answers to items ({"probe", "answers"})."""
    if not items:
        return {"exact_match": None, "f1": None, "n": 0}
    preds = greedy_answers(model, tokenizer, [it["probe"] for it in items], batch_size=batch_size)
    em = [exact_match(p, it["answers"]) for p, it in zip(preds, items)]
    return {"exact_match": sum(em) / len(em), "f1": sum(f1(p, it["answers"]) for p, it in zip(preds, items)) / len(items),
            "n": len(items), "correct": int(sum(em))}


def screen_known(model, tokenizer, qa: list[dict], batch_size: int) -> list[dict]:
    """The held-out questions the starting model answers exactly right: the known-fact retention probe."""
    items = [{"probe": PROBE.format(q=r["question"].strip()), "answers": r["answers"]} for r in qa]
    return screen_answered(model, tokenizer, items, batch_size)


def screen_answered(model, tokenizer, items: list[dict], batch_size: int) -> list[dict]:
    """The items ({"probe", "answers"}) the model answers exactly right (greedy)."""
    preds = greedy_answers(model, tokenizer, [it["probe"] for it in items], batch_size=batch_size, progress="screen known facts")
    return [it for it, p in zip(items, preds) if exact_match(p, it["answers"])]


def measure(model, tokenizer, seen: list[dict], known: list[dict], ppl_blocks: torch.Tensor, batch_size: int) -> dict:
    model.eval()
    acq = qa_score(model, tokenizer, seen, batch_size)
    kept = qa_score(model, tokenizer, known, batch_size)
    return {"acquisition_em": acq["exact_match"], "acquisition_f1": acq["f1"], "learned": acq.get("correct", 0),
            "known_em": kept["exact_match"], "known_kept": kept.get("correct", 0),
            "heldout_ppl": perplexity(model, ppl_blocks, batch_size=max(1, batch_size // 2))}


def run_stream(updater, model_for_eval: Callable[[], torch.nn.Module], tokenizer, facts: list[dict], known: list[dict],
               ppl_blocks: torch.Tensor, p: ContinualParams, device, label: str,
               rows_per_fact: list[int] | None = None, run: MethodRun | None = None,
               on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """Stream the facts through the updater; return the curve (one point per measurement).

    Each fact gets up to `steps_per_fact` optimizer steps (the run's own budget, else the stage's);
    with `until_loss` it stops as soon as the loss an update step reports (its loss before the
    update) is below that, so a method that learns a fact in one step spends one step on it.
    rows_per_fact: if given (and the updater reports "selected" rows, as SMF does), gets one entry
    per fact: the value rows that fact's update touched, summed over pools (the size of its delta).
    on_point: called with each curve point as it is measured (the stage passes dvclive's logger).
    No wall times in the points: the curve is part of a cached output (the stage logs them)."""
    max_steps = run.steps_per_fact if run is not None and run.steps_per_fact is not None else p.steps_per_fact
    until = run.until_loss if run is not None and run.until_loss is not None else p.until_loss
    curve = [{"facts_seen": 0, **measure(model_for_eval(), tokenizer, [], known, ppl_blocks, p.batch_size)}]
    if on_point:
        on_point(curve[-1])
    steps_taken: list[int] = []
    for n, fact in enumerate(tqdm(facts, desc=label), 1):
        batch = {k: v.to(device) for k, v in fact_batch(fact, tokenizer, p.include_statement, p.max_len).items()}
        model_for_eval().train()
        touched: dict = {}
        for step in range(max_steps):
            last = updater.step(batch)
            for pool, ids in last.get("selected", {}).items():
                touched.setdefault(pool, set()).update(ids.tolist())
            if until is not None and last["loss"] < until:
                break
        steps_taken.append(step + 1)
        if rows_per_fact is not None and touched:
            rows_per_fact.append(sum(len(v) for v in touched.values()))
        if n % p.eval_every == 0 or n == len(facts):
            point = measure(model_for_eval(), tokenizer, facts[:n], known, ppl_blocks, p.batch_size)
            curve.append({"facts_seen": n, **point, "last_loss": float(last["loss"]),
                          "steps_per_fact_mean": sum(steps_taken) / len(steps_taken)})
            if on_point:
                on_point(curve[-1])
    return curve


def relative_drop(before: float | None, after: float | None, higher_is_better: bool = True) -> float | None:
    """Fractional loss of a retention score (positive = worse); perplexity counts its rise as a drop."""
    if before in (None, 0) or after is None:
        return None
    return (before - after) / before if higher_is_better else (after - before) / before
