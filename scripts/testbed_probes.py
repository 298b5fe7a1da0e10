"""Old-fact accuracy of a testbed model per template set: training templates vs held-out ones.

    .venv/bin/python scripts/testbed_probes.py --model runs/testbed/train --data runs/testbed/data [--limit 600]

Every old person's attribute (data/retention.jsonl) is probed with EVERY template of the set that
ends with the answer (cut right before it): "train" = templates the bios use, "heldout" = the ones
no training text uses. Prints exact match per set and per held-out template (JSON with --json).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from slotwise.checkpoint import load_checkpoint
from slotwise.generation import greedy_answers
from slotwise.qa_metrics import exact_match
from slotwise.testbed import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, probe_prefix


def probes(rows: list[dict], templates: dict[str, tuple[str, ...]]) -> list[tuple[str, str, str]]:
    """(template, prefix, answer) for every row and every template of its attribute that ends with the answer."""
    return [(t, probe_prefix(t, r["person"]), r["answers"][0]) for r in rows
            for t in templates[r["attribute"]] if t.endswith("{a}.")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=None, help="first N retention rows (people x attributes)")
    ap.add_argument("--json", default=None, help="write the numbers here too")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in (Path(args.data) / "retention.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:args.limit] if args.limit else rows
    torch.set_grad_enabled(False)
    model, tok = load_checkpoint(args.model, dtype=torch.float32, device=torch.device("cpu"))
    model.eval()
    out = {}
    for name, templates in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES)):
        ps = probes(rows, templates)
        preds = greedy_answers(model, tok, [p for _, p, _ in ps], max_new_tokens=8, batch_size=64)
        hits = [float(exact_match(pred, [a])) for (_, _, a), pred in zip(ps, preds)]
        per_t: dict[str, list[float]] = {}
        for (t, _, _), h in zip(ps, hits):
            per_t.setdefault(t, []).append(h)
        out[name] = {"exact_match": sum(hits) / len(hits), "n": len(hits),
                     "per_template": {t: round(sum(v) / len(v), 3) for t, v in per_t.items()}}
        print(f"{name}: exact match {out[name]['exact_match']:.3f} over {len(hits)} probes")
        for t, v in sorted(out[name]["per_template"].items(), key=lambda kv: kv[1]):
            print(f"   {v:.2f}  {t}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
