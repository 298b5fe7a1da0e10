"""Mark which facts a model already answers (for a data stage run with data.mark_known=false).

    python scripts/mark_known.py runs/data/facts.jsonl runs/retrofit [--batch-size 64]

Uses a slotwise checkpoint (a retrofit answers exactly like its base model) on the GPU when there
is one; rewrites facts.jsonl in place (temp file, then rename), like the data stage's marking.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from slotwise.atomic import staged_file
from slotwise.checkpoint import load_checkpoint
from slotwise.facts import Fact, mark_known_with
from slotwise.schema import resolve_device
from slotwise.sources import read_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("facts")
    ap.add_argument("model")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    facts = [Fact(**r) for _, r in read_jsonl(Path(args.facts))]
    model, tokenizer = load_checkpoint(args.model)
    model.to(resolve_device("auto")).eval()
    mark_known_with(facts, model, tokenizer, args.batch_size)  # the data stage's own rule
    with staged_file(args.facts) as tmp:
        tmp.write_text("".join(json.dumps(dataclasses.asdict(f)) + "\n" for f in facts))
    print(f"{args.facts}: {sum(f.known for f in facts)} of {len(facts)} facts known")


if __name__ == "__main__":
    main()
