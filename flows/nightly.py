"""The nightly knowledge update: new facts from a drop location -> SMF -> retention gate -> promote or keep.

    python -m slotwise.flows.nightly --params params.yaml --model runs/train --stats runs/slot_stats \\
        --data runs/data --drop drop/ --serve serve/            # one run, now (a local ephemeral Prefect)
    python -m slotwise.flows.serve                              # the same on a cron schedule (flows/serve.py)

Steps (each a Prefect task calling a component with paths; the flow only orchestrates):

    lock       <serve>/.lock, non-blocking: a second concurrent run ends at once ("another update is running")
    list_new   *.jsonl entries under --drop (a local folder or an s3:// prefix) that registry.json does not list
    fetch      a snapshot of each new file (its bytes, read once) and the model / slot table, in a local work folder
    screen     each file validated on its own: a bad one (not a regular file, not UTF-8 JSON lines, a field of the
               wrong type, nothing to train on) is quarantined with a one-line reason; the others go on
    update     `slotwise update`: base checkpoint + served delta, SMF on the good files' facts -> candidate delta
    gate       `slotwise gate`: held-out perplexity, known-fact answers, optional lm-eval tasks; candidate vs served
    record     passed: the candidate becomes the served delta; failed: the served delta stays; either way one
               registry entry (files consumed with their status and reason, metrics, delta hash, decision)

Nothing new -> nothing happens (and the result says so). Rejected and quarantined files count as consumed:
they are not retried the next night (drop them again under a new name to retry); a copy of each quarantined
file is kept in <serve>/quarantine/<run_id>/ (the drop is never modified). A run that fails leaves no
<serve>/runs/<run_id> behind (a killed one's is collected by the next run). The logic lives in
slotwise/continual/ (nightly.py: the drop listing, update and gate; drop.py: snapshots and screening; serving.py: the serving
directory's layout, registry and promotion).
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
from slotwise.config import load_params
from slotwise.continual import serving
from slotwise.continual.drop import load_tokenizer, screen, snapshot
from slotwise.continual.nightly import jsonl_files
from slotwise.flows.tasks import retry_unless_user_error, run_component


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def list_new(drop: str, serve: str) -> list[str]:
    """The drop's *.jsonl files (local paths or s3:// URIs) that no registry entry lists, sorted."""
    seen = serving.consumed(serving.read_registry(serve))
    return [u for u in jsonl_files(drop) if u not in seen]


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def fetch_files(uris: list[str], dest: str) -> list[dict]:
    """Drop files -> snapshots in dest: [{"uri", "path", "sha256"} | {"uri", "reason"} | {"uri", "skipped"}]."""
    return [snapshot(uri, Path(dest) / f"{i:04d}.jsonl") for i, uri in enumerate(uris)]


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def screen_files(files: list[dict], model: str, params: str, overrides: list[str]) -> list[dict]:
    """Each snapshot validated on its own (with the model's tokenizer); a bad one gets a one-line "reason"."""
    return screen(files, load_tokenizer(model), load_params(params, overrides).nightly)


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
def record(serve: str, entry: dict, candidate: str | None, quarantined: list[dict]) -> dict:
    """Keep copies of the quarantined files, commit the run to the registry, promote the candidate when given."""
    copies = serving.quarantine(serve, entry["run_id"], quarantined)
    entry["files"] = [{**f, "copy": copies[f["uri"]]} if f["uri"] in copies else f for f in entry["files"]]
    return serving.record(serve, entry, promote_from=candidate)


def _file_record(f: dict) -> dict:
    """What the registry keeps of a consumed file (never its content)."""
    if "reason" in f:
        return {"uri": f["uri"], "sha256": f.get("sha256"), "status": "quarantined", "reason": f["reason"]}
    return {"uri": f["uri"], "sha256": f["sha256"], "status": "accepted"}


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
        serving.collect_failed_runs(serve)
        new = list_new(drop, serve)
        if not new:
            log.info("nothing new in %s: nothing to do", drop)
            return {"status": "nothing new", "reason": f"no new *.jsonl files in {drop}", "served": str(served) if served else None}
        run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
        work = Path(serve) / "runs" / run_id
        started = serving.now()
        log.info("run %s: %d new file(s) in %s; served: %s", run_id, len(new), drop, served or "the base checkpoint")
        try:
            files = [f for f in fetch_files(new, str(work / "drop")) if "skipped" not in f]
            if not files:
                shutil.rmtree(work, ignore_errors=True)
                return {"status": "nothing new", "reason": "no new file could be read (see the warnings)", "served": str(served) if served else None}
            local_model = localize(model, str(work / "inputs"))
            files = screen_files(files, local_model, params, overrides)
            good = [f for f in files if "reason" not in f]
            paths = [f["path"] for f in good]
            served_s = str(served) if served else None
            candidate = None
            if good:
                local_stats = localize(stats, str(work / "inputs"))
                candidate = update(params, overrides, local_model, served_s, local_stats, paths, str(work / "candidate"))
            entry = {"run_id": run_id, "started_at": started, "files": [_file_record(f) for f in files], "model": model, "stats": stats}
            if candidate is None:
                why = "every new file was quarantined" if not good else "the new files hold no facts"
                entry.update(decision="nothing to learn", reason=why, metrics=None)
                promote = None
            else:
                result = gate(params, overrides, local_model, served_s, candidate, data, paths, str(work / "gate"))
                passed = result["passed"]
                reason = ("every retention metric within {:.1%}".format(result["max_retention_drop"]) if passed
                          else "gate failed: " + "; ".join(result["reasons"]))
                entry.update(decision="promoted" if passed else "rejected", reason=reason, metrics=result)
                promote = candidate if passed else None
            quarantined = [f for f in files if "reason" in f]
            if quarantined:
                entry["reason"] += f" ({len(quarantined)} of {len(files)} file(s) quarantined)"
            entry = record(serve, entry, promote, quarantined)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # a failed run leaves nothing behind; its files stay new
            raise
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
