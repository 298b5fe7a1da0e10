"""DVC outputs a user can trust, on the real outputs of a tiny pipeline run (`tiny_runs`, conftest.py):

- a stage run twice on the same inputs writes the same bytes (no timings, devices or load-time
  flags in cached outputs), file by file;
- every plot dvc.yaml registers renders through `dvc plots show` with data in its x and y fields;
- `dvc metrics show` lists a few named numbers per stage.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _tiny_pipeline import run_stages

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
CHEAP = ("data", "retrofit", "train", "slot_stats")


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rerun(first: Path, tmp_path: Path, stages) -> Path:
    """The same stages on a copy of the first run's inputs (same relative paths, as under dvc repro)."""
    second = tmp_path / "again"
    second.mkdir()
    shutil.copytree(first / "base", second / "base")
    shutil.copy(first / "params.yaml", second / "params.yaml")
    if stages[0] != "data":  # later stages read the earlier outputs of the first run
        shutil.copytree(first / "runs", second / "runs", ignore=shutil.ignore_patterns(*stages))
    run_stages(second, stages)
    return second


def assert_same_bytes(first: Path, second: Path, stages) -> None:
    for stage in stages:
        a, b = hashes(first / "runs" / stage), hashes(second / "runs" / stage)
        assert a.keys() == b.keys(), f"{stage}: different files {sorted(a.keys() ^ b.keys())}"
        differ = [name for name in a if a[name] != b[name]]
        assert not differ, f"{stage}: files whose bytes changed between two runs on the same inputs: {differ}"


def test_cheap_stages_write_the_same_bytes_twice(tiny_runs, tmp_path):
    second = rerun(tiny_runs, tmp_path, CHEAP)
    assert_same_bytes(tiny_runs, second, CHEAP)
    # and the run-dependent facts are not in them
    runs = tiny_runs / "runs"
    for summary in ("retrofit/summary.json", "train/summary.json", "slot_stats/summary.json"):
        keys = set(json.loads((runs / summary).read_text()))
        assert not keys & {"device", "seconds", "tokens_per_second", "load_seconds", "seconds_per_step"}, summary
    assert "local_files_only" not in json.loads((runs / "retrofit/tokenizer_config.json").read_text())


@pytest.mark.slow
def test_continual_and_evaluate_write_the_same_bytes_twice(tiny_runs, tmp_path):
    second = rerun(tiny_runs, tmp_path, ("continual", "evaluate"))
    assert_same_bytes(tiny_runs, second, ("continual", "evaluate"))


def test_a_saved_tokenizer_does_not_record_how_it_was_loaded(tmp_path, smol_tokenizer):
    """transformers keeps from_pretrained's local_files_only (True under HF_HUB_OFFLINE=1, else False)
    in init_kwargs and writes it into tokenizer_config.json."""
    import copy

    from conftest import small_llama
    from slotwise.checkpoint import save_checkpoint

    model = small_llama(len(smol_tokenizer))
    written = []
    for offline in (True, False):
        tok = copy.deepcopy(smol_tokenizer)
        tok.init_kwargs["local_files_only"] = offline  # as loading with or without HF_HUB_OFFLINE leaves it
        tok.save_pretrained(tmp_path / f"plain{offline}")
        assert json.loads((tmp_path / f"plain{offline}" / "tokenizer_config.json").read_text())["local_files_only"] is offline
        save_checkpoint(model, tok, tmp_path / f"ckpt{offline}", None)
        written.append((tmp_path / f"ckpt{offline}" / "tokenizer_config.json").read_bytes())
    assert written[0] == written[1]
    assert json.loads(written[0])["eos_token"] == smol_tokenizer.eos_token  # the rest is kept


# ---------------------------------------------------------------- dvc plots / metrics


@pytest.fixture(scope="module")
def dvc_workspace(tiny_runs, tmp_path_factory) -> Path:
    """A DVC project (no git) with this repository's dvc.yaml, params and plot templates, and the tiny run's outputs."""
    ws = tmp_path_factory.mktemp("dvcws")
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=ws, check=True)
    shutil.copy(REPO / "dvc.yaml", ws)
    shutil.copy(REPO / "params.yaml", ws)
    shutil.copytree(REPO / ".dvc" / "plots", ws / ".dvc" / "plots", dirs_exist_ok=True)
    shutil.copytree(tiny_runs / "runs", ws / "runs")
    return ws


