"""The serving directory of the nightly update: served delta, promotion registry, lock.

    <serve>/registry.json            the promotion registry and the commit point (see below)
    <serve>/deltas/<run_id>/         every promoted delta (each cumulative: base checkpoint -> served)
    <serve>/current -> deltas/<id>   symlink to the served delta, repointed after the registry commits
    <serve>/runs/<run_id>/           each recorded run's candidate delta and gate.json (kept for the record)
    <serve>/quarantine/<run_id>/     a copy of each drop file that run quarantined (the drop is never modified)
    <serve>/.lock                    flock'ed (non-blocking) for the whole nightly run

registry.json: {"format": 1, "served": "deltas/<run_id>" | null, "entries": [entry, ...]}; one entry
per run that consumed files: run_id, started_at, finished_at, decision (promoted | rejected |
nothing to learn), reason, files [{uri, sha256, status: accepted | quarantined, reason, copy}],
metrics (gate.json), delta {path, sha256, new_hash, base_hash, rows}, served_before, served_after.
"New" files are those no entry lists.

Promotion order, so a crash anywhere leaves a consistent state: copy the candidate into
deltas/<run_id> (atomic directory swap), then replace registry.json (write a temporary file,
fsync, rename: the commit), then repoint `current` (atomic symlink replace). A run killed before
the commit leaves the served delta and the registry as they were (an orphan under deltas/ is
never read); killed after it, the next run repairs `current` from the registry.

The serving directory must be a local or shared POSIX file system (flock); the drop location and
the model may be on S3.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from slotwise import storage
from slotwise.atomic import sha256_file, staged_file
from slotwise.continual.delta import META, WEIGHTS
from slotwise.errors import RegistryError

log = logging.getLogger(__name__)

REGISTRY = "registry.json"
LOCK = ".lock"
FORMAT = 1


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextmanager
def serving_lock(serve: str | Path) -> Iterator[str | None]:
    """Hold <serve>/.lock exclusively. Yields None when held, else who holds it (the caller must not proceed)."""
    serve = Path(serve)
    serve.mkdir(parents=True, exist_ok=True)
    with open(serve / LOCK, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            yield f.read().strip() or "unknown holder"
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} since {now()}\n")
            f.flush()
            yield None
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_registry(serve: str | Path) -> dict:
    path = Path(serve) / REGISTRY
    if not path.is_file():
        return {"format": FORMAT, "served": None, "entries": []}
    try:
        reg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); refusing to guess what is served") from None
    if not isinstance(reg, dict) or reg.get("format") != FORMAT or not isinstance(reg.get("entries"), list):
        raise RegistryError(f"{path}: not a slotwise promotion registry (format {FORMAT} with 'served' and 'entries')")
    if reg.get("served") and not (Path(serve) / reg["served"] / META).is_file():
        raise RegistryError(f"{path}: the served delta {reg['served']} is missing from {serve}")
    return reg


def write_registry(serve: str | Path, reg: dict) -> None:
    """Replace registry.json atomically (temporary file, fsync, rename)."""
    with staged_file(Path(serve) / REGISTRY) as tmp:
        tmp.write_text(json.dumps(reg, indent=1) + "\n")


def served_delta(serve: str | Path) -> Path | None:
    """The directory of the served delta, per the registry (None: the base checkpoint is served)."""
    reg = read_registry(serve)
    return Path(serve) / reg["served"] if reg["served"] else None


def consumed(reg: dict) -> set[str]:
    return {f["uri"] for e in reg["entries"] for f in e.get("files", [])}


def _point_current(serve: Path, target: str | None) -> None:
    link = serve / "current"
    if target is None:
        if link.is_symlink():
            link.unlink()
        return
    if link.is_symlink() and os.readlink(link) == target:
        return
    tmp = serve / f".current.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def repair_current(serve: str | Path) -> Path | None:
    """Make `current` point where the registry says (after a run killed between commit and repoint)."""
    reg = read_registry(serve)
    _point_current(Path(serve), reg["served"])
    return served_delta(serve)


def collect_failed_runs(serve: str | Path) -> None:
    """Remove runs/<run_id> folders that no registry entry names (runs killed before they recorded).
    Call while holding serving_lock (so none of them is a live run)."""
    runs = Path(serve) / "runs"
    if not runs.is_dir():
        return
    recorded = {e.get("run_id") for e in read_registry(serve)["entries"]}
    for d in runs.iterdir():
        if d.name not in recorded:
            log.info("removing %s, left by a run that did not finish", d)
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() and not d.is_symlink() else d.unlink()


def quarantine(serve: str | Path, run_id: str, files: list[dict]) -> dict[str, str]:
    """Copy each quarantined snapshot ({"uri", "path"} of a regular file) to quarantine/<run_id>/;
    returns {uri: the copy's path relative to serve}."""
    copies = {}
    for i, f in enumerate(x for x in files if x.get("path")):
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f["uri"].rstrip("/").rsplit("/", 1)[-1])[:100]
        rel = Path("quarantine") / run_id / f"{i:04d}-{name}"
        (Path(serve) / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f["path"], Path(serve) / rel)
        copies[f["uri"]] = str(rel)
    return copies


def delta_record(delta_dir: Path, serve: Path) -> dict:
    meta = json.loads((delta_dir / META).read_text())
    return {"path": str(delta_dir.relative_to(serve)) if delta_dir.is_relative_to(serve) else str(delta_dir),
            "sha256": sha256_file(delta_dir / WEIGHTS), "base_hash": meta["base_hash"], "new_hash": meta["new_hash"],
            "rows": {k: v["n_rows"] for k, v in meta["pools"].items()}}


def record(serve: str | Path, entry: dict, promote_from: str | Path | None = None) -> dict:
    """Append an entry to the registry; with promote_from (a delta directory), serve that delta.

    Call while holding serving_lock. Returns the entry as recorded.
    """
    serve = Path(serve)
    reg = read_registry(serve)
    entry = {**entry, "served_before": reg["served"], "finished_at": now()}
    if promote_from is not None:
        target = f"deltas/{entry['run_id']}"
        storage.publish(promote_from, serve / target)  # local destination: an atomic directory copy
        entry["delta"] = delta_record(serve / target, serve)
        reg["served"] = target
    entry["served_after"] = reg["served"]
    reg["entries"].append(entry)
    write_registry(serve, reg)  # the commit point
    _point_current(serve, reg["served"])
    return entry
