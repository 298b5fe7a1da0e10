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
--out     the new *cumulative* delta directory (delta.safetensors + delta.json): base checkpoint ->
          served delta -> these facts, i.e. stack(served, new), written atomically

Params: `nightly` (nightly.smf: score, top_t, lr, optimizer, count_on, steps_per_fact; max_len,
include_statement, max_facts, device, seed). No facts -> exit 0, nothing written, and it says so.
"""
from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

import torch

from slotwise import storage
from slotwise.checkpoint import CheckpointError, load_checkpoint, model_hash
from slotwise.cli_utils import component_parser, resolve_device, run_cli
from slotwise.config import NightlyParams, load_params
from slotwise.continual.delta import META, DeltaError, SparseDelta, apply_delta, extract_delta, load_delta, save_delta, stack
from slotwise.continual.experiment import fact_batch
from slotwise.continual.selection import Background
from slotwise.continual.updaters import make_updater
from slotwise.retrofit import memory_layers
from slotwise.sources import DataError, read_jsonl

log = logging.getLogger("slotwise.update")
FACT_FIELDS = ("id", "answers", "paraphrases", "probe")


def fact_files(sources: list[str], workdir: Path) -> list[Path]:
    """Each --facts source (file or folder, local or s3://) -> local *.jsonl files, sorted per source."""
    files: list[Path] = []
    for i, src in enumerate(sources):
        if storage.is_s3(src):
            uris = [u for u in storage.list_prefix(src) if u.endswith(".jsonl")] or [src]
            for j, uri in enumerate(uris):  # drop files are plain objects: no sha256 metadata to check
                files.append(storage.fetch(uri, workdir / f"facts-{i}-{j}", storage.S3Options(require_checksum=False)))
            continue
        path = Path(src)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.jsonl") if not any(part.startswith(".") for part in p.relative_to(path).parts)))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{src}: no such facts file or folder")
    return files


def read_facts(files: list[Path], include_statement: bool) -> list[dict]:
    """Every fact of the files, in order; a malformed line raises DataError naming file:line."""
    need = FACT_FIELDS + (("statement",) if include_statement else ())
    facts = []
    for path in files:
        for lineno, rec in read_jsonl(path, need):
            if not isinstance(rec["answers"], list) or not rec["answers"] or not isinstance(rec["paraphrases"], list):
                raise DataError(f"{path}:{lineno}: 'answers' must be a non-empty list and 'paraphrases' a list")
            facts.append({**rec, "_file": str(path)})
    return facts


def served_delta_dir(path: str | None) -> Path | None:
    """--deltas -> the delta directory to apply, or None (nothing promoted yet)."""
    if not path:
        return None
    p = Path(path)
    for cand in (p, p / "current"):
        if (cand / META).is_file():
            return cand
    if not p.exists() or (p.is_dir() and not any(p.iterdir())) or (p / "registry.json").is_file():
        return None  # no delta yet, an empty folder, or a serving directory with nothing promoted
    raise DeltaError(f"{path}: not a sparse delta directory (no {META}) nor a serving directory with current/")


def backgrounds(stats_dir: Path, model_dir: Path) -> dict[int, Background]:
    """SMF's background tables keyed by each pool's first layer; refuses another model's table."""
    from slotwise.slot_table import load_table

    table = load_table(stats_dir / "table.safetensors", expect_model_hash=model_hash(model_dir))
    return {table.pool_layers[name][0]: Background(s.counts, s.df, s.n_batches) for name, s in table.pools.items()}


def smf_params(n: NightlyParams) -> dict:
    s = n.smf
    return {"score": s.score, "top_t": s.top_t, "lr": s.lr, "optimizer": s.optimizer, "count_on": s.count_on,
            "max_df_fraction": s.max_df_fraction, "seed": n.seed}


