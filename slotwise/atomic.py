"""Files and directories that readers see whole or not at all, and the sha256 that pins their bytes.

    with staged_dir("runs/train") as tmp:       # fill tmp; on success it replaces runs/train whole
        (tmp / "summary.json").write_text(...)
    with staged_file("serve/registry.json") as tmp:   # the same for one file (fsync'ed, then renamed)
        tmp.write_text(...)
    sha256_file("runs/train/model.safetensors")

Both write into a temporary sibling (same directory, so the final rename is atomic on POSIX) and
leave the previous version in place when anything fails before the rename.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_dir(stage: Path, final: Path) -> None:
    """Swap the filled directory `stage` into place at `final` (the old one, if any, is removed after the rename)."""
    # mkdtemp makes a private (0700) directory; published artifacts get ordinary permissions.
    os.chmod(stage, 0o755)
    for p in stage.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    stage.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temporary sibling; on success it replaces
    `final` whole, on any error it is removed and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    replace_dir(stage, final)


@contextlib.contextmanager
def staged_file(final: str | Path) -> Iterator[Path]:
    """Write a file atomically: write the yielded temporary sibling path; on success it is fsync'ed
    and renamed onto `final` (mode 0644), on any error it is removed and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the rename is the commit: the bytes must be on disk before it
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
