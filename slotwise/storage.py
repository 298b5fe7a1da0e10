"""Artifact I/O for stage inputs and outputs that are local paths or ``s3://bucket/prefix`` URIs.

    path = fetch("s3://bucket/runs/retrofit", "work/")   # -> work/retrofit, every file verified
    publish("runs/train", "s3://bucket/runs/train")      # readers never see half of it
    fetch("runs/retrofit", "work/")                      # local paths pass through unchanged
    fetch("s3://bucket/synced", "work/", S3Options(allow_unpublished=True))   # `aws s3 sync` output, unverified

Publishing protocol (S3 has no atomic rename of a "directory", and no library gives one; a single
PUT is atomic: a reader sees the old object or the new one, never a mix):

    <uri>/.v-<UTC timestamp>-<content hash>/<files...>   one immutable version per publish
    <uri>/LATEST                                         the commit record, written LAST

``LATEST`` is a small JSON object naming the current version, holding its manifest (sha256 and size
of every file) and the history of the versions it named before (newest first). ``publish``
uploads the files under a fresh version prefix and only then writes ``LATEST``, conditionally on
the ``LATEST`` it read (If-Match / If-None-Match: a concurrent publisher that committed meanwhile is
never silently overwritten). A publish that dies midway leaves ``LATEST`` as it was. Publishing
content identical to the current version is a no-op.

Cleanup (after each commit, best effort) orders versions by the commit record, never by clocks in
names: it keeps what ``LATEST`` names and the ``keep - 1`` versions before it (at least the previous
one, so a reader that read the old record a moment ago can finish), deletes older committed
versions, and collects prefixes no commit ever named (a killed publish) and unfinished multipart
uploads once they are older than ``orphan_grace_s`` — measured on the server's clock, against the
commit's own time, so a publish still uploading is left alone.

``fetch`` of a directory follows ``LATEST``, downloads every file of the manifest into a temporary
sibling of the destination, checks each file's size and sha256 (and, if the directory holds a
slotwise checkpoint ``manifest.json``, every file listed there too), and swaps the result into
place. It refuses a prefix with objects but no ``LATEST``, a record that does not parse, and any
file whose bytes do not match. A single file is one object at ``<uri>`` with its sha256 in the
object metadata (``x-amz-meta-sha256``), checked after download. Data not published by this module
(a plain prefix, an object without that metadata) is read only with ``allow_unpublished=True``
(CLI: ``--s3-unpublished``), with a warning; a checkpoint among it is still checked against its
own manifest.

The libraries do the rest: boto3/botocore resolve credentials (the standard AWS chain) and the
endpoint (``S3Options.endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / the
config file, else AWS; custom endpoints get path-style addressing) and retry throttling, 5xx and
connection errors (``retry_mode`` standard or adaptive, ``attempts`` in total); s3transfer moves
single files (multipart when large) and s3fs moves the files of a directory, concurrently. Every
failure ends as one ``StorageError`` line naming the URI; secrets are never logged.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from slotwise.atomic import sha256_file, staged_dir, staged_file
from slotwise.errors import StorageError
from slotwise.s3 import (SCHEME, S3Options, abort_uploads, call, client, delete, describe, error_code, get_files, is_s3, join,
                         objects, prefix, progress, put_files as _put_files, safe_rel, split_s3)

log = logging.getLogger(__name__)

POINTER = "LATEST"
VERSION_PREFIX = ".v-"
CHECKPOINT_MANIFEST = "manifest.json"
FORMAT = 1
HISTORY = 10  # earlier versions a commit record remembers
_VERSION_RE = re.compile(r"^\.v-\d{8}T\d{12}Z-[0-9a-f]{12}$")


# ---------------------------------------------------------------------------------------------
# the commit record

def _read_pointer(c, bucket: str, key: str) -> tuple[dict, str, _dt.datetime] | None:
    """(LATEST, its ETag, its server time) or None if there is none."""
    uri = f"{SCHEME}{bucket}/{join(key, POINTER)}"
    got = call("read commit record", uri, lambda: c.get_object(Bucket=bucket, Key=join(key, POINTER)), missing=None)
    if got is None:
        return None
    raw = call("read commit record", uri, lambda: got["Body"].read())
    try:
        pointer = json.loads(raw)
        version, files, history = pointer["version"], pointer["files"], pointer.get("history", [])
        assert _VERSION_RE.match(version) and isinstance(files, dict) and isinstance(history, list)
        assert all(isinstance(v, str) and _VERSION_RE.match(v) for v in history)
        for rel, meta in files.items():
            safe_rel(rel)
            assert re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]) and isinstance(meta["size"], int)
    except Exception:  # noqa: BLE001
        raise StorageError(f"{uri}: commit record is not a valid slotwise LATEST; refusing this artifact") from None
    return pointer, got.get("ETag", ""), got["LastModified"]


# ---------------------------------------------------------------------------------------------
# public API

def exists(uri: str | os.PathLike, options: S3Options | None = None) -> bool:
    """A local path exists, or an S3 URI is a committed directory or a single object."""
    if not is_s3(uri):
        return Path(uri).exists()
    c, (bucket, key) = client(options), split_s3(str(uri))
    if _read_pointer(c, bucket, key) is not None:
        return True
    return bool(key) and call("head", str(uri), lambda: c.head_object(Bucket=bucket, Key=key), missing=None) is not None


def list_prefix(uri: str | os.PathLike, options: S3Options | None = None) -> list[str]:
    """Every object (as an s3:// URI) under a prefix, or every file under a local directory."""
    if not is_s3(uri):
        root = Path(uri)
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    bucket, key = split_s3(str(uri))
    return [f"{SCHEME}{bucket}/{o['Key']}" for o in objects(client(options), bucket, prefix(key))]


def fetch(uri: str | os.PathLike, local_dir: str | os.PathLike, options: S3Options | None = None) -> Path:
    """Local path -> itself. s3:// URI -> local_dir/<last URI segment>, a verified copy (see module doc).

    An earlier copy at that path is replaced whole; give URIs that share a last segment their own local_dir.
    """
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise FileNotFoundError(f"{uri}: no such file or directory")
        return path
    uri = str(uri).rstrip("/")
    options = options or S3Options()
    c, (bucket, key) = client(options), split_s3(uri)
    dest = Path(local_dir) / (key.rsplit("/", 1)[-1] if key else bucket)
    committed = _read_pointer(c, bucket, key)
    if committed is not None:
        return _fetch_dir(uri, bucket, key, committed[0], dest, options)
    head = call("head", uri, lambda: c.head_object(Bucket=bucket, Key=key), missing=None) if key else None
    if head is not None:
        return _fetch_file(c, uri, bucket, key, head, dest, options)
    found = [o for o in objects(c, bucket, prefix(key)) if not o["Key"].endswith("/")]
    if not found:
        raise StorageError(f"{uri}: not found")
    if not options.allow_unpublished:
        raise StorageError(f"{uri}: objects but no {POINTER} commit record (an unfinished publish, or not written by "
                           f"slotwise.storage); refusing to read it (--s3-unpublished reads it unverified)")
    return _fetch_plain(uri, bucket, key, found, dest, options)


def _fetch_file(c, uri, bucket, key, head, dest: Path, options: S3Options) -> Path:
    expected = head.get("Metadata", {}).get("sha256")
    if expected is None:
        if not options.allow_unpublished:
            raise StorageError(f"{uri}: object has no sha256 metadata (not published by slotwise.storage); refusing to "
                               f"read it unverified (--s3-unpublished reads it anyway)")
        log.warning("%s: no sha256 metadata; read unverified (allow_unpublished)", uri)
    with staged_file(dest) as tmp:
        with progress(head.get("ContentLength", 0), dest.name, options) as bar:
            call("download", uri, lambda: c.download_file(bucket, key, str(tmp), Callback=bar.update))
        if expected is not None and sha256_file(tmp) != expected:
            raise StorageError(f"{uri}: sha256 does not match the object's metadata (corrupted or modified object); refusing it")
        if dest.is_dir():
            shutil.rmtree(dest)
    return dest


def _fetch_dir(uri, bucket, key, pointer: dict, dest: Path, options: S3Options) -> Path:
    version, files = pointer["version"], pointer["files"]
    with staged_dir(dest) as stage:
        pairs = [(f"{bucket}/{join(key, version, rel)}", stage / safe_rel(rel)) for rel in sorted(files)]
        try:
            get_files(uri, pairs, sum(m["size"] for m in files.values()), dest.name, options)
        except FileNotFoundError:
            raise StorageError(f"{uri}: a file listed in {POINTER} ({version}) is missing on the server; refusing this artifact") from None
        for rel, meta in sorted(files.items()):
            target = stage / rel
            if target.stat().st_size != meta["size"] or sha256_file(target) != meta["sha256"]:
                raise StorageError(f"{uri}/{rel}: sha256 does not match the published manifest ({SCHEME}{bucket}/"
                                   f"{join(key, version, rel)} is corrupted or modified); refusing this artifact")
        _verify_checkpoint_manifest(stage, uri)
    log.info("%s: fetched %s (%d files) -> %s", uri, version, len(files), dest)
    return dest


def _fetch_plain(uri, bucket, key, listed: list[dict], dest: Path, options: S3Options) -> Path:
    """Every object under a prefix no slotwise publish wrote (opt-in): sizes checked, no sha256 to check."""
    log.warning("%s: no %s commit record; reading its %d objects unverified (allow_unpublished)", uri, POINTER, len(listed))
    base = prefix(key)
    with staged_dir(dest) as stage:
        try:
            pairs = [(f"{bucket}/{o['Key']}", stage / safe_rel(o["Key"][len(base):])) for o in listed]
        except ValueError as exc:
            raise StorageError(f"{uri}: object name {exc} would leave the destination; refusing it") from None
        try:
            get_files(uri, pairs, sum(o["Size"] for o in listed), dest.name, options)
        except FileNotFoundError:
            raise StorageError(f"{uri}: an object vanished while it was read; try again") from None
        for o, (_, path) in zip(listed, pairs):
            if path.stat().st_size != o["Size"]:
                raise StorageError(f"{uri}/{o['Key'][len(base):]}: size differs from the listing (modified while read)")
        _verify_checkpoint_manifest(stage, uri)
    return dest


def _verify_checkpoint_manifest(root: Path, uri: str) -> None:
    """A slotwise checkpoint's own manifest.json ({file: sha256}) is checked too, when there is one."""
    path = root / CHECKPOINT_MANIFEST
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return
    if not isinstance(manifest, dict) or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                                                 for v in manifest.values()):
        return  # some other kind of manifest.json
    for name, digest in manifest.items():
        f = root / name
        if not f.is_file() or sha256_file(f) != digest:
            raise StorageError(f"{uri}/{name}: does not match the artifact's {CHECKPOINT_MANIFEST}; refusing it")


