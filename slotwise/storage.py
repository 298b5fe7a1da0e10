"""Artifact I/O for stage inputs and outputs that are local paths or ``s3://bucket/prefix`` URIs.

    path = fetch("s3://bucket/runs/retrofit", "work/")   # -> work/retrofit, every file verified
    publish("runs/train", "s3://bucket/runs/train")      # readers never see half of it
    fetch("runs/retrofit", "work/")                      # local paths pass through unchanged

Publishing protocol (S3 has no atomic rename of a "directory", but a single PUT is atomic: a
reader sees the old object or the new one, never a mix):

    <uri>/.v-<UTC timestamp>-<content hash>/<files...>   one immutable version per publish
    <uri>/LATEST                                         the commit marker, written LAST

``LATEST`` is a small JSON object naming the current version and holding its manifest, the
sha256 and size of every file. ``publish`` uploads all files of a directory under a fresh
version prefix, and only when every upload succeeded writes ``LATEST`` (one PUT). A publish that
dies midway leaves ``LATEST`` pointing at the previous version, so readers keep getting the old
artifact whole; the stray version prefix is deleted on a clean failure and is never read either
way. Older versions beyond ``keep`` (default 2: current and previous, so a reader that read the
old pointer a moment ago can still finish) are deleted after the commit. Publishing content
identical to the current version is a no-op.

``fetch`` of a directory follows ``LATEST``, downloads every file of the manifest into a temporary
sibling of the destination, checks each file's sha256 (and, if the directory holds a slotwise
checkpoint ``manifest.json``, every file listed there too), and renames the result into place. It
refuses a prefix that has objects but no ``LATEST`` (a publish never committed, or data not
written by this module), a pointer that does not parse, and any file whose bytes do not match.

A single file is published as one object at ``<uri>`` itself, with its sha256 in the object
metadata (``x-amz-meta-sha256``); ``fetch`` verifies the downloaded bytes against it.

Credentials come from the standard AWS chain (environment, shared config, instance role) through
boto3's default session; the endpoint from ``S3Options.endpoint_url``, else ``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL`` (for SeaweedFS/MinIO; unset means AWS). Secrets are never logged or put in
error messages. Connection errors and throttling are retried a bounded number of times with
exponential backoff; then one ``StorageError`` line names the URI.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path, PurePosixPath

from slotwise.atomic import sha256_file, staged_dir, staged_file
from slotwise.errors import StorageError

log = logging.getLogger(__name__)

SCHEME = "s3://"
POINTER = "LATEST"
VERSION_PREFIX = ".v-"
CHECKPOINT_MANIFEST = "manifest.json"
FORMAT = 1
_VERSION_RE = re.compile(r"^\.v-\d{8}T\d{12}Z-[0-9a-f]{12}$")
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                   "TooManyRequestsException", "RequestTimeout", "InternalError", "ServiceUnavailable"}
_PROGRESS_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None  # default: $AWS_ENDPOINT_URL_S3, then $AWS_ENDPOINT_URL, then AWS
    attempts: int = 5                # tries per request, connection errors and throttling only
    backoff_s: float = 0.5           # first wait; doubles each retry (with jitter), capped below
    max_backoff_s: float = 8.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    require_checksum: bool = True    # refuse a single object that has no sha256 metadata
    progress: bool | None = None     # None: a tqdm bar for transfers over 64 MiB on a terminal


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b/' -> ('bucket', 'a/b')."""
    if not is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    bucket, _, key = str(uri)[len(SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name")
    return bucket, key.strip("/")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))




# ---------------------------------------------------------------------------------------------
# client and retries

