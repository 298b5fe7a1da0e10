"""The nightly update's drop files: take a snapshot of each new one, screen each on its own.

    uris = jsonl_files("drop/")                           # slotwise.continual.nightly: every *.jsonl entry, sorted
    files = [snapshot(u, work / f"{i:04d}.jsonl") for i, u in enumerate(uris)]
    files = screen(files, load_tokenizer("runs/train"), params.nightly)   # a bad file gets a one-line "reason"

One bad file must not stop the night: each file is read and validated alone, and a file that fails
(not a regular file — a symlink, a FIFO, a folder named *.jsonl —, not UTF-8, not JSON lines, a
field of the wrong type, an answer found in none of its texts) is set aside with a one-line reason
naming the file, the line and the field, never the content. The good files are learned that night.

A snapshot is the bytes read once (from a local drop without following links, or fetched from
S3), so what is validated, learned and hashed into the registry are the same bytes even if the
drop file changes meanwhile.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from slotwise import storage
from slotwise.config import NightlyParams
from slotwise.errors import CheckpointError, DataError, StorageError
from slotwise.sources import open_regular

log = logging.getLogger(__name__)


def snapshot(uri: str, dest: Path) -> dict:
    """Copy one drop file's bytes to dest -> {"uri", "path", "sha256"}; {"uri", "reason"} if it cannot
    be a fact file; {"uri", "skipped"} if it could not be read tonight (an S3 error: tried again next run)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if storage.is_s3(uri):  # drop objects are plain uploads: no sha256 metadata to check
            path = storage.fetch(uri, dest.with_name(dest.name + ".d"), storage.S3Options(allow_unpublished=True))
            path.rename(dest)
        else:
            with open_regular(uri, follow_symlinks=False) as f:
                dest.write_bytes(f.read())
    except DataError as exc:
        return {"uri": uri, "reason": str(exc)}
    except StorageError as exc:
        log.warning("%s: not read tonight (%s); it stays new", uri, exc)
        return {"uri": uri, "skipped": str(exc)}
    return {"uri": uri, "path": str(dest), "sha256": hashlib.sha256(dest.read_bytes()).hexdigest()}


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved with a slotwise checkpoint (what the update trains with)."""
    from transformers import AutoTokenizer

    if not (Path(model_dir) / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer saved with the checkpoint")
    return AutoTokenizer.from_pretrained(model_dir)


def screen(files: list[dict], tokenizer, n: NightlyParams) -> list[dict]:
    """Validate each snapshot alone (read_facts' checks + a training batch per fact); a bad one gets
    a "reason" (its snapshot path replaced by its URI). Returns the records, in order."""
    from slotwise.continual.nightly import read_facts, trainable_batch

    out = []
    for f in files:
        if "path" in f:
            try:
                for fact in read_facts([Path(f["path"])], n.include_statement):
                    trainable_batch(fact, tokenizer, n)
            except DataError as exc:
                f = {**f, "reason": str(exc).replace(f["path"], f["uri"])}
        if "reason" in f:
            log.warning("quarantined %s", f["reason"])
        out.append(f)
    return out


__all__ = ["snapshot", "screen", "load_tokenizer"]
