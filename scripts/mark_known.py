"""Mark which facts a model already answers (for a data stage run with data.mark_known=false).

    python scripts/mark_known.py runs/data/facts.jsonl runs/retrofit [--batch-size 64]

Uses a slotwise checkpoint (a retrofit answers exactly like its base model) on the GPU when there
is one; rewrites facts.jsonl in place (temp file, then rename), like the data stage's marking.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from slotwise.checkpoint import load_checkpoint
from slotwise.generation import greedy_answers
from slotwise.qa_metrics import exact_match
from slotwise.sources import read_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("facts")
    ap.add_argument("model")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    rows = [r for _, r in read_jsonl(Path(args.facts))]
    model, tokenizer = load_checkpoint(args.model)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    answers = greedy_answers(model, tokenizer, [r["probe"] for r in rows], batch_size=args.batch_size, progress="mark known facts")
    for r, a in zip(rows, answers):
        r["known"] = bool(exact_match(a, r["answers"]))
        r.setdefault("extra", {})["base_answer"] = a
    tmp = Path(args.facts).with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, args.facts)
    print(f"{args.facts}: {sum(r['known'] for r in rows)} of {len(rows)} facts known")


if __name__ == "__main__":
    main()
