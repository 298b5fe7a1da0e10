"""slotwise.atomic: a replaced output directory is never absent, and staging of killed runs is collected."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slotwise import atomic
from slotwise.atomic import collect_stale, staged_dir, staged_file

# Replace `final` (holding old.txt = "old") by a directory holding new.txt = "new"; the process
# SIGKILLs itself right after the first rename that moves `final` away (the moment a two-rename swap has
# taken the old directory out and not yet put the new one in). EXCHANGE=0 disables the atomic swap.
KILL_AT_RENAME_OF_FINAL = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from slotwise import atomic
    final = Path(sys.argv[1]).resolve()
    if sys.argv[2] == "0":
        atomic._exchange = lambda a, b: False
    real_os, real_path = os.rename, Path.rename
    def die_if_final(src):
        if Path(src).resolve() == final:
            os.kill(os.getpid(), signal.SIGKILL)
    def os_rename(src, dst, *a, **k):
        real_os(src, dst, *a, **k)
        die_if_final(src)
    def path_rename(self, target):
        out = real_path(self, target)
        die_if_final(self)
        return out
    os.rename, Path.rename = os_rename, path_rename
    with atomic.staged_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
""")


def _old_output(tmp_path: Path) -> Path:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    return final


def _run(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_a_replaced_directory_is_never_absent(tmp_path):
    """Killed at the moment a two-rename swap would leave no output, the output is still whole.

    (Before the exchange, publish was `final -> .old`, `stage -> final`: this kill left no `out`.)"""
    final = _old_output(tmp_path)
    proc = _run(KILL_AT_RENAME_OF_FINAL, final, 1)
    assert proc.returncode == 0, proc.stderr[-2000:]  # the exchange never renames `final` away
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old directory is gone too


def test_without_the_exchange_a_kill_between_the_renames_is_repaired(tmp_path):
    final = _old_output(tmp_path)
    proc = _run(KILL_AT_RENAME_OF_FINAL, final, 0)
    assert proc.returncode == -signal.SIGKILL
    assert not final.exists()  # the gap of the fallback ...
    collect_stale(final)       # ... which the next writer of the path (staged_dir) repairs first
    assert (final / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_fallback_replaces_the_directory(tmp_path, monkeypatch):
    final = _old_output(tmp_path)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with staged_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILLED_WHILE_STAGING = textwrap.dedent("""
    import os, signal, sys
    from slotwise import atomic
    with atomic.staged_dir(sys.argv[1]) as tmp:
        (tmp / "weights.bin").write_bytes(b"x" * 4096)
        os.kill(os.getpid(), signal.SIGKILL)
""")

# Holds a staging directory open (a live writer) until its stdin closes.
LIVE_WRITER = textwrap.dedent("""
    import sys
    from slotwise import atomic
    with atomic.staged_dir(sys.argv[1]) as tmp:
        (tmp / "weights.bin").write_bytes(b"y")
        print(tmp, flush=True)
        sys.stdin.read()
""")


def test_staging_of_a_killed_run_is_collected_by_the_next_write(tmp_path):
    final = _old_output(tmp_path)
    assert _run(KILLED_WHILE_STAGING, final).returncode == -signal.SIGKILL
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and (stale[0] / "weights.bin").is_file()  # left behind by the kill
    assert (final / "old.txt").read_text() == "old"
    live = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(final)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live_stage = Path(live.stdout.readline().strip())
        with staged_dir(final) as tmp:
            (tmp / "new.txt").write_text("new")
        assert not stale[0].exists()  # the dead writer's staging is gone
        assert (live_stage / "weights.bin").is_file()  # a live writer's is not touched
    finally:
        live.communicate("", timeout=60)
    assert live.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_stale_temporary_file_is_collected(tmp_path):
    code = textwrap.dedent("""
        import os, signal, sys
        from slotwise import atomic
        with atomic.staged_file(sys.argv[1]) as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    final = tmp_path / "registry.json"
    final.write_text("{}")
    assert _run(code, final).returncode == -signal.SIGKILL
    assert len(list(tmp_path.iterdir())) == 2
    with staged_file(final) as tmp:
        tmp.write_text('{"a": 1}')
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"] and final.read_text() == '{"a": 1}'


def test_a_failed_write_leaves_the_old_directory_and_no_staging(tmp_path):
    final = _old_output(tmp_path)
    with pytest.raises(RuntimeError):
        with staged_dir(final) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


TERMINATED_STAGE = """
import sys, time
sys.path.insert(0, sys.argv[2])
from components._cli import run_cli
from slotwise.atomic import staged_dir

def main(args):
    with staged_dir(sys.argv[1]) as tmp:
        (tmp / "weights.bin").write_bytes(b"x" * 1024)
        print("staged", flush=True)
        time.sleep(60)
    return 0

run_cli(main, [])
"""


def test_a_component_stopped_with_sigterm_leaves_no_staging(tmp_path):
    """run_cli turns SIGTERM into an exit that unwinds: the staging folder is removed, the output never appears."""
    final = tmp_path / "out"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", TERMINATED_STAGE, str(final), str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "staged"
    assert len(list(tmp_path.glob(".out.tmp-*"))) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert list(tmp_path.iterdir()) == []
