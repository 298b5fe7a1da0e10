"""The nightly knowledge update: new facts from a drop location -> SMF -> retention gate -> promote or keep.

    python -m slotwise.flows.nightly --params params.yaml --model runs/train --stats runs/slot_stats \\
        --data runs/data --drop drop/ --serve serve/            # one run, now (a local ephemeral Prefect)
    python -m slotwise.flows.serve                              # the same on a cron schedule (flows/serve.py)

Steps (each a Prefect task calling a component with paths; the flow only orchestrates):

    lock       <serve>/.lock, non-blocking: a second concurrent run ends at once ("another update is running")
    list_new   *.jsonl files under --drop (a local folder or an s3:// prefix) that registry.json does not list
    fetch      S3 drop files (and an S3 model / slot table) to a local work folder
    update     `slotwise update`: base checkpoint + served delta, SMF on the new facts -> candidate cumulative delta
    gate       `slotwise gate`: held-out perplexity, known-fact answers, optional lm-eval tasks; candidate vs served
    record     passed: the candidate becomes the served delta; failed: the served delta stays; either way one
               registry entry (files consumed, metrics, delta hash, decision and reason)

Nothing new -> nothing happens (and the result says so). Rejected files count as consumed: they are not
retried the next night (drop them again under a new name to retry). The logic lives in slotwise/continual/
(nightly.py: update and gate; serving.py: the serving directory's layout, registry and promotion).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import uuid
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from slotwise import storage
from slotwise.continual import serving
from slotwise.continual.nightly import jsonl_files
from slotwise.flows.tasks import retry_unless_user_error, run_component


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def list_new(drop: str, serve: str) -> list[str]:
    """The drop's *.jsonl files (local paths or s3:// URIs) that no registry entry lists, sorted."""
    seen = serving.consumed(serving.read_registry(serve))
    return [u for u in jsonl_files(drop) if u not in seen]


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def fetch_files(uris: list[str], dest: str) -> list[dict]:
    """Drop files -> [{"uri", "path" (local), "sha256"}]; S3 objects are downloaded into dest."""
    out = []
    for i, uri in enumerate(uris):
        path = storage.fetch(uri, Path(dest) / f"{i:04d}", storage.S3Options(require_checksum=False))
        out.append({"uri": uri, "path": str(path), "sha256": storage.sha256_file(path)})
    return out


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def localize(uri: str, dest: str) -> str:
    """A local path stays as it is; an s3:// artifact is fetched (verified) into dest."""
    return str(storage.fetch(uri, dest))


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def update(params: str, overrides: list[str], model: str, served: str | None, stats: str, facts: list[str], out: str) -> str | None:
    """`slotwise update` -> the candidate delta directory, or None if the files held no facts."""
    args = ["--params", params, "--model", model, "--stats", stats, "--out", out]
    args += ["--deltas", served] if served else []
    for f in facts:
        args += ["--facts", f]
    run_component("update", args + overrides)
    return out if Path(out).is_dir() else None


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def gate(params: str, overrides: list[str], model: str, served: str | None, candidate: str, data: str, facts: list[str], out: str) -> dict:
    """`slotwise gate` -> the contents of gate.json."""
    args = ["--params", params, "--model", model, "--candidate", candidate, "--data", data, "--out", out]
    args += ["--current", served] if served else []
    for f in facts:
        args += ["--facts", f]
    run_component("gate", args + overrides)
    return json.loads((Path(out) / "gate.json").read_text())


@task(cache_policy=NO_CACHE)
def record(serve: str, entry: dict, candidate: str | None) -> dict:
    """Commit the run to the registry; promote the candidate when given (see serving.record)."""
    return serving.record(serve, entry, promote_from=candidate)


