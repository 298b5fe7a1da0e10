"""The continual-learning experiment: a stream of facts, one update per fact, measured as it goes.

Each step of the stream is one fact, trained as a batch of its paraphrases (Lin et al.) for a few
optimizer steps, with the loss on the answer tokens. Every `eval_every` facts the model is probed:

    acquisition   EM / F1 on the probes of the facts seen so far (that it did not know before)
    retention     answers to held-out questions the starting model got right (known facts),
                  and held-out perplexity; at the end also lm-eval tasks (HellaSwag, ARC, PIQA, ...)
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from slotwise.evaluation.perplexity import blocks_nll
from slotwise.facts import PROBE
from slotwise.generation import greedy_answers
from slotwise.qa_metrics import exact_match, f1
from slotwise.text_blocks import pad_examples


@dataclass
class MethodRun:
    name: str = "smf_tfidf"
    method: str = "smf"  # smf | full | lora | grit
    params: dict[str, Any] = field(default_factory=dict)  # the method's own params (see continual.updaters)


@dataclass
class ContinualParams:
    n_facts: int = 20  # facts streamed (unknown to the starting model when only_unknown)
    only_unknown: bool = True
    steps_per_fact: int = 3
    eval_every: int = 10  # facts between measurements
    include_statement: bool = True
    max_len: int = 96  # tokens per paraphrase
    known_screen: int = 150  # held-out TriviaQA questions screened for facts the model already knows
    ppl_blocks: int = 4
    ppl_seq_len: int = 128
    final_tasks: list[str] = field(default_factory=lambda: ["hellaswag", "arc_easy", "piqa"])
    final_task_limit: int = 40
    batch_size: int = 16  # generation / perplexity batch
    device: str = "auto"
    seed: int = 0
    save_deltas: bool = True  # SMF sparse deltas (deltas/) and LoRA / GRIT peft adapters (adapters/)
    methods: list[MethodRun] = field(default_factory=lambda: [
        MethodRun("smf_tfidf", "smf", {"score": "tfidf", "top_t": 500, "optimizer": "adam", "lr": 2e-3, "count_on": "answer"}),
        MethodRun("smf_kl", "smf", {"score": "kl", "top_t": 500, "optimizer": "adam", "lr": 2e-3, "count_on": "answer"}),
        MethodRun("full_ft", "full", {"lr": 1e-5}),
        MethodRun("lora", "lora", {"r": 16, "lr": 2e-4}),
        MethodRun("grit", "grit", {"r": 16, "lr": 2e-4}),
    ])


def answer_span_example(text: str, answer: str, tokenizer, max_len: int) -> tuple[list[int], list[int]] | None:
    """Tokenize prefix | answer | suffix separately so the loss can sit on the answer tokens only."""
    at = text.rfind(answer)
    if at < 0:
        return None
    pre = tokenizer(text[:at], add_special_tokens=False)["input_ids"]
    ans = tokenizer(text[at:at + len(answer)], add_special_tokens=False)["input_ids"]
    post = tokenizer(text[at + len(answer):], add_special_tokens=False)["input_ids"]
    ids = (pre + ans + post)[:max_len]
    labels = ([-100] * len(pre) + ans + [-100] * len(post))[:max_len]
    return (ids, labels) if any(t != -100 for t in labels) else None


def fact_batch(fact: dict, tokenizer, include_statement: bool, max_len: int) -> dict[str, torch.Tensor]:
    texts = ([fact["statement"]] if include_statement else []) + list(fact["paraphrases"])
    answer = fact["answers"][0].strip()
    examples = [e for t in texts if (e := answer_span_example(t, answer, tokenizer, max_len)) is not None]
    if not examples:
        raise ValueError(f"fact {fact['id']}: the answer {answer!r} appears in none of its paraphrases")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_examples(examples, pad)


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
    preds = greedy_answers(model, tokenizer, [it["probe"] for it in items], batch_size=batch_size, progress="screen known facts")
    return [it for it, p in zip(items, preds) if exact_match(p, it["answers"])]


def measure(model, tokenizer, seen: list[dict], known: list[dict], ppl_blocks: torch.Tensor, batch_size: int) -> dict:
    model.eval()
    acq = qa_score(model, tokenizer, seen, batch_size)
    kept = qa_score(model, tokenizer, known, batch_size)
    total, count = blocks_nll(model, ppl_blocks, batch_size=max(1, batch_size // 2))
    return {"acquisition_em": acq["exact_match"], "acquisition_f1": acq["f1"], "learned": acq.get("correct", 0),
            "known_em": kept["exact_match"], "known_kept": kept.get("correct", 0),
            "heldout_ppl": float(torch.tensor(total / count).exp())}


def run_stream(updater, model_for_eval: Callable[[], torch.nn.Module], tokenizer, facts: list[dict], known: list[dict],
               ppl_blocks: torch.Tensor, p: ContinualParams, device, label: str,
               rows_per_fact: list[int] | None = None) -> list[dict]:
    """Stream the facts through the updater; return the curve (one point per measurement).

    rows_per_fact: if given (and the updater reports "selected" rows, as SMF does), gets one entry
    per fact: the value rows that fact's update touched, summed over pools (the size of its delta)."""
    curve = [{"facts_seen": 0, **measure(model_for_eval(), tokenizer, [], known, ppl_blocks, p.batch_size), "seconds": 0.0}]
    t0 = time.perf_counter()
    for n, fact in enumerate(tqdm(facts, desc=label), 1):
        batch = {k: v.to(device) for k, v in fact_batch(fact, tokenizer, p.include_statement, p.max_len).items()}
        model_for_eval().train()
        touched: dict = {}
        for _ in range(p.steps_per_fact):
            last = updater.step(batch)
            for pool, ids in last.get("selected", {}).items():
                touched.setdefault(pool, set()).update(ids.tolist())
        if rows_per_fact is not None and touched:
            rows_per_fact.append(sum(len(v) for v in touched.values()))
        if n % p.eval_every == 0 or n == len(facts):
            point = measure(model_for_eval(), tokenizer, facts[:n], known, ppl_blocks, p.batch_size)
            curve.append({"facts_seen": n, **point, "last_loss": float(last["loss"]), "seconds": time.perf_counter() - t0})
    return curve


def relative_drop(before: float | None, after: float | None, higher_is_better: bool = True) -> float | None:
    """Fractional loss of a retention score (positive = worse); perplexity counts its rise as a drop."""
    if before in (None, 0) or after is None:
        return None
    return (before - after) / before if higher_is_better else (after - before) / before


def method_dict(run: MethodRun) -> dict:
    return dataclasses.asdict(run)