def endpoint_url(options: S3Options) -> str | None:
    return options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def client(options: S3Options | None = None):
    """A boto3 S3 client on the default credential chain; retries are ours (see _retry)."""
    options = options or S3Options()
    import boto3
    from botocore.config import Config

    kwargs = dict(retries={"total_max_attempts": 1, "mode": "standard"},
                  connect_timeout=options.connect_timeout_s, read_timeout=options.read_timeout_s,
                  # S3-compatible servers do not all speak the newer CRC checksums; we check sha256.
                  request_checksum_calculation="when_required", response_checksum_validation="when_required")
    endpoint = endpoint_url(options)
    if endpoint:
        kwargs["s3"] = {"addressing_style": "path"}
    try:
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=endpoint, config=Config(**kwargs),
                              region_name=session.region_name or "us-east-1")
    except Exception as exc:  # noqa: BLE001 - bad endpoint, broken AWS config or credential source
        raise StorageError(f"{endpoint or 'AWS S3'}: cannot set up an S3 client: {_describe(exc)}") from exc


def _root_cause(exc: BaseException) -> BaseException:
    # s3transfer wraps client errors of uploads in S3UploadFailedError (implicit chaining).
    from boto3.exceptions import S3UploadFailedError

    if isinstance(exc, S3UploadFailedError) and (exc.__cause__ or exc.__context__) is not None:
        return exc.__cause__ or exc.__context__
    return exc


def _error_code(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def _transient(exc: BaseException) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError

    exc = _root_cause(exc)
    if isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        return True
    code = _error_code(exc)
    return code in _THROTTLE_CODES or code in {"500", "502", "503", "504"}


def _describe(exc: BaseException) -> str:
    from botocore.exceptions import ClientError, NoCredentialsError

    exc = _root_cause(exc)
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role)"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        text = f"{err.get('Code', '?')}: {err.get('Message') or 'no message'}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _sleep(seconds: float) -> None:  # a seam for tests
    time.sleep(seconds)


def _retry(what: str, uri: str, options: S3Options, fn):
    """Call fn(); retry connection errors and throttling with exponential backoff, then StorageError."""
    delay = options.backoff_s
    for attempt in range(1, max(1, options.attempts) + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes one StorageError line
            if not _transient(exc) or attempt >= options.attempts:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise StorageError(f"{uri}: {what} failed{tries}: {_describe(exc)}") from exc
            wait = min(delay, options.max_backoff_s) * (0.5 + random.random() / 2)
            log.warning("%s: %s failed (%s); retry %d/%d in %.1fs", uri, what, _describe(exc),
                        attempt, options.attempts - 1, wait)
            _sleep(wait)
            delay *= 2
    raise AssertionError("unreachable")


def _missing(exc: BaseException) -> bool:
    return _error_code(exc) in {"404", "NoSuchKey", "NotFound"}


# ---------------------------------------------------------------------------------------------
# primitive operations (each one request, retried)

def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4,
                          num_download_attempts=1, preferred_transfer_client="classic")


def _progress(total: int, desc: str, options: S3Options):
    from tqdm.auto import tqdm

    if options.progress is not None:
        disable = not options.progress
    else:  # None: tqdm shows it on a terminal only
        disable = None if total >= _PROGRESS_BYTES else True
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=disable, leave=False)


def _upload_file(c, path: Path, bucket: str, key: str, sha: str, options: S3Options, bar) -> None:
    uri = f"{SCHEME}{bucket}/{key}"
    _retry("upload", uri, options, lambda: c.upload_file(
        str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha}}, Config=_transfer_config(),
        Callback=bar.update))


def _download_file(c, bucket: str, key: str, dest: Path, options: S3Options, bar) -> None:
    uri = f"{SCHEME}{bucket}/{key}"
    _retry("download", uri, options, lambda: c.download_file(bucket, key, str(dest), Config=_transfer_config(),
                                                             Callback=bar.update))


def _head(c, bucket: str, key: str, options: S3Options) -> dict | None:
    def call():
        try:
            return c.head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            if _missing(exc):
                return None
            raise
    return _retry("head", f"{SCHEME}{bucket}/{key}", options, call) if key else None


def _read_pointer(c, bucket: str, key: str, options: S3Options) -> dict | None:
    uri = f"{SCHEME}{bucket}/{_join(key, POINTER)}"

    def call():
        try:
            return c.get_object(Bucket=bucket, Key=_join(key, POINTER))["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if _missing(exc):
                return None
            raise
    raw = _retry("read commit marker", uri, options, call)
    if raw is None:
        return None
    try:
        pointer = json.loads(raw)
        version, files = pointer["version"], pointer["files"]
        assert _VERSION_RE.match(version) and isinstance(files, dict)
        for rel, meta in files.items():
            _safe_rel(rel)
            assert re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]) and isinstance(meta["size"], int)
    except Exception:  # noqa: BLE001
        raise StorageError(f"{uri}: commit marker is not a valid slotwise pointer; refusing this artifact") from None
    return pointer