def dvc_json(ws: Path, *args: str) -> dict:
    proc = subprocess.run([DVC, *args, "--json"], cwd=ws, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_every_registered_plot_renders_with_its_x_and_y(dvc_workspace):
    shown = dvc_json(dvc_workspace, "plots", "show")
    assert not shown.get("errors"), shown["errors"]
    plots = shown["data"]
    for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]:
        name, props = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        if name.endswith(".png"):
            assert plots[name][0]["type"] == "image", name
            continue
        assert "x" in props, f"{name}: no explicit x"
        rendered = plots.get(name) or [p for key, ps in plots.items() if key.startswith(name + "/") for p in ps]
        assert rendered, f"{name}: nothing rendered"
        for plot in rendered:
            spec = plot["content"]
            rows = spec["data"]["values"]
            assert rows, f"{name}: no data"
            for axis in ("x", "y"):
                field = axis_field(spec, axis)
                assert all(field in row and row[field] not in (None, "") for row in rows), f"{name}: {axis} field {field!r} missing in data"
            assert axis_field(spec, "x") == props["x"]


def axis_field(spec: dict, axis: str) -> str:
    """The data field a Vega-Lite spec puts on an axis (DVC's linear template sets y in its first layer)."""
    for enc in [spec.get("encoding", {})] + [layer.get("encoding", {}) for layer in spec.get("layer", [])]:
        if axis in enc and "field" in enc[axis]:
            return enc[axis]["field"]
    raise AssertionError(f"no {axis} field in {spec.get('title')}")


def test_scores_are_bars_by_task_and_usage_is_one_line_per_table(dvc_workspace):
    plots = dvc_json(dvc_workspace, "plots", "show")["data"]
    scores = plots["evaluate_scores"][0]["content"]
    assert scores["mark"]["type"] == "bar"
    assert scores["encoding"]["y"] == {"field": "task", "type": "nominal", "title": "task"}  # a category, not a number
    assert {r["task"] for r in scores["data"]["values"]} == {"arc_easy", "facts"}
    usage = plots["slot_usage"][0]["content"]
    assert usage["encoding"]["color"]["field"] == "table"
    assert usage["encoding"]["x"]["scale"]["type"] == "log"
    assert {r["table"] for r in usage["data"]["values"]} == {"layer1"}
    continual = [k for k in plots if k.startswith("runs/continual/live/plots/metrics/")]
    assert {Path(k).parent.name for k in continual} == {"smf_tfidf", "full_ft"}
    assert {Path(k).stem for k in continual} == {"learned", "known_kept", "acquisition_f1", "heldout_ppl"}


def test_metrics_show_lists_a_few_named_numbers_per_stage(dvc_workspace):
    shown = dvc_json(dvc_workspace, "metrics", "show")
    files = next(iter(shown.values()))["data"]
    metrics = {path: data["data"] for path, data in files.items()}

    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items() for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(f"{prefix}{k}", v)])}

    assert set(flat(metrics["runs/train/metrics.json"])) == {"heldout_ppl.before", "heldout_ppl.memory_on", "heldout_ppl.memory_off"}
    assert set(flat(metrics["runs/train/live/metrics.json"])) == {"step", "train.loss", "train.balance", "eval.loss"}
    assert set(flat(metrics["runs/slot_stats/metrics.json"])) == {"layer1.coverage", "layer1.effective_slots", "layer1.read_df_fraction"}
    continual = json.loads((dvc_workspace / "runs/continual/metrics.json").read_text())
    assert {run: set(m) for run, m in continual.items()} == {run: {"learned", "known_drop", "heldout_ppl_rise"}
                                                             for run in ("smf_tfidf", "full_ft")}
    # (the tiny model answers no screened question, so known_drop is null and DVC leaves it out)
    assert set(flat(metrics["runs/continual/metrics.json"])) == {f"{run}.{k}" for run, m in continual.items()
                                                                 for k, v in m.items() if v is not None}
    assert set(flat(metrics["runs/evaluate/metrics.json"])) == {"arc_easy.acc_norm", "heldout_ppl.memory_on",
                                                                "heldout_ppl.memory_off", "facts.exact_match"}
