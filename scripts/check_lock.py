"""Is the committed dvc.lock a record of this tree's code and params? (CI runs it before `make repro`.)

    .venv/bin/python scripts/check_lock.py

`dvc status dvc.yaml` compares every stage of the default pipeline (what `make repro` runs) with the
working tree; other pipelines (pipelines/testbed/dvc.yaml) are experiments whose locks record their last run and are not checked. Pipeline outputs
(runs/...) are absent in a fresh clone and are ignored here; a changed code file or params section
means dvc.lock was not regenerated with the change that made it stale: exit 1, naming them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def stale_deps(status: dict) -> list[str]:
    """'stage: dep' for every changed dependency that is part of the repository (not a run output)."""
    out = []
    for stage, entries in status.items():
        for entry in entries if isinstance(entries, list) else []:
            for dep, change in (entry.get("changed deps") or {}).items() if isinstance(entry, dict) else []:
                if dep.startswith("runs/"):
                    continue
                detail = ", ".join(f"{k} {v}" for k, v in change.items()) if isinstance(change, dict) else change
                out.append(f"{stage}: {dep} ({detail})")
    return out


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    dvc = Path(sys.executable).with_name("dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run([str(dvc), "status", "dvc.yaml", "--json"], cwd=root, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"check_lock: dvc status failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        return 1
    stale = stale_deps(json.loads(res.stdout or "{}"))
    if stale:
        print("check_lock: dvc.lock is stale (regenerate it with `make repro` and commit it with the change):")
        print("\n".join(f"  {s}" for s in stale))
        return 1
    print("check_lock: dvc.lock records this tree's code and params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
