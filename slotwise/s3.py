"""S3 access for slotwise.storage, on the libraries: boto3/botocore for requests, s3fs for the files of a directory.

    c = client(S3Options())                    # credentials: the standard AWS chain; endpoint and retries: botocore's
    put_files(uri, [(Path("a"), "bucket/k/a")], total, "a", options)   # concurrent uploads (s3fs)
    call("list", uri, lambda: c.list_objects_v2(...))                   # any failure -> one StorageError line

botocore resolves the endpoint (``S3Options.endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` / the config file, else AWS; a custom endpoint gets path-style addressing)
and retries throttling, 5xx and connection errors (``retry_mode`` standard or adaptive, ``attempts``
in total); s3transfer (single files, multipart when large) and s3fs (many files at once) sit on the
same settings. Nothing here retries by hand. Secrets are never logged or put in messages.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePosixPath

from slotwise.errors import StorageError

SCHEME = "s3://"
_PROGRESS_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None   # None: botocore's own (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, config file), else AWS
    retry_mode: str = "standard"      # botocore retry mode: standard | adaptive (adds client-side rate limiting)
    attempts: int = 5                 # attempts per request in total (botocore's total_max_attempts)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    allow_unpublished: bool = False   # read a prefix without LATEST / an object without sha256 metadata, unverified
    orphan_grace_s: float = 24 * 3600  # an uncommitted version prefix or multipart upload older than this is collected
    progress: bool | None = None      # None: a tqdm bar for transfers over 64 MiB on a terminal


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


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def botocore_config(options: S3Options) -> dict:
    return dict(retries={"mode": options.retry_mode, "total_max_attempts": max(1, options.attempts)},
                connect_timeout=options.connect_timeout_s, read_timeout=options.read_timeout_s,
                # S3-compatible servers do not all speak the newer CRC checksums; sha256 is checked here.
                request_checksum_calculation="when_required", response_checksum_validation="when_required")


def client(options: S3Options | None = None):
    """A boto3 S3 client: the default credential chain, botocore's endpoint resolution and retries."""
    options = options or S3Options()
    import boto3
    from botocore.config import Config

    try:
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=options.endpoint_url, config=Config(**botocore_config(options)),
                              region_name=session.region_name or "us-east-1")
    except Exception as exc:  # noqa: BLE001 - bad endpoint, broken AWS config or credential source
        raise StorageError(f"{options.endpoint_url or 'S3'}: cannot set up an S3 client: {describe(exc)}") from exc


def filesystem(options: S3Options | None = None):
    """An s3fs file system on the same chain and retry settings (recursive, concurrent transfers)."""
    options = options or S3Options()
    import s3fs

    try:
        return s3fs.S3FileSystem(endpoint_url=options.endpoint_url, skip_instance_cache=True, use_listings_cache=False,
                                 config_kwargs=botocore_config(options))
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{options.endpoint_url or 'S3'}: cannot set up an S3 file system: {describe(exc)}") from exc


def root_cause(exc: BaseException) -> BaseException:
    """The botocore error under s3transfer's and s3fs's wrappers."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen = exc
    while not isinstance(seen, (ClientError, BotoCoreError)) and (seen.__cause__ or seen.__context__) is not None:
        seen = seen.__cause__ or seen.__context__
    return seen if isinstance(seen, (ClientError, BotoCoreError)) else exc


def error_code(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    exc = root_cause(exc)
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def not_found(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError) or error_code(exc) in {"404", "NoSuchKey", "NotFound"}


def describe(exc: BaseException) -> str:
    from botocore.exceptions import ClientError, NoCredentialsError

    exc = root_cause(exc)
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role)"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        text = f"{err.get('Code', '?')}: {err.get('Message') or 'no message'}" + (f" (after {attempts + 1} attempts)" if attempts else "")
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def call(what: str, uri: str, fn, missing=Ellipsis):
    """fn() with every failure turned into one StorageError line; `missing` is returned for a 404."""
    try:
        return fn()
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore has retried what is worth retrying
        if missing is not Ellipsis and not_found(exc):
            return missing
        raise StorageError(f"{uri}: {what} failed: {describe(exc)}") from exc


def safe_rel(rel: str) -> PurePosixPath:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or rel != p.as_posix():
        raise ValueError(rel)
    return p


def progress(total: int, desc: str, options: S3Options, unit: str = "B"):
    from tqdm.auto import tqdm

    disable = (not options.progress) if options.progress is not None else (None if total >= _PROGRESS_BYTES else True)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024, disable=disable, leave=False)


def objects(c, bucket: str, prefix: str) -> list[dict]:
    """Every object under a key prefix: [{"Key", "Size", "LastModified"}]."""
    def listing():
        return [o for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])]
    return call("list", f"{SCHEME}{bucket}/{prefix}", listing)


def delete(c, bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i:i + 1000]]
        call("delete", f"{SCHEME}{bucket}/{keys[i]}", lambda: c.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}))


def prefix(key: str) -> str:
    return join(key) + "/" if key else ""


def get_files(uri: str, pairs: list[tuple[str, Path]], total: int, desc: str, options: S3Options) -> None:
    """Download [(bucket/key, local path)] concurrently (s3fs); a missing object raises FileNotFoundError."""
    for _, local in pairs:
        local.parent.mkdir(parents=True, exist_ok=True)
    fs = filesystem(options)
    with progress(total, desc, options) as bar:
        for i in range(0, len(pairs), 64):  # batches: a progress step each, bounded open connections
            chunk = pairs[i:i + 64]
            try:
                fs.get([r for r, _ in chunk], [str(p) for _, p in chunk])
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise StorageError(f"{uri}: download failed: {describe(exc)}") from exc
            bar.update(sum(p.stat().st_size for _, p in chunk))


def put_files(uri: str, pairs: list[tuple[Path, str]], total: int, desc: str, options: S3Options) -> None:
    """Upload [(local path, bucket/key)] concurrently (s3fs; large files in multipart uploads)."""
    fs = filesystem(options)
    with progress(total, desc, options) as bar:
        for i in range(0, len(pairs), 64):
            chunk = pairs[i:i + 64]
            call("upload", uri, lambda: fs.put([str(p) for p, _ in chunk], [r for _, r in chunk]))
            bar.update(sum(p.stat().st_size for p, _ in chunk))


def abort_uploads(c, bucket: str, prefix: str, stale) -> int:
    ups = call("list multipart uploads", f"{SCHEME}{bucket}/{prefix}",
                lambda: [u for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
                         for u in page.get("Uploads", [])])
    ups = [u for u in ups if stale(u)]
    for u in ups:
        call("abort multipart upload", f"{SCHEME}{bucket}/{u['Key']}",
              lambda: c.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]))
    return len(ups)


__all__ = ["S3Options", "StorageError", "SCHEME", "is_s3", "split_s3", "join", "client", "filesystem", "call", "describe",
           "error_code", "not_found", "safe_rel", "progress", "objects", "delete", "prefix", "get_files", "put_files", "abort_uploads"]
