"""Do a new fact's SMF rows belong to that person, or to the relation? (the testbed's specificity check)

    .venv/bin/python scripts/testbed_overlap.py --model runs/testbed/train --data runs/testbed/data \
        --stats runs/testbed/slot_stats [--top-t 500] [--facts 24] [--count-on answer|subject|all] [--max-df F]

For the first --facts new facts: the rows SMF would train (tfidf, counted on --count-on, top t), then
  same-relation overlap   mean |rows(f) & rows(g)| / t over pairs of facts of DIFFERENT people, SAME attribute
  other-relation overlap  the same over pairs of different people and different attributes
  old reads hit           the share of the slot reads at the answer position of each old probe
                          (data/retention.jsonl, same attribute) that land in the fact's rows
  own probe reads hit     the share of the fact's OWN held-out probe's reads that land in its rows,
                          at the answer position and at the subject's tokens: rows the probe never
                          reads cannot answer it, however well they fit the training sentences
Rows chosen per person would give ~0 for both overlaps; rows chosen per relation give a high
same-relation overlap and old reads hit: then an update overwrites every old person's answer.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from slotwise.checkpoint import load_checkpoint
from slotwise.continual.experiment import fact_batch
from slotwise.continual.selection import load_backgrounds
from slotwise.continual.smf import SMFConfig, SparseMemoryFinetuner, count_mask
from slotwise.retrofit import record_lookups


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--top-t", type=int, default=500)
    ap.add_argument("--facts", type=int, default=24)
    ap.add_argument("--score", default="tfidf")
    ap.add_argument("--count-on", default="answer", choices=["answer", "subject", "all"])
    ap.add_argument("--max-df", type=float, default=None, help="smf.max_df_fraction: only rows with df <= this * |B|")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    model, tok = load_checkpoint(args.model)
    model.eval()
    smf = SparseMemoryFinetuner(model, load_backgrounds(args.stats, args.model), SMFConfig(score=args.score, top_t=args.top_t, optimizer="sgd", lr=1.0,
                                                                                                      max_df_fraction=args.max_df))
    facts = [json.loads(line) for line in (Path(args.data) / "facts.jsonl").read_text().splitlines()][: args.facts]
    rows, attrs, people = [], [], []
    for f in facts:
        batch = fact_batch(f, tok, True, 48)
        with torch.no_grad(), record_lookups(model) as lookups:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        chosen = smf.select(smf.pool_counts(lookups, count_mask(batch, args.count_on)))
        rows.append(set().union(*(set(v.tolist()) for v in chosen.values())))
        attrs.append(f["extra"]["attribute"] if "extra" in f else f["id"].rsplit("-", 1)[1])
        people.append(f["extra"]["subject"] if "extra" in f else f["id"].split("-")[2])
    same, other = [], []
    for i, j in itertools.combinations(range(len(facts)), 2):
        if people[i] == people[j]:
            continue
        o = len(rows[i] & rows[j]) / max(1, min(len(rows[i]), len(rows[j])))
        (same if attrs[i] == attrs[j] else other).append(o)
    old = [json.loads(line) for line in (Path(args.data) / "retention.jsonl").read_text().splitlines()]
    hits = []
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for i, f in enumerate(facts):
        probes = [r["probe"] for r in old if r["attribute"] == attrs[i]][:20]
        enc = tok(probes, return_tensors="pt", padding=True)
        with torch.no_grad(), record_lookups(model) as lookups:
            model(**enc)
        ids = torch.cat([rec.ids[:, -1] for recs in lookups.values() for rec in recs])  # (P, H, knn): the answer position's reads
        hits.append(sum(int(x) in rows[i] for x in ids.flatten().tolist()) / ids.numel())
    own_answer, own_subject = [], []
    for i, f in enumerate(facts):
        enc = tok(f["probe"], add_special_tokens=False, return_offsets_mapping=True)
        at = f["probe"].find(people[i])
        subject = torch.tensor([s < at + len(people[i]) and e > at for s, e in enc["offset_mapping"]])  # (S,)
        with torch.no_grad(), record_lookups(model) as lookups:
            model(input_ids=torch.tensor([enc["input_ids"]]))
        recs = [rec.ids[0] for recs in lookups.values() for rec in recs]  # (S, H, knn) per layer
        share = lambda ids: sum(int(x) in rows[i] for x in ids.flatten().tolist()) / max(1, ids.numel())  # noqa: E731
        own_answer.append(share(torch.cat([r[-1] for r in recs])))
        own_subject.append(share(torch.cat([r[subject] for r in recs])))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    print(f"top_t {args.top_t}, max_df {args.max_df}, {len(facts)} facts: rows per fact {mean([len(r) for r in rows]):.0f}; "
          f"overlap same relation {mean(same):.3f} ({len(same)} pairs), other relation {mean(other):.3f} ({len(other)} pairs); "
          f"old probes' answer-position reads in the fact's rows {mean(hits):.3f}; "
          f"its own probe's reads in its rows: answer position {mean(own_answer):.3f}, subject tokens {mean(own_subject):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