def _keys(c, bucket: str, prefix: str, options: S3Options) -> list[str]:
    def call():
        out = []
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out
    return _retry("list", f"{SCHEME}{bucket}/{prefix}", options, call)


def _delete(c, bucket: str, keys: list[str], options: S3Options) -> None:
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i:i + 1000]]
        _retry("delete", f"{SCHEME}{bucket}/{keys[i]}", options,
               lambda: c.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}))


def _safe_rel(rel: str) -> PurePosixPath:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or rel != p.as_posix():
        raise ValueError(rel)
    return p


# ---------------------------------------------------------------------------------------------
# public API

def exists(uri: str | os.PathLike, options: S3Options | None = None) -> bool:
    """A local path exists, or an S3 URI is a committed directory or a single object."""
    if not is_s3(uri):
        return Path(uri).exists()
    options = options or S3Options()
    c, (bucket, key) = client(options), split_s3(str(uri))
    return _read_pointer(c, bucket, key, options) is not None or _head(c, bucket, key, options) is not None


def list_prefix(uri: str | os.PathLike, options: S3Options | None = None) -> list[str]:
    """Every object (as an s3:// URI) under a prefix, or every file under a local directory."""
    if not is_s3(uri):
        root = Path(uri)
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    options = options or S3Options()
    bucket, key = split_s3(str(uri))
    return [f"{SCHEME}{bucket}/{k}" for k in _keys(client(options), bucket, _join(key) + "/" if key else "", options)]


