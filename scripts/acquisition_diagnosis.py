"""Where does acquisition leak? Each streamed fact probed right after its own update and at the end
of the stream, on its held-out template AND on the training templates it was taught.

    .venv/bin/python scripts/acquisition_diagnosis.py --model runs/testbed/train --data runs/testbed/data \\
        --stats runs/testbed/slot_stats --facts 120 --steps 5 --json diag.json \\
        --runs '[{"name": "smf_lr10", "method": "smf", "params": {"score": "tfidf", "top_t": 500, "optimizer": "sgd", "lr": 10.0}}]'

The continual stage reports one number per run: the fraction of the streamed facts answered on
their held-out template at the end. That number mixes three losses:
    not fitted      right after its update, fewer than half of the fact's own training templates
                    (its statement and paraphrases, cut before the answer) are answered
    not transferred fitted, but its held-out template is not answered (phrasing)
    overwritten     answered on the held-out template right after its update, no longer at the end
                    (the later facts' updates)
This script separates them for one or more update methods on the same facts, in the stage's order
(the first N facts of facts.jsonl that are not marked known), with the stage's batch (fact_batch,
statement included, 48 tokens as in profiles/testbed.yaml) and budget (steps per fact), and prints
one table; a first row probes the starting model (base rates). Also:
    now_other / end_other  the held-out answer given is wrong and is another streamed fact's value
                           (values are drawn from shared lists: read against the start row)
    old_kept               old facts (retention.jsonl probes the start model answers) kept at the end
    rows                   value rows one fact's update touched (SMF)
A run with "lock": true (SMF, with params.max_df_fraction < 1) never selects a row an earlier fact of
the stream wrote (its document frequency is set to |B|): a test of whether overwriting can be
avoided by giving each fact rows of its own.
A run with "replay": k follows each of a fact's update steps with one step on each of k earlier facts
of the stream, drawn at random (experience replay: a baseline against overwriting; it costs k + 1
times the steps, so compare it with the same method at more steps per fact too).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slotwise.checkpoint import load_checkpoint
from slotwise.continual.experiment import fact_batch, screen_answered
from slotwise.continual.selection import load_backgrounds
from slotwise.continual.updaters import make_updater
from slotwise.generation import greedy_answers
from slotwise.qa_metrics import exact_match, normalize_answer
from slotwise.sources import read_jsonl


def train_probes(fact: dict) -> list[str]:
    """The fact's training texts that end with its answer, cut right before it (the prompts it was taught)."""
    answer = fact["answers"][0].strip()
    out = []
    for text in [fact["statement"], *fact["paraphrases"]]:
        body = text.rstrip().rstrip(".")
        if body.endswith(answer):
            out.append(body[: -len(answer)].rstrip())
    return out


def greedy(model, tokenizer, prompts: list[str]) -> list[str]:
    model.eval()
    return greedy_answers(model, tokenizer, prompts, batch_size=16)  # (no_grad inside)


def probe_fact(model, tokenizer, fact: dict) -> tuple[bool, float, str]:
    """(held-out template answered, fraction of its training templates answered, the held-out answer given)."""
    prompts = [fact["probe"], *train_probes(fact)]
    preds = greedy(model, tokenizer, prompts)
    ok = [bool(exact_match(p, fact["answers"])) for p in preds]
    return ok[0], sum(ok[1:]) / max(len(ok) - 1, 1), preds[0]


def others_value(pred: str, fact: dict, facts: list[dict]) -> bool:
    """The wrong answer given is the value of another streamed fact (another person's, same attribute or not)."""
    return not exact_match(pred, fact["answers"]) and any(
        f is not fact and exact_match(pred, f["answers"]) for f in facts)