def publish(local_path: str | os.PathLike, uri: str | os.PathLike, options: S3Options | None = None,
            keep: int = 2) -> str:
    """Upload a file or directory to uri so that readers see the old artifact or the new one, whole.

    A local destination gets an atomic copy (or nothing, if it is local_path itself). Returns uri.
    keep: committed versions kept (at least 2: the current one and the one before it).
    """
    local = Path(local_path)
    if not local.exists():
        raise FileNotFoundError(f"{local}: no such file or directory")
    if local.is_dir():  # never publish a checkpoint that is already inconsistent
        _verify_checkpoint_manifest(local, str(local))
    if not is_s3(uri):
        _publish_local(local, Path(uri))
        return str(uri)
    uri = str(uri).rstrip("/")
    options = options or S3Options()
    c, (bucket, key) = client(options), split_s3(uri)
    if not key:
        raise StorageError(f"{uri}: publish needs a key or prefix inside the bucket")
    if local.is_file():
        sha = sha256_file(local)
        with progress(local.stat().st_size, local.name, options) as bar:
            call("upload", uri, lambda: c.upload_file(str(local), bucket, key, ExtraArgs={"Metadata": {"sha256": sha}},
                                                       Callback=bar.update))
        log.info("%s: published %s (sha256 %s)", uri, local, sha[:12])
        return uri
    return _publish_dir(c, local, uri, bucket, key, options, max(2, keep))


