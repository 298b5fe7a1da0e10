"""Does an update method learn ONE fact? The answer loss and the probe answer, step by step.

    python scripts/single_fact.py --model runs/train --data runs/data --stats runs/slot_stats \\
        --method smf --params '{"score": "tfidf", "top_t": 500, "lr": 0.01}' --steps 10 --facts 3

Before streaming hundreds of facts, check that a method can learn a single one within a few steps
(issue: "make SMF work first on a single fact"). Prints a table per fact and writes JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from slotwise.checkpoint import load_checkpoint
from slotwise.continual.experiment import fact_batch, qa_score
from slotwise.continual.selection import load_backgrounds
from slotwise.continual.updaters import make_updater
from slotwise.evaluation.perplexity import perplexity, token_blocks
from slotwise.sources import read_jsonl


def answer_loss(model, batch) -> float:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.item()


def run(model_dir: str, facts: list[dict], method: str, params: dict, steps: int, backgrounds,
        heldout: list[str] | None = None, ppl_blocks: int = 4) -> list[dict]:
    """Each fact from a fresh copy of the model; held-out perplexity before and after (the damage)."""
    rows = []
    blocks = None
    for fact in facts:
        model, tokenizer = load_checkpoint(model_dir)
        if blocks is None and heldout:
            blocks = token_blocks(tokenizer, heldout, seq_len=128, max_blocks=ppl_blocks)
        model.eval()
        ppl_before = perplexity(model, blocks, batch_size=4) if blocks is not None and len(blocks) else None
        updater = make_updater(method, model, dict(params), backgrounds=backgrounds)
        batch = fact_batch(fact, tokenizer, include_statement=True, max_len=96)
        losses = [answer_loss(updater.model, batch)]
        for _ in range(steps):
            updater.model.train()
            updater.step(batch)
            updater.model.eval()
            losses.append(answer_loss(updater.model, batch))
        probe = qa_score(updater.model, tokenizer, [fact], batch_size=1)
        ppl_after = perplexity(updater.model, blocks, batch_size=4) if ppl_before is not None else None
        rows.append({"id": fact["id"], "answer": fact["answers"][0], "losses": losses, "learned": bool(probe["exact_match"]),
                     "f1": probe["f1"], "ppl_before": ppl_before, "ppl_after": ppl_after})
        ppl = "" if ppl_before is None else f"  ppl {ppl_before:.2f} -> {ppl_after:.2f}"
        print(f"{fact['id']:>16}  {fact['answers'][0][:24]:<24}  loss " + " ".join(f"{x:.2f}" for x in losses)
              + f"  -> {'LEARNED' if probe['exact_match'] else 'not learned'} (F1 {probe['f1']:.2f}){ppl}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/single_fact.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/train")
    ap.add_argument("--data", default="runs/data")
    ap.add_argument("--stats", default="runs/slot_stats")
    ap.add_argument("--method", default="smf")
    ap.add_argument("--params", default="{}", help="the method's params as JSON")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--facts", type=int, default=3, help="first N facts the base model did not know")
    ap.add_argument("--ppl-blocks", type=int, default=4, help="held-out blocks of 128 tokens for the damage (0: off)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    facts = [r for _, r in read_jsonl(Path(args.data) / "facts.jsonl") if not r.get("known")][: args.facts]
    backgrounds = None
    if args.method == "smf" and params.get("score", "tfidf") in ("tfidf", "kl"):
        backgrounds = load_backgrounds(args.stats, args.model)
    heldout = [r["text"] for _, r in read_jsonl(Path(args.data) / "background" / "heldout.jsonl")] if args.ppl_blocks else None
    rows = run(args.model, facts, args.method, params, args.steps, backgrounds, heldout, args.ppl_blocks)
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "params": params, "facts": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