def fetch(uri: str | os.PathLike, local_dir: str | os.PathLike, options: S3Options | None = None) -> Path:
    """Local path -> itself. s3:// URI -> local_dir/<last URI segment>, a verified copy (see module doc).

    An earlier copy at that path is replaced whole; give URIs that share a last segment their own
    local_dir.
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    pointer = _read_pointer(c, bucket, key, options)
    if pointer is not None:
        return _fetch_dir(c, uri, bucket, key, pointer, dest, options)
    head = _head(c, bucket, key, options)
    if head is not None:
        return _fetch_file(c, uri, bucket, key, head, dest, options)
    if _keys(c, bucket, _join(key) + "/" if key else "", options):
        raise StorageError(f"{uri}: objects but no {POINTER} commit marker (an unfinished publish, or not "
                           f"written by slotwise.storage); refusing to read it")
    raise StorageError(f"{uri}: not found")


def _fetch_file(c, uri, bucket, key, head, dest: Path, options: S3Options) -> Path:
    expected = head.get("Metadata", {}).get("sha256")
    if expected is None and options.require_checksum:
        raise StorageError(f"{uri}: object has no sha256 metadata (not published by slotwise.storage); "
                           f"refusing to read it unverified")
    with staged_file(dest) as tmp:
        with _progress(head.get("ContentLength", 0), dest.name, options) as bar:
            _download_file(c, bucket, key, tmp, options, bar)
        if expected is not None and sha256_file(tmp) != expected:
            raise StorageError(f"{uri}: sha256 does not match the object's metadata (corrupted or modified "
                               f"object); refusing it")
        if dest.is_dir():
            shutil.rmtree(dest)
    return dest


def _fetch_dir(c, uri, bucket, key, pointer: dict, dest: Path, options: S3Options) -> Path:
    version, files = pointer["version"], pointer["files"]
    with staged_dir(dest) as stage:
        total = sum(meta["size"] for meta in files.values())
        with _progress(total, dest.name, options) as bar:
            for rel, meta in sorted(files.items()):
                obj = _join(key, version, rel)
                target = stage / _safe_rel(rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    _download_file(c, bucket, obj, target, options, bar)
                except StorageError as exc:
                    if exc.__cause__ is not None and _missing(_root_cause(exc.__cause__)):
                        raise StorageError(f"{uri}/{rel}: listed in {POINTER} ({version}) but missing on the "
                                           f"server; refusing this artifact") from None
                    raise
                if target.stat().st_size != meta["size"] or sha256_file(target) != meta["sha256"]:
                    raise StorageError(f"{uri}/{rel}: sha256 does not match the published manifest ({SCHEME}"
                                       f"{bucket}/{obj} is corrupted or modified); refusing this artifact")
        _verify_checkpoint_manifest(stage, uri)
    log.info("%s: fetched %s (%d files) -> %s", uri, version, len(files), dest)
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
        with _progress(local.stat().st_size, local.name, options) as bar:
            _upload_file(c, local, bucket, key, sha, options, bar)
        log.info("%s: published %s (sha256 %s)", uri, local, sha[:12])
        return uri
    return _publish_dir(c, local, uri, bucket, key, options, keep)


def _publish_dir(c, local: Path, uri, bucket, key, options: S3Options, keep: int) -> str:
    paths = sorted(p for p in local.rglob("*") if p.is_file())
    files = {p.relative_to(local).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in paths}
    current = _read_pointer(c, bucket, key, options)
    if current is not None and current["files"] == files:
        log.info("%s: unchanged (%s), nothing to publish", uri, current["version"])
        return uri
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    version = f"{VERSION_PREFIX}{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S%f}Z-{digest[:12]}"
    uploaded: list[str] = []
    try:
        with _progress(sum(m["size"] for m in files.values()), local.name, options) as bar:
            for path in paths:
                rel = path.relative_to(local).as_posix()
                obj = _join(key, version, rel)
                uploaded.append(obj)  # before the call: a failed multipart upload may leave the key
                _upload_file(c, path, bucket, obj, files[rel]["sha256"], options, bar)
        pointer = {"format": FORMAT, "version": version, "files": files,
                   "published_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        body = json.dumps(pointer, indent=1, sort_keys=True).encode()
        _retry("write commit marker", f"{uri}/{POINTER}", options, lambda: c.put_object(
            Bucket=bucket, Key=_join(key, POINTER), Body=body, ContentType="application/json"))
    except BaseException as exc:
        try:
            _delete(c, bucket, uploaded, options)
        except Exception:  # noqa: BLE001 - an unreferenced version prefix is harmless
            log.warning("%s: could not delete the uncommitted %s", uri, version)
        if isinstance(exc, StorageError):
            raise StorageError(f"{exc} (publish of {local} not committed; {uri} is unchanged)") from exc
        if isinstance(exc, Exception):
            raise StorageError(f"{uri}: publish of {local} failed, not committed ({_describe(exc)}); "
                               f"{uri} is unchanged") from exc
        raise
    log.info("%s: published %s (%d files) as %s", uri, local, len(files), version)
    _collect_garbage(c, uri, bucket, key, keep, options)
    return uri


def _collect_garbage(c, uri, bucket, key, keep: int, options: S3Options) -> None:
    """Delete all but the newest `keep` committed versions (best effort)."""
    try:
        prefix = _join(key) + "/"
        by_version: dict[str, list[str]] = {}
        for k in _keys(c, bucket, prefix, options):
            first = k[len(prefix):].split("/", 1)[0]
            if _VERSION_RE.match(first):
                by_version.setdefault(first, []).append(k)
        stale = sorted(by_version)[:-max(1, keep)]
        _delete(c, bucket, [k for v in stale for k in by_version[v]], options)
    except StorageError as exc:
        log.warning("%s: old versions not cleaned up: %s", uri, exc)


def _publish_local(local: Path, dest: Path) -> None:
    if dest.exists() and dest.resolve() == local.resolve():
        return
    if local.is_file():
        with staged_file(dest) as tmp:
            shutil.copyfile(local, tmp)
        return
    with staged_dir(dest) as stage:
        shutil.copytree(local, stage, dirs_exist_ok=True)


__all__ = ["StorageError", "S3Options", "is_s3", "split_s3", "fetch", "publish", "exists", "list_prefix", "client"]
