"""Stage `gate`: quick retention evaluation of a candidate delta against the served model, and the decision.

    python -m slotwise.components.gate --params params.yaml --model runs/train --current serve/current \\
        --candidate work/candidate --data runs/data --facts drop/2026-05-01.jsonl --out work/gate

--model is the base checkpoint, --current the served delta (optional: none = the base model is
served), --candidate the cumulative delta made by `slotwise update` (base -> candidate). Both are
measured on the same probes, read from --data (the data stage's output):

    known_em     greedy answers to the tasks/triviaqa.jsonl questions (first nightly.eval.known_screen)
                 that the *served* model answers exactly right (so it scores 1.0 by construction)
    heldout_ppl  perplexity on background/heldout.jsonl (nightly.eval.ppl_blocks x ppl_seq_len tokens)
    <task>       acc_norm (or acc) of each lm-eval task in nightly.eval.tasks (limit task_limit)
    new_facts_em informational: probe EM on the new facts (--facts), the acquisition

Gate: the candidate fails if any retention metric (every one above but new_facts_em) drops by more
than nightly.max_retention_drop, relative to the served model (perplexity: its relative rise).
Writes <out>/gate.json {"passed", "reasons", "current", "candidate", "drops", "max_retention_drop"}
atomically; a failing gate is a result (exit 0), not an error.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from slotwise import storage
from slotwise.checkpoint import CheckpointError, load_checkpoint, staged_dir
from slotwise.cli_utils import component_parser, resolve_device, run_cli
from slotwise.components.update import fact_files, read_facts, served_delta_dir
from slotwise.config import NightlyParams, load_params, to_yaml
from slotwise.continual.delta import DeltaError, apply_delta, load_delta, revert_delta, with_old_rows
from slotwise.continual.experiment import qa_score, relative_drop, screen_known
from slotwise.evaluation.perplexity import blocks_nll, token_blocks
from slotwise.sources import read_jsonl

log = logging.getLogger("slotwise.gate")
HELDOUT = Path("background") / "heldout.jsonl"
TRIVIAQA = Path("tasks") / "triviaqa.jsonl"
LOWER_IS_BETTER = ("heldout_ppl",)
INFORMATIONAL = ("new_facts_em",)


def decide(current: dict, candidate: dict, max_drop: float) -> tuple[bool, dict, list[str]]:
    """-> (passed, relative drop per retention metric, reasons for a failure). None-valued metrics are skipped."""
    drops, reasons = {}, []
    for key, before in current.items():
        if key in INFORMATIONAL:
            continue
        after = candidate.get(key)
        if before is not None and (after is None or not math.isfinite(after)):
            drops[key] = None
            reasons.append(f"{key} is {after} for the candidate ({before:.4g} for the served model): not measurable, a broken model")
            continue
        drop = relative_drop(before, after, higher_is_better=key not in LOWER_IS_BETTER)
        drops[key] = drop
        if drop is not None and drop > max_drop:
            reasons.append(f"{key} dropped {drop:.1%} ({before:.4g} -> {candidate[key]:.4g}; at most {max_drop:.1%} allowed)")
    return not reasons, drops, reasons


class Probes:
    """What both models are measured on, fixed once (the known set is screened on the served model)."""

    def __init__(self, model, tokenizer, n: NightlyParams, data_dir: Path, new_facts: list[dict], device: torch.device):
        e = n.eval
        texts = (r["text"] for _, r in read_jsonl(data_dir / HELDOUT, ("text",)))
        self.blocks = token_blocks(tokenizer, texts, e.ppl_seq_len, e.ppl_blocks)
        if len(self.blocks) == 0:
            raise CheckpointError(f"{data_dir / HELDOUT}: fewer than {e.ppl_seq_len} tokens (nightly.eval.ppl_seq_len)")
        self.known = []
        if e.known_screen:
            qa = [r for _, r in read_jsonl(data_dir / TRIVIAQA, ("question", "answers"))][: e.known_screen]
            self.known = screen_known(model.to(device), tokenizer, qa, e.batch_size)
        self.new_facts = [{"probe": f["probe"], "answers": f["answers"]} for f in new_facts]
        self.tasks = [t for t in e.tasks]
        self.data_dir, self.p, self.device = data_dir, e, device

    def measure(self, model, tokenizer) -> dict:
        model.to(self.device).eval()
        total, count = blocks_nll(model, self.blocks.to(self.device), batch_size=self.p.batch_size)
        out = {"heldout_ppl": float(torch.tensor(total / count).exp()),
               "known_em": qa_score(model, tokenizer, self.known, self.p.batch_size)["exact_match"],
               "new_facts_em": qa_score(model, tokenizer, self.new_facts, self.p.batch_size)["exact_match"]}
        if self.tasks:
            from slotwise.evaluation.tasks import rendered_tasks, run_tasks

            with rendered_tasks(self.data_dir / "tasks", tasks=self.tasks) as include:
                scores = run_tasks(model, tokenizer, self.tasks, include, {t: self.p.task_limit for t in self.tasks},
                                   batch_size=self.p.batch_size, seed=0)
            for task, m in scores.items():
                out[task] = m.get("acc_norm", m.get("acc"))
        model.cpu()
        return out


def main(argv: list[str] | None = None) -> int:
    parser = component_parser("slotwise gate", __doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base checkpoint directory")
    parser.add_argument("--current", default=None, help="the served delta (or a serving dir with current/); optional")
    parser.add_argument("--candidate", required=True, help="candidate cumulative delta (from `slotwise update`)")
    parser.add_argument("--data", default="runs/data", help="the data stage's output (heldout text, triviaqa questions)")
    parser.add_argument("--facts", action="append", default=[], help="the new facts (acquisition, informational); repeatable")
    parser.add_argument("--out", required=True, help="output directory for gate.json")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DeltaError as exc:
        raise CheckpointError(str(exc)) from None


def run(args) -> int:
    params = load_params(args.params, args.overrides)
    n: NightlyParams = params.nightly
    device = resolve_device(n.device, "nightly.device")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slotwise-gate-") as tmp:
        model, tokenizer = load_checkpoint(storage.fetch(args.model, Path(tmp) / "model"))
        new_facts = read_facts(fact_files(args.facts, Path(tmp)), n.include_statement) if args.facts else []
    current_dir = served_delta_dir(args.current)
    current = load_delta(current_dir) if current_dir is not None else None
    candidate = load_delta(args.candidate)
    if current is not None:
        current = with_old_rows(current, model, verify=False)  # the base's rows, to revert; apply_delta checks the hash
        apply_delta(model, current)
    probes = Probes(model, tokenizer, n, Path(args.data), new_facts, device)
    before = probes.measure(model, tokenizer)
    if current is not None:
        revert_delta(model, current)
    apply_delta(model, candidate)  # verifies the candidate was made on this base checkpoint
    after = probes.measure(model, tokenizer)
    passed, drops, reasons = decide(before, after, n.max_retention_drop)
    result = {"passed": passed, "reasons": reasons, "current": before, "candidate": after, "drops": drops,
              "max_retention_drop": n.max_retention_drop, "known_screened": n.eval.known_screen, "known_found": len(probes.known),
              "model": str(args.model), "current_delta": str(current_dir) if current_dir else None, "candidate_delta": str(args.candidate),
              "seconds": round(time.perf_counter() - t0, 2)}
    with staged_dir(args.out) as tmp:
        (tmp / "gate.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "params.resolved.yaml").write_text(to_yaml(params))
    log.info("gate %s: %s", "PASSED" if passed else "FAILED", "; ".join(reasons) or
             ", ".join(f"{k} {v:+.1%}" for k, v in drops.items() if v is not None) or "no retention metric measured")
    return 0


if __name__ == "__main__":
    run_cli(main)
