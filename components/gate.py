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
import tempfile
import time
from pathlib import Path

from slotwise import storage
from slotwise.atomic import staged_dir
from slotwise.checkpoint import load_checkpoint
from slotwise.components._cli import component_parser, run_cli
from slotwise.config import NightlyParams, load_params, to_yaml
from slotwise.continual.delta import apply_delta, load_delta, revert_delta, with_old_rows
from slotwise.continual.nightly import Probes, decide, fact_files, read_facts, served_delta_dir
from slotwise.schema import resolve_device

log = logging.getLogger("slotwise.gate")


def main(argv: list[str] | None = None) -> int:
    parser = component_parser("slotwise gate", __doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base checkpoint directory")
    parser.add_argument("--current", default=None, help="the served delta (or a serving dir with current/); optional")
    parser.add_argument("--candidate", required=True, help="candidate cumulative delta (from `slotwise update`)")
    parser.add_argument("--data", default="runs/data", help="the data stage's output (heldout text, triviaqa questions)")
    parser.add_argument("--facts", action="append", default=[], help="the new facts (acquisition, informational); repeatable")
    parser.add_argument("--out", required=True, help="output directory for gate.json")
    return run(parser.parse_args(argv))


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