def _report(entry: dict) -> str:
    lines = [f"# Nightly update {entry['run_id']}: {entry['decision']}", "", entry["reason"], "",
             f"files: {len(entry['files'])}; served before: {entry['served_before']}; served after: {entry['served_after']}"]
    g = entry.get("metrics") or {}
    if g.get("current"):
        lines += ["", "| metric | served | candidate | drop |", "|---|---|---|---|"]
        lines += [f"| {k} | {g['current'][k]} | {g['candidate'].get(k)} | {g['drops'].get(k, '')} |" for k in g["current"]]
    return "\n".join(lines)


@flow(name="nightly-knowledge-update", log_prints=True)
def nightly(params: str = "params.yaml", model: str = "runs/train", stats: str = "runs/slot_stats", data: str = "runs/data",
            drop: str = "drop", serve: str = "serve", overrides: list[str] | None = None) -> dict:
    """One nightly knowledge update; returns {"status", "reason", ...} (and the registry entry when one is made)."""
    log = get_run_logger()
    overrides = list(overrides or [])
    with serving.serving_lock(serve) as holder:
        if holder is not None:
            log.warning("another update is running (%s): this run does nothing", holder)
            return {"status": "skipped", "reason": f"another update is running ({holder})"}
        served = serving.repair_current(serve)
        new = list_new(drop, serve)
        if not new:
            log.info("nothing new in %s: nothing to do", drop)
            return {"status": "nothing new", "reason": f"no new *.jsonl files in {drop}", "served": str(served) if served else None}
        run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
        work = Path(serve) / "runs" / run_id
        started = serving.now()
        log.info("run %s: %d new file(s) in %s; served: %s", run_id, len(new), drop, served or "the base checkpoint")
        try:
            files = fetch_files(new, str(work / "drop"))
            local_model = localize(model, str(work / "inputs"))
            local_stats = localize(stats, str(work / "inputs"))
            paths = [f["path"] for f in files]
            served_s = str(served) if served else None
            candidate = update(params, overrides, local_model, served_s, local_stats, paths, str(work / "candidate"))
            entry = {"run_id": run_id, "started_at": started, "files": [{"uri": f["uri"], "sha256": f["sha256"]} for f in files],
                     "model": model, "stats": stats}
            if candidate is None:
                entry.update(decision="nothing to learn", reason="the new files hold no facts", metrics=None)
                promote = None
            else:
                result = gate(params, overrides, local_model, served_s, candidate, data, paths, str(work / "gate"))
                passed = result["passed"]
                reason = ("every retention metric within {:.1%}".format(result["max_retention_drop"]) if passed
                          else "gate failed: " + "; ".join(result["reasons"]))
                entry.update(decision="promoted" if passed else "rejected", reason=reason, metrics=result)
                promote = candidate if passed else None
            entry = record(serve, entry, promote)
        finally:
            shutil.rmtree(work / "inputs", ignore_errors=True)  # fetched model copies; candidate and gate.json stay
            shutil.rmtree(work / "drop", ignore_errors=True)
    (log.info if entry["decision"] == "promoted" else log.warning)("run %s: %s (%s)", run_id, entry["decision"], entry["reason"])
    create_markdown_artifact(_report(entry), key="nightly-update", description=f"nightly update {run_id}: {entry['decision']}")
    return {"status": entry["decision"], "reason": entry["reason"], "run_id": run_id, "entry": entry}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slotwise.flows.nightly", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="runs/train", help="base checkpoint (dir or s3://)")
    parser.add_argument("--stats", default="runs/slot_stats", help="slot_stats output of that checkpoint (dir or s3://)")
    parser.add_argument("--data", default="runs/data", help="data stage output (held-out text, triviaqa questions, tasks)")
    parser.add_argument("--drop", default="drop", help="drop location: folder or s3:// prefix of facts *.jsonl")
    parser.add_argument("--serve", default="serve", help="serving directory (registry.json, current/, deltas/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    a = parser.parse_args(argv)
    result = nightly(params=a.params, model=a.model, stats=a.stats, data=a.data, drop=a.drop, serve=a.serve, overrides=a.overrides)
    print(json.dumps({k: v for k, v in result.items() if k != "entry"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