def _publish_dir(c, local: Path, uri, bucket, key, options: S3Options, keep: int) -> str:
    paths = sorted(p for p in local.rglob("*") if p.is_file())
    files = {p.relative_to(local).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in paths}
    current = _read_pointer(c, bucket, key)
    if current is not None and current[0]["files"] == files:
        log.info("%s: unchanged (%s), nothing to publish", uri, current[0]["version"])
        return uri
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    version = f"{VERSION_PREFIX}{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S%f}Z-{digest[:12]}"
    history = ([current[0]["version"]] + current[0].get("history", []))[:HISTORY] if current is not None else []
    try:
        pairs = [(p, f"{bucket}/{join(key, version, p.relative_to(local).as_posix())}") for p in paths]
        _put_files(uri, pairs, sum(m["size"] for m in files.values()), local.name, options)
        record = {"format": FORMAT, "version": version, "files": files, "history": history,
                  "published_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        _commit(c, uri, bucket, key, json.dumps(record, indent=1, sort_keys=True).encode(), current[1] if current else None)
    except BaseException as exc:
        _discard(c, uri, bucket, prefix(join(key, version)))
        if isinstance(exc, StorageError):
            raise StorageError(f"{exc} (publish of {local} not committed; {uri} is unchanged)") from exc
        if isinstance(exc, Exception):
            raise StorageError(f"{uri}: publish of {local} failed, not committed ({describe(exc)}); {uri} is unchanged") from exc
        raise
    log.info("%s: published %s (%d files) as %s", uri, local, len(files), version)
    collect(uri, keep, options)
    return uri


def _commit(c, uri: str, bucket: str, key: str, body: bytes, etag: str | None) -> None:
    """Write LATEST only if it is still the one read before the upload (a concurrent commit is not overwritten)."""
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    put = lambda **cond: c.put_object(Bucket=bucket, Key=join(key, POINTER), Body=body,  # noqa: E731
                                      ContentType="application/json", **cond)
    try:
        put(**condition)
    except Exception as exc:  # noqa: BLE001
        code = error_code(exc)
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            raise StorageError(f"{uri}: another publish committed {POINTER} meanwhile; this one was not committed "
                               f"(publish again)") from None
        if code not in ("NotImplemented", "501"):
            raise StorageError(f"{uri}/{POINTER}: write commit record failed: {describe(exc)}") from exc
        log.warning("%s: the server does not support conditional writes; committing unconditionally", uri)
        call("write commit record", f"{uri}/{POINTER}", put)


def _discard(c, uri: str, bucket: str, prefix: str) -> None:
    """Best effort: delete an uncommitted version prefix and abort its unfinished multipart uploads."""
    try:
        delete(c, bucket, [o["Key"] for o in objects(c, bucket, prefix)])
        abort_uploads(c, bucket, prefix, lambda up: True)
    except Exception:  # noqa: BLE001 - an unreferenced prefix is never read; the next cleanup collects it
        log.warning("%s: could not delete the uncommitted %s (the next publish collects it)", uri, prefix)


def collect(uri: str, keep: int = 2, options: S3Options | None = None) -> list[str]:
    """Delete what no reader can need under a published prefix (see module doc); returns the deleted
    version prefixes. Never touches what LATEST names or the keep - 1 versions it names before."""
    options, keep = options or S3Options(), max(2, keep)
    c, (bucket, key) = client(options), split_s3(uri)
    base = prefix(key)
    try:
        committed = _read_pointer(c, bucket, key)  # read again: another publisher may have committed since
        if committed is None:
            return []
        pointer, _, commit_time = committed
        kept = {pointer["version"], *pointer["history"][:keep - 1]}
        superseded = set(pointer["history"][keep - 1:])
        versions: dict[str, list[dict]] = {}
        for o in objects(c, bucket, base):
            first = o["Key"][len(base):].split("/", 1)[0]
            if first.startswith(VERSION_PREFIX) and "/" in o["Key"][len(base):]:
                versions.setdefault(first, []).append(o)

        def orphaned(when: _dt.datetime) -> bool:  # server clock against server clock
            return (commit_time - when).total_seconds() >= options.orphan_grace_s

        stale = sorted(v for v, objs in versions.items() if v not in kept and
                       (v in superseded or orphaned(max(o["LastModified"] for o in objs))))
        delete(c, bucket, [o["Key"] for v in stale for o in versions[v]])
        aborted = abort_uploads(c, bucket, base, lambda u: u["Key"][len(base):].split("/", 1)[0] not in kept
                                 and orphaned(u["Initiated"]))
        if stale or aborted:
            log.info("%s: collected %d old or orphaned version(s), aborted %d unfinished upload(s)", uri, len(stale), aborted)
        return stale
    except StorageError as exc:
        log.warning("%s: old versions not cleaned up: %s", uri, exc)
        return []


def _publish_local(local: Path, dest: Path) -> None:
    if dest.exists() and dest.resolve() == local.resolve():
        return
    if local.is_file():
        with staged_file(dest) as tmp:
            shutil.copyfile(local, tmp)
        return
    with staged_dir(dest) as stage:
        shutil.copytree(local, stage, dirs_exist_ok=True)


__all__ = ["StorageError", "S3Options", "is_s3", "split_s3", "fetch", "publish", "collect", "exists", "list_prefix",
           "client", "filesystem"]