def load_served(model_dir: Path, deltas: str | None):
    """Base checkpoint + the served delta applied -> (model, tokenizer, served delta or None)."""
    model, tokenizer = load_checkpoint(model_dir)  # verifies every file against manifest.json
    if not memory_layers(model):
        raise CheckpointError(f"{model_dir}: no memory layers; the nightly update needs a retrofitted checkpoint")
    if tokenizer is None:
        raise CheckpointError(f"{model_dir}: no tokenizer saved with the checkpoint")
    served = None
    delta_dir = served_delta_dir(deltas)
    if delta_dir is not None:
        served = load_delta(delta_dir)
        try:
            apply_delta(model, served)
        except DeltaError as exc:
            raise DeltaError(f"{delta_dir}: the served delta does not apply to {model_dir} ({exc})") from None
    return model, tokenizer, served


def sparse_update(model, tokenizer, facts: list[dict], bgs, n: NightlyParams, device: torch.device) -> tuple[SparseDelta, list[float]]:
    """SMF over the facts (one batch of paraphrases per fact, steps_per_fact steps) -> (delta vs the start, losses)."""
    start = copy.deepcopy(model)
    torch.manual_seed(n.seed)
    updater = make_updater("smf", model.to(device), smf_params(n), backgrounds=bgs)
    model.train()
    losses = []
    for fact in facts:
        batch = {k: v.to(device) for k, v in fact_batch(fact, tokenizer, n.include_statement, n.max_len).items()}
        for _ in range(n.smf.steps_per_fact):
            losses.append(updater.step(batch)["loss"])
    model.cpu().eval()
    return extract_delta(start, model), losses


def cumulative(served: SparseDelta | None, new: SparseDelta, meta: dict) -> SparseDelta:
    """stack(served, new) with a flat history: one meta entry per nightly update."""
    history = list(served.meta.get("history", [])) if served is not None else []
    delta = stack(served, new) if served is not None else new
    delta.meta = {**meta, "updates": len(history) + 1, "history": history + [meta["update"]]}
    return delta


def main(argv: list[str] | None = None) -> int:
    parser = component_parser("slotwise update", __doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base checkpoint directory or s3:// URI")
    parser.add_argument("--deltas", default=None, help="the served delta directory (or a serving dir with current/); optional")
    parser.add_argument("--stats", required=True, help="slot_stats output made on --model (table.safetensors)")
    parser.add_argument("--facts", action="append", required=True, help="facts.jsonl file or folder (local or s3://); repeatable")
    parser.add_argument("--out", required=True, help="output delta directory (cumulative: base -> served -> new facts)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DeltaError as exc:  # a corrupt or mismatched served delta is bad input: one line, exit 2
        raise CheckpointError(str(exc)) from None


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
        bgs = backgrounds(stats_dir, model_dir) if n.smf.score in ("tfidf", "kl") or n.smf.max_df_fraction is not None else None
        log.info("updating %s%s on %d facts from %d file(s) (SMF %s, top_t %d, %s lr %g, %d steps per fact)", args.model,
                 f" + served delta ({served.meta.get('updates', 1)} update(s))" if served else "", len(facts), len(files),
                 n.smf.score, n.smf.top_t, n.smf.optimizer, n.smf.lr, n.smf.steps_per_fact)
        new, losses = sparse_update(model, tokenizer, facts, bgs, n, device)
        update = {"facts": [f["id"] for f in facts], "files": [str(f) for f in args.facts], "n_facts": len(facts),
                  "rows": new.n_rows, "loss_first": losses[0], "loss_last": losses[-1],
                  "smf": {**smf_params(n), "steps_per_fact": n.smf.steps_per_fact},
                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        delta = cumulative(served, new, {"base_checkpoint_hash": model_hash(model_dir), "base_model": str(args.model), "update": update})
        save_delta(delta, args.out)
    log.info("wrote %s: %s rows changed tonight, %s in the cumulative delta (%.1f kB), loss %.3f -> %.3f (%.0f s)", args.out,
             sum(new.n_rows.values()), sum(delta.n_rows.values()), delta.nbytes / 1e3, losses[0], losses[-1], time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    run_cli(main)