def diagnose(run: dict, args, facts: list[dict], known: list[dict], backgrounds) -> dict:
    model, tokenizer = load_checkpoint(args.model)
    torch.manual_seed(0)
    # a run may lock rows (below): it writes its own copy of the background table
    backgrounds = copy.deepcopy(backgrounds) if run.get("lock") else backgrounds
    updater = make_updater(run["method"], model, dict(run.get("params", {})), backgrounds=backgrounds)
    steps, replay, rng = int(run.get("steps", args.steps)), int(run.get("replay", 0)), random.Random(0)
    rows, seen_batches = [], []
    for fact in tqdm(facts, desc=run["name"]):
        batch = fact_batch(fact, tokenizer, include_statement=True, max_len=48)
        updater.model.train()
        touched: set = set()
        for _ in range(steps):
            last = updater.step(batch)
            touched.update((pool, i) for pool, ids in last.get("selected", {}).items() for i in ids.tolist())
            for i in replayed(len(seen_batches), replay, rng):
                updater.step(seen_batches[i])
        seen_batches.append(batch)
        if run.get("lock"):  # rows an earlier fact wrote count as read by every background document
            for pool in updater.pools:
                ids = [i for layer, i in touched if layer in pool.layers]  # "selected" is keyed by layer
                updater.backgrounds[pool.layers[0]].df[ids] = updater.backgrounds[pool.layers[0]].n_batches
        heldout, train, pred = probe_fact(updater.model, tokenizer, fact)
        rows.append({"id": fact["id"], "loss_last_step": float(last["loss"]), "rows": len(touched), "now_heldout": heldout,
                     "now_train": train, "now_pred": pred, "now_other": others_value(pred, fact, facts)})
    for row, fact in zip(rows, facts):
        row["end_heldout"], row["end_train"], row["end_pred"] = probe_fact(updater.model, tokenizer, fact)
        row["end_other"] = others_value(row["end_pred"], fact, facts)
    updater.model.eval()
    kept = screen_answered(updater.model, tokenizer, known, 16)  # the old facts it still answers
    return {"name": run["name"], "steps": steps, "old_kept": len(kept) / max(len(known), 1), "facts": rows, "run": run}


def replayed(n_earlier: int, k: int, rng: random.Random) -> list[int]:
    """Which earlier facts one update step replays: k distinct of the n_earlier, at random (fewer if there are fewer)."""
    return rng.sample(range(n_earlier), min(k, n_earlier))


def start_row(model, tokenizer, facts: list[dict]) -> dict:
    """The starting model's row: every fact probed once, counted as both 'now' and 'end'."""
    rows = []
    for fact in facts:
        heldout, train, pred = probe_fact(model, tokenizer, fact)
        other = others_value(pred, fact, facts)
        rows.append({"id": fact["id"], "now_heldout": heldout, "end_heldout": heldout, "now_train": train, "end_train": train,
                     "now_pred": pred, "end_pred": pred, "now_other": other, "end_other": other, "rows": 0})
    return {"name": "start (no update)", "steps": 0, "old_kept": 1.0, "facts": rows, "run": None}


def summarize(result: dict, seen: list[bool] | None) -> dict:
    """One table row from a run's per-fact rows. seen: per fact, whether its value is one an old person
    has (so the model produced it in pretraining); None when the data has no old population."""
    rows, n = result["facts"], len(result["facts"])
    mean = lambda key, among=rows: sum(float(r[key]) for r in among) / len(among) if among else None  # noqa: E731
    fitted = [r for r in rows if r["now_train"] >= 0.5]
    start = result["run"] is None
    out = {"now_train": mean("now_train"), "now_heldout": mean("now_heldout"),
           "end_train": mean("end_train"), "end_heldout": mean("end_heldout"),
           # the three leaks, as fractions of all streamed facts
           "not_fitted": None if start else sum(r["now_train"] < 0.5 for r in rows) / n,
           "not_transferred": None if start else sum(not r["now_heldout"] for r in fitted) / n,
           "overwritten": None if start else sum(r["now_heldout"] and not r["end_heldout"] for r in rows) / n,
           "late_gain": None if start else sum(r["end_heldout"] and not r["now_heldout"] for r in rows) / n,
           # a wrong held-out answer that is another new person's value: interference inside the stream
           "now_other": mean("now_other"), "end_other": mean("end_other"),
           "old_kept": result["old_kept"],
           "rows": mean("rows")}  # value rows a fact's update touched (SMF; 0 for dense methods)
    if seen is not None:  # learned (held-out, end) among facts whose value the old population has / has not
        out["end_heldout_seen"] = mean("end_heldout", [r for r, s in zip(rows, seen) if s])
        out["end_heldout_unseen"] = mean("end_heldout", [r for r, s in zip(rows, seen) if not s])
    return out


