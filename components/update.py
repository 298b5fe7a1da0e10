"""Stage `update`: the production SMF knowledge update (one nightly batch of new facts -> a cumulative sparse delta).

    python -m slotwise.components.update --params params.yaml --model runs/train --deltas serve/current \\
        --stats runs/slot_stats --facts drop/2026-05-01.jsonl --out work/candidate
    slotwise update --model s3://bucket/runs/train --stats s3://bucket/runs/slot_stats --facts drop/ --out work/candidate

--model   the base checkpoint (a slotwise checkpoint directory or an s3:// URI of one)
--deltas  the currently served sparse delta (a delta directory, or a serving directory holding
          `current/`); optional: absent or empty means the base model is what is served
--stats   the slot_stats output made on that base checkpoint (table.safetensors); refused if it was
          made for another model
--facts   new facts, facts.jsonl format (id, answers, paraphrases, probe, statement): a file or a
          folder of *.jsonl files (local or s3://); may be repeated
--out     the new *cumulative* delta directory (delta.safetensors + delta.json, params.resolved.yaml): base checkpoint ->
          served delta -> these facts, i.e. stack(served, new), written atomically

Params: `nightly` (nightly.smf: the SMF schema, slotwise.continual.smf.SMFConfig; steps_per_fact, max_len,
include_statement, max_facts, device, seed). No facts -> exit 0, nothing written, and it says so.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

from slotwise import storage
from slotwise.checkpoint import model_hash
from slotwise.components._cli import component_parser, run_cli
from slotwise.config import NightlyParams, load_params, to_yaml
from slotwise.continual.delta import save_delta
from slotwise.continual.nightly import cumulative, fact_files, load_served, read_facts, sparse_update
from slotwise.continual.selection import load_backgrounds
from slotwise.schema import resolve_device

log = logging.getLogger("slotwise.update")


def main(argv: list[str] | None = None) -> int:
    parser = component_parser("slotwise update", __doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base checkpoint directory or s3:// URI")
    parser.add_argument("--deltas", default=None, help="the served delta directory (or a serving dir with current/); optional")
    parser.add_argument("--stats", required=True, help="slot_stats output made on --model (table.safetensors)")
    parser.add_argument("--facts", action="append", required=True, help="facts.jsonl file or folder (local or s3://); repeatable")
    parser.add_argument("--out", required=True, help="output delta directory (cumulative: base -> served -> new facts)")
    return run(parser.parse_args(argv))  # a corrupt or mismatched served delta is a user error (DeltaError): one line, exit 2


def run(args) -> int:
    params = load_params(args.params, args.overrides)
    n: NightlyParams = params.nightly
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slotwise-update-") as tmp:
        files = fact_files(args.facts, Path(tmp))
        facts = read_facts(files, n.include_statement)[: n.max_facts]
        if not facts:
            log.info("no new facts in %s: nothing to do, nothing written", ", ".join(args.facts))
            return 0
        model_dir = storage.fetch(args.model, Path(tmp) / "model")
        stats_dir = storage.fetch(args.stats, Path(tmp) / "stats")
        device = resolve_device(n.device, "nightly.device")
        model, tokenizer, served = load_served(model_dir, args.deltas)
        bgs = load_backgrounds(stats_dir, model_dir) if n.smf.needs_background else None
        log.info("updating %s%s on %d facts from %d file(s) (SMF %s, top_t %d, %s lr %g, %d steps per fact)", args.model,
                 f" + served delta ({served.meta.get('updates', 1)} update(s))" if served else "", len(facts), len(files),
                 n.smf.score, n.smf.top_t, n.smf.optimizer, n.smf.lr, n.steps_per_fact)
        new, losses = sparse_update(model, tokenizer, facts, bgs, n, device)
        update = {"facts": [f["id"] for f in facts], "files": [str(f) for f in args.facts], "n_facts": len(facts),
                  "rows": new.n_rows, "loss_first": losses[0], "loss_last": losses[-1],
                  "smf": {**dataclasses.asdict(n.smf), "steps_per_fact": n.steps_per_fact},
                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        delta = cumulative(served, new, {"base_checkpoint_hash": model_hash(model_dir), "base_model": str(args.model), "update": update})
        save_delta(delta, args.out, extra_files={"params.resolved.yaml": to_yaml(params)})
    log.info("wrote %s: %s rows changed tonight, %s in the cumulative delta (%.1f kB), loss %.3f -> %.3f (%.0f s)", args.out,
             sum(new.n_rows.values()), sum(delta.n_rows.values()), delta.nbytes / 1e3, losses[0], losses[-1], time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    run_cli(main)
