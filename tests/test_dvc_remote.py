"""The documented DVC remote on S3 (README: `dvc remote add`), against a real S3 server (SeaweedFS),
with the real outputs of a tiny `dvc repro` of this repository's dvc.yaml: push, wipe the cache
and the outputs, pull, and every output file is back, byte for byte.

    .venv/bin/python -m pytest -m s3 tests/test_dvc_remote.py
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _tiny_pipeline import build_inputs
from s3server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def project_copy(root: Path) -> None:
    """dvc.yaml, its plot templates and every code path its stages depend on, next to the tiny inputs;
    .venv links to this interpreter's venv (dvc.yaml's commands run .venv/bin/python)."""
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for dep in {d for s in stages.values() for d in s.get("deps", []) if not d.startswith("runs/")}:
        src, dst = REPO / dep, root / dep
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, dirs_exist_ok=True) if src.is_dir() else shutil.copy(src, dst)
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.s3
def test_pipeline_outputs_round_trip_through_an_s3_remote(s3_env, s3_bucket, tmp_path, smol_tokenizer):
    root = tmp_path / "project"
    root.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def dvc(*args: str, timeout: int = 120) -> str:
        res = subprocess.run([DVC, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"dvc {' '.join(args)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res.stdout

    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    project_copy(root)
    build_inputs(root, smol_tokenizer)
    dvc("repro", timeout=1800)
    # The remote, as the README documents it (an S3-compatible server also needs its endpoint).
    dvc("remote", "add", "-d", "store", f"s3://{s3_bucket}/dvc")
    dvc("remote", "modify", "store", "endpointurl", s3_env.endpoint_url)
    dvc("push", timeout=600)

    cached = [s for s in (root / "runs").iterdir() if s.name != "train_state"]  # train_state: cache: false
    before = {s.name: hashes(s) for s in cached}
    assert {"data", "retrofit", "train", "slot_stats", "continual", "evaluate"} == set(before)
    assert "live/plots/metrics/train/loss.tsv" in before["train"]
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(root / "runs")

    dvc("pull", timeout=600)
    after = {s: hashes(root / "runs" / s) for s in before}
    for stage in before:
        assert after[stage] == before[stage], f"{stage}: pulled files differ from the pushed ones"
    # dvc sees the pulled outputs as the ones dvc.lock records; only the uncached resume state is gone
    assert json.loads(dvc("status", "--json")) == {"train": [{"changed outs": {"runs/train_state": "deleted"}}]}