COLUMNS = ["now_train", "now_heldout", "end_train", "end_heldout", "not_fitted", "not_transferred", "overwritten",
           "late_gain", "now_other", "end_other", "end_heldout_seen", "end_heldout_unseen", "old_kept", "rows"]


def print_table(results: list[dict], seen: list[bool] | None, n_known: int) -> None:
    cols = [c for c in COLUMNS if seen is not None or "seen" not in c]
    n = len(results[0]["facts"])
    print(f"\n{n} facts, {n_known} old facts known at the start"
          + (f"; {sum(seen)} facts' values are an old person's value (seen), {n - sum(seen)} are not" if seen else "") + "\n")
    print("| run | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in results:
        s = summarize(r, seen)
        label = r["name"] + (f" (x{r['steps']})" if r["steps"] else "")
        print(f"| {label} | " + " | ".join("-" if s[c] is None else f"{s[c]:.0f}" if c == "rows" else f"{s[c]:.2f}"
                                           for c in cols) + " |")


def seen_values(facts: list[dict], data: Path) -> list[bool] | None:
    """Per fact: its value is the answer of some old-population fact (retention.jsonl), or None."""
    path = data / "retention.jsonl"
    if not path.is_file():
        return None
    old = {normalize_answer(a) for _, r in read_jsonl(path) for a in r["answers"]}
    return [any(normalize_answer(a) in old for a in f["answers"]) for f in facts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/acquisition_diagnosis.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--stats")
    ap.add_argument("--runs", help="JSON list of {name, method, params[, steps][, lock][, replay]}; lock (SMF with "
                    "params.max_df_fraction < 1): a row one fact wrote is never selected again in the stream")
    ap.add_argument("--facts", type=int, default=120, help="first N facts not marked known (the stage's stream)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per fact (a run's `steps` overrides)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", default=None, help="print the table of an earlier --json (no model runs; needs --data)")
    args = ap.parse_args(argv)
    data = Path(args.data)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        ids = [r["id"] for r in saved["results"][0]["facts"]]
        by_id = {r["id"]: r for _, r in read_jsonl(data / "facts.jsonl")}
        print_table(saved["results"], seen_values([by_id[i] for i in ids], data), saved["known"])
        return 0
    for flag in ("model", "stats", "runs"):
        if getattr(args, flag) is None:
            ap.error(f"--{flag} is required (unless --from-json)")
    runs = json.loads(args.runs)
    for run in runs:
        if run.get("lock") and not (run["method"] == "smf" and 0 < run.get("params", {}).get("max_df_fraction", 1) < 1):
            ap.error(f"run {run['name']!r}: lock needs method smf with params.max_df_fraction < 1 "
                     "(a locked row is one whose document frequency is set above it)")
    facts = [r for _, r in read_jsonl(data / "facts.jsonl") if not r.get("known")][: args.facts]
    start, tokenizer = load_checkpoint(args.model)
    old = [{"probe": r["probe"], "answers": r["answers"]} for _, r in read_jsonl(data / "retention.jsonl")]
    known = screen_answered(start, tokenizer, old, 16)
    results = [start_row(start, tokenizer, facts)]  # what the model answers before any update: the base rates
    del start
    backgrounds = load_backgrounds(args.stats, args.model) if any(r["method"] == "smf" for r in runs) else None
    results += [diagnose(run, args, facts, known, backgrounds) for run in runs]
    print_table(results, seen_values(facts, data), len(known))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "facts": len(facts), "known": len(known),
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
