"""Stage `data`: the fact stream, the background corpus and the evaluation sets, with provenance.

    python -m slotwise.components.data --params params.yaml --out runs/data
    slotwise data --out runs/data data.n_facts=50 data.sources=[local]
    slotwise data --params profiles/testbed.yaml --out runs/testbed/data     # synthetic people (slotwise.testbed)

Writes (atomically) to --out:
    facts.jsonl                 one fact per line: statement, paraphrases, probe, answers, known
    retention.jsonl             (data.facts_from: testbed) the old population's probes: id, probe, answers
    background/train.jsonl      documents for healing / training (testbed: + the old population's bios)
    background/stats.jsonl      held-out documents for slot statistics (document frequencies)
    background/heldout.jsonl    held-out documents for perplexity
    tasks/<task>.jsonl          evaluation sets, normalised (see slotwise.sources)
    manifest.json               source and count of every dataset, sha256 of every file
    params.resolved.yaml
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

from slotwise.atomic import sha256_file, staged_dir
from slotwise.components._cli import component_parser, run_cli
from slotwise.config import DataParams, load_params, to_yaml
from slotwise.facts import Fact, fact_stream, mark_known_with
from slotwise.sources import DataError, NotAvailable, load
from slotwise.testbed import build_testbed

log = logging.getLogger("slotwise.data")


def write_jsonl(path: Path, records) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def split_background(docs: list[dict], p: DataParams) -> dict[str, list[dict]]:
    """Shuffle (seeded) and cut into heldout | stats | train; the three are disjoint."""
    docs = list(docs)
    random.Random(p.seed).shuffle(docs)
    if p.background_max_docs is not None:
        docs = docs[: p.background_max_docs]
    need = p.heldout_docs + p.stats_docs
    if len(docs) <= need:
        raise DataError(f"background {p.background!r} has {len(docs)} documents; need more than "
                        f"data.heldout_docs + data.stats_docs = {need}")
    return {"heldout": docs[: p.heldout_docs], "stats": docs[p.heldout_docs:need], "train": docs[need:]}


def mark_known(facts: list[Fact], model_source: str, batch_size: int) -> None:
    """Greedy-answer each probe with the base model; a fact is known if the answer matches exactly."""
    from slotwise.models import load_base_model

    model, tokenizer = load_base_model(model_source)
    mark_known_with(facts, model, tokenizer, batch_size)


def _required(name: str, p: DataParams) -> tuple[list[dict], str]:
    try:
        return load(name, p.sources, p.local_dir)
    except NotAvailable as exc:
        raise DataError(f"data.sources {p.sources}: {exc}") from None


def build(p: DataParams, out_dir: Path) -> dict:
    """Write every file into out_dir (a staging directory) and return the manifest."""
    manifest: dict = {"datasets": {}, "skipped": {}}
    if "local" in p.sources and not Path(p.local_dir).is_dir():
        log.warning("data.local_dir %s does not exist; the local source will have nothing", p.local_dir)

    testbed, rest = None, []
    if p.facts_from == "testbed":
        # Synthetic people: the new population is the fact stream, the old one's bios join the
        # background (pretraining text) and its held-out-template probes are the retention set.
        testbed = build_testbed(p.testbed, p.seed, p.n_paraphrases)
        facts = testbed.facts
        n = write_jsonl(out_dir / "retention.jsonl", testbed.retention)
        manifest["datasets"]["retention"] = {"source": "testbed", "count": n, "people": len(testbed.old)}
    else:
        qa, source = _required(p.facts_from, p)
        order = list(range(len(qa)))
        random.Random(p.seed).shuffle(order)
        if len(order) < p.n_facts:
            raise DataError(f"{p.facts_from} has {len(order)} QA pairs; data.n_facts asks for {p.n_facts}")
        # The first n_facts (shuffled) become the fact stream; the evaluation set of the same dataset
        # takes the rest, so no fact is ever an evaluation question.
        fact_ids, rest = order[: p.n_facts], order[p.n_facts:]
        facts = fact_stream([qa[i] for i in fact_ids], p.facts_from, p.n_paraphrases, p.seed)
        if p.mark_known:
            mark_known(facts, p.mark_known_model, p.mark_known_batch_size)
    n = write_jsonl(out_dir / "facts.jsonl", (dataclasses.asdict(f) for f in facts))
    manifest["datasets"]["facts"] = {"source": "testbed" if testbed else source, "from": p.facts_from, "count": n,
                                     "known": sum(bool(f.known) for f in facts) if p.mark_known or testbed else None}

    docs, source = _required(p.background, p)
    for split, part in split_background(docs, p).items():
        part = [{"text": d["text"]} for d in part]
        bios = {"train": testbed.train_bios, "stats": testbed.stats_bios}.get(split, []) if testbed else []
        if bios:  # held-out perplexity stays real text only
            part += [{"text": b, "testbed": True} for b in bios]
            random.Random(f"{p.seed}-{split}").shuffle(part)
        n = write_jsonl(out_dir / "background" / f"{split}.jsonl", part)
        manifest["datasets"][f"background/{split}"] = {"source": source, "from": p.background, "count": n,
                                                       **({"testbed_bios": len(bios)} if testbed else {})}

    for task in p.tasks:
        try:
            records, source = load(task, p.sources, p.local_dir)
        except NotAvailable as exc:
            log.warning("skipping task %s: %s", task, exc)
            manifest["skipped"][task] = str(exc)
            continue
        if task == p.facts_from:
            records = [records[i] for i in rest]
        else:
            random.Random(p.seed).shuffle(records)
        n = write_jsonl(out_dir / "tasks" / f"{task}.jsonl", records[: p.task_limit])
        manifest["datasets"][f"tasks/{task}"] = {"source": source, "count": n}
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = component_parser("slotwise data", __doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/data", help="output directory")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.overrides)
    with staged_dir(args.out) as tmp:
        manifest = build(params.data, tmp)
        (tmp / "params.resolved.yaml").write_text(to_yaml(params))
        manifest["files"] = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for name, info in manifest["datasets"].items():
        log.info("%-22s %6d  (%s)", name, info["count"], info["source"])
    return 0


if __name__ == "__main__":
    run_cli(main)
