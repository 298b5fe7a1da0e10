"""Files and directories that readers see whole or not at all, and the sha256 that pins their bytes.

    with staged_dir("runs/train") as tmp:       # fill tmp; on success it replaces runs/train whole
        (tmp / "summary.json").write_text(...)
    with staged_file("serve/registry.json") as tmp:   # the same for one file (fsync'ed, then renamed)
        tmp.write_text(...)
    sha256_file("runs/train/model.safetensors")

Both write into a temporary sibling (`.<name>.tmp-*`, same directory, so the final rename is atomic
on POSIX) and leave the previous version in place when anything fails before the rename.

No gap: an existing directory is replaced by exchanging the two directory entries in one system
call (Linux renameat2 RENAME_EXCHANGE), so `runs/train` is at every instant either the old
directory or the new one, never absent; the old one is then deleted. The output stays a plain
directory (not a symlink to a versioned one: DVC restores cached outputs *through* such a link,
rewriting the version it points to, and never collects the versions). On a file system without
the exchange, two renames are used, and a kill between them is repaired by the next writer of the
same path (the old directory is moved back).

Staging left by a killed run (a 500 MB checkpoint in `.train.tmp-*`) is collected by the next
staged write into the same parent: each live staging entry is flock'ed by its writer, so only
entries whose writer is gone (the lock is free) are removed.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from slotwise.errors import StorageError

log = logging.getLogger(__name__)

_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS}
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically; False if this system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _lock(path: Path) -> int:
    """flock a staging file or directory for as long as the returned descriptor is open."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _abandoned(path: Path) -> bool:
    """True if no live writer holds the staging entry's lock (its writer was killed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return path.is_symlink()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def collect_stale(final: str | Path) -> None:
    """Remove `.<name>.tmp-*` staging entries of killed writers of `final`, and move a directory
    left aside by a kill between the two renames of the fallback back into place."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    stages = sorted(final.parent.glob(f".{final.name}.tmp-*"))
    live = [p for p in stages if not _abandoned(p)]
    for p in stages:
        if p not in live:
            log.info("removing %s, left by a killed run", p)
            _remove(p)
    olds = sorted(final.parent.glob(f".{final.name}.old-*"))
    if olds and not live and not (final.exists() or final.is_symlink()):
        log.warning("%s: missing after a killed replace; restoring the previous version from %s", final, olds[-1].name)
        olds[-1].rename(final)
        olds = olds[:-1]
    for p in olds if not live else []:
        _remove(p)


def replace_dir(stage: Path, final: Path) -> None:
    """Swap the filled directory `stage` into place at `final`; the old one, if any, is removed after."""
    # mkdtemp makes a private (0700) directory; published artifacts get ordinary permissions.
    os.chmod(stage, 0o755)
    for p in stage.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    if not (final.exists() or final.is_symlink()):
        stage.rename(final)
    elif _exchange(stage, final):
        _remove(stage)  # now the old directory
    else:  # no atomic exchange here: a short gap, repaired by collect_stale if killed inside it
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        stage.rename(final)
        _remove(old)


def _write_failure(exc: BaseException, stage: Path) -> str | None:
    """Why writing into `stage` failed (full disk, file size limit, permissions), or None if exc is something else."""
    if isinstance(exc, OSError):  # a failed write() carries no file name, only its errno
        if (str(exc.filename).startswith(str(stage)) if exc.filename else exc.errno in _WRITE_ERRNOS):
            return exc.strerror or str(exc)
        return None
    text = " ".join(str(exc).split())
    # safetensors and torch.save report a failed write as their own exception types, not OSError
    if type(exc).__name__ == "SafetensorError" and "I/O error" in text:
        return re.sub(r" \(os error \d+\)$", "", text.split("I/O error: ", 1)[-1])
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
        return f"torch.save failed: {text[:120]}"
    return None


def _refuse_write(exc: BaseException, stage: Path, final: Path) -> None:
    reason = _write_failure(exc, stage)
    if reason is not None:
        raise StorageError(f"{final}: cannot write it ({reason}); the previous {final.name}, if any, is unchanged") from None


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temporary sibling; on success it replaces
    `final` whole, on any error it is removed and `final` is left as it was."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        collect_stale(final)
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:  # an unwritable or missing parent folder
        raise StorageError(f"{final}: cannot write it ({exc.strerror or exc}); the previous {final.name}, if any, is unchanged") from None
    fd = _lock(stage)
    try:
        yield stage
        replace_dir(stage, final)
    except BaseException as exc:
        _remove(stage)
        _refuse_write(exc, stage, final)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_file(final: str | Path) -> Iterator[Path]:
    """Write a file atomically: write the yielded temporary sibling path; on success it is fsync'ed
    and renamed onto `final` (mode 0644), on any error it is removed and `final` is left as it was."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        collect_stale(final)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    except OSError as exc:
        raise StorageError(f"{final}: cannot write it ({exc.strerror or exc}); the previous {final.name}, if any, is unchanged") from None
    fcntl.flock(fd, fcntl.LOCK_EX)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the rename is the commit: the bytes must be on disk before it
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _refuse_write(exc, tmp, final)
        raise
    finally:
        os.close(fd)
