"""Prefect flows: the nightly knowledge update (gate, promotion, registry, lock, S3 drop) and the pipeline.

Flows run against a temporary Prefect API (prefect_test_harness) on the tiny world of test_update.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from s3server import s3_bucket, s3_env, s3_server  # noqa: E402,F401
from slotwise import storage  # noqa: E402
from slotwise.config import ConfigError  # noqa: E402
from slotwise.continual.delta import load_delta  # noqa: E402
from slotwise.flows import nightly as nightly_mod  # noqa: E402
from slotwise.flows import pipeline as pipeline_mod  # noqa: E402
from slotwise.continual import serving  # noqa: E402
from test_update import BREAK, QA, facts, jsonl, make_world, poison_facts  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def base_world(tmp_path_factory, smol_tokenizer):
    return make_world(tmp_path_factory.mktemp("flows"), smol_tokenizer)


@pytest.fixture
def world(base_world, tmp_path):
    """A fresh drop and serving dir per test (model, stats and data shared)."""
    drop = tmp_path / "drop"
    jsonl(drop / "batch1.jsonl", facts(QA[:2], "batch1"))
    return {**base_world, "drop": drop, "serve": tmp_path / "serve"}


def run(w, overrides=None, drop=None) -> dict:
    return nightly_mod.nightly(params=str(w["params"]), model=str(w["model"]), stats=str(w["stats"]), data=str(w["data"]),
                               drop=str(drop or w["drop"]), serve=str(w["serve"]), overrides=overrides or [])


def tree_hash(path: Path) -> str:
    """sha256 over the relative names and bytes of every file under path (symlinks followed)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_a_passing_gate_promotes_and_a_run_with_nothing_new_does_nothing(world):
    first = run(world)
    assert first["status"] == "promoted", first
    serve = world["serve"]
    reg = json.loads((serve / "registry.json").read_text())
    (entry,) = reg["entries"]
    assert reg["served"] == f"deltas/{first['run_id']}" == entry["served_after"] and entry["served_before"] is None
    assert [f["uri"] for f in entry["files"]] == [str((world["drop"] / "batch1.jsonl").resolve())]
    assert entry["delta"]["sha256"] == hashlib.sha256((serve / reg["served"] / "delta.safetensors").read_bytes()).hexdigest()
    assert entry["metrics"]["passed"] and "heldout_ppl" in entry["metrics"]["drops"]
    assert os.readlink(serve / "current") == reg["served"] and load_delta(serve / "current").meta["updates"] == 1
    before = tree_hash(serve / "current"), (serve / "registry.json").read_bytes()
    again = run(world)
    assert again["status"] == "nothing new"
    assert (tree_hash(serve / "current"), (serve / "registry.json").read_bytes()) == before
    # A second batch stacks on the served delta.
    jsonl(world["drop"] / "batch2.jsonl", facts(QA[2:], "batch2"))
    second = run(world)
    assert second["status"] == "promoted" and second["entry"]["served_before"] == reg["served"]
    assert load_delta(serve / "current").meta["updates"] == 2


def test_a_failing_gate_leaves_the_served_delta_unchanged(world):
    assert run(world)["status"] == "promoted"
    serve = world["serve"]
    served_hash, link = tree_hash(serve / "current"), os.readlink(serve / "current")
    jsonl(world["drop"] / "batch2.jsonl", poison_facts())
    result = run(world, overrides=BREAK)
    assert result["status"] == "rejected" and "heldout_ppl dropped" in result["reason"]
    assert tree_hash(serve / "current") == served_hash and os.readlink(serve / "current") == link
    reg = json.loads((serve / "registry.json").read_text())
    assert reg["served"] == link and [e["decision"] for e in reg["entries"]] == ["promoted", "rejected"]
    rejected = reg["entries"][-1]
    assert rejected["served_after"] == rejected["served_before"] == link and "delta" not in rejected
    assert (serve / "runs" / rejected["run_id"] / "candidate" / "delta.json").is_file()  # kept for inspection
    assert run(world)["status"] == "nothing new"  # rejected files are consumed, not retried


def test_a_second_run_while_one_holds_the_lock_does_nothing(world):
    with serving.serving_lock(world["serve"]) as holder:
        assert holder is None
        result = run(world)
    assert result["status"] == "skipped" and "another update is running" in result["reason"]
    assert not (world["serve"] / "registry.json").exists()


def test_two_concurrent_runs_promote_once(world, monkeypatch):
    real, barrier, results = nightly_mod.run_component, threading.Barrier(2), [None, None]

    def slow(stage, args):  # whoever gets the lock holds it long enough for the other to try
        time.sleep(3)
        return real(stage, args)

    monkeypatch.setattr(nightly_mod, "run_component", slow)

    def go(i):
        barrier.wait()
        results[i] = run(world)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(r["status"] for r in results) == ["promoted", "skipped"], results
    assert "another update is running" in next(r["reason"] for r in results if r["status"] == "skipped")
    reg = json.loads((world["serve"] / "registry.json").read_text())
    assert [e["decision"] for e in reg["entries"]] == ["promoted"]


def test_a_corrupt_registry_is_refused_and_nothing_is_consumed(world):
    world["serve"].mkdir(parents=True)
    (world["serve"] / "registry.json").write_text('{"format": 1, "served": nul')
    with pytest.raises(serving.RegistryError, match="not valid JSON"):
        run(world)


def test_a_user_error_fails_at_once_without_retries(world, monkeypatch):
    calls, params_read = [], []
    real, real_params = nightly_mod.run_component, nightly_mod.load_params

    def counting(stage, args):
        calls.append(stage)
        return real(stage, args)

    def counting_params(*a, **k):
        params_read.append(a)
        return real_params(*a, **k)

    monkeypatch.setattr(nightly_mod, "run_component", counting)
    monkeypatch.setattr(nightly_mod, "load_params", counting_params)
    with pytest.raises(ConfigError, match=r"nightly.smf.*top_t"):
        run(world, overrides=["nightly.smf.top_t=0"])
    assert len(params_read) == 1 and calls == []  # the screen task has retries=1, but bad params are not retried
    assert not serving.read_registry(world["serve"])["entries"]  # nothing recorded: the files stay new
    assert not (world["serve"] / "runs").exists() or not any((world["serve"] / "runs").iterdir())  # nothing left behind


def test_bad_drop_files_are_quarantined_and_the_good_ones_learned(world, tmp_path, caplog):
    """One drop with two good files and every kind of bad one: the good facts are promoted the same night,
    each bad file is recorded with a one-line reason (no content), a copy kept, and none is retried."""
    drop = world["drop"]
    jsonl(drop / "batch2.jsonl", facts(QA[2:], "batch2"))
    good = facts(QA[:1], "x")[0]
    secret = "SECRET-CONTENT-7f3a"
    bad = {
        "malformed.jsonl": (b'{"id": "' + secret.encode() + b'", "answers": [\n', "not valid JSON"),
        "latin1.jsonl": (b'{"id": "caf\xe9 ' + secret.encode() + b'"}\n', "not UTF-8"),
        "probe_null.jsonl": (json.dumps({**good, "probe": None, "id": secret}).encode() + b"\n", "field 'probe'"),
        "answers_int.jsonl": (json.dumps({**good, "answers": [123]}).encode() + b"\n", "field 'answers'"),
    }
    for name, (body, _) in bad.items():
        (drop / name).write_bytes(body)
    os.mkfifo(drop / "pipe.jsonl")
    (drop / "folder.jsonl").mkdir()
    outside = tmp_path / "outside.jsonl"
    jsonl(outside, facts(QA[:1], "outside"))
    (drop / "link.jsonl").symlink_to(outside)
    expected = {**{n: why for n, (_, why) in bad.items()}, "pipe.jsonl": "a FIFO", "folder.jsonl": "a directory",
                "link.jsonl": "a symbolic link"}
    caplog.set_level("INFO")
    result = run(world)
    assert result["status"] == "promoted", result
    files = {Path(f["uri"]).name: f for f in result["entry"]["files"]}
    assert {n for n, f in files.items() if f["status"] == "accepted"} == {"batch1.jsonl", "batch2.jsonl"}
    for name, why in expected.items():
        f = files[name]
        assert f["status"] == "quarantined" and why in f["reason"] and "\n" not in f["reason"], f
        assert f["reason"].startswith(str(drop.resolve() / name)), f  # names the drop file, not a snapshot
    registry_text = (world["serve"] / "registry.json").read_text()
    assert secret not in registry_text and secret not in caplog.text and "\\xe9" not in caplog.text
    copies = {n: world["serve"] / f["copy"] for n, f in files.items() if "copy" in f}
    assert set(copies) == set(bad) and all(copies[n].read_bytes() == bad[n][0] for n in bad)
    assert load_delta(world["serve"] / "current").meta["update"]["n_facts"] == 4  # both good files, learned
    assert run(world)["status"] == "nothing new"  # quarantined files are consumed: not retried
    assert outside.is_file() and (drop / "pipe.jsonl").exists()  # the drop (and what links point to) untouched


def test_a_drop_of_only_bad_files_is_recorded_as_nothing_to_learn(world):
    (world["drop"] / "batch1.jsonl").write_bytes(b"\xff\xfe\n")
    result = run(world)
    assert result["status"] == "nothing to learn" and "every new file was quarantined" in result["reason"]
    assert serving.read_registry(world["serve"])["served"] is None
    assert run(world)["status"] == "nothing new"


def test_a_failed_run_leaves_no_run_folder_and_a_killed_ones_is_collected(world, monkeypatch):
    killed = world["serve"] / "runs" / "20260101T000000Z-dead00"
    (killed / "candidate").mkdir(parents=True)  # what a run killed before it recorded leaves

    def broken(stage, args):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(nightly_mod, "run_component", broken)
    monkeypatch.setattr(nightly_mod, "update", nightly_mod.update.with_options(retries=0))
    with pytest.raises(RuntimeError, match="worker lost"):
        run(world)
    assert not any((world["serve"] / "runs").iterdir())
    assert not serving.read_registry(world["serve"])["entries"]  # the files stay new for the next night


@pytest.mark.s3
def test_nightly_with_the_drop_location_on_s3(world, s3_env, s3_bucket):
    prefix = f"s3://{s3_bucket}/drop"
    for i, batch in enumerate((QA[:2], QA[2:])):
        path = jsonl(world["serve"].parent / f"local{i}.jsonl", facts(batch, f"b{i}"))
        s3_env.client().upload_file(str(path), s3_bucket, f"drop/night{i}.jsonl")  # a plain upload, no sha256 metadata
    s3_env.client().put_object(Bucket=s3_bucket, Key="drop/.hidden/skip.jsonl", Body=b"not json")
    result = run(world, drop=prefix)
    assert result["status"] == "promoted"
    files = result["entry"]["files"]
    assert [f["uri"] for f in files] == [f"{prefix}/night0.jsonl", f"{prefix}/night1.jsonl"]
    assert load_delta(world["serve"] / "current").meta["update"]["n_facts"] == 4
    assert run(world, drop=prefix)["status"] == "nothing new"
    assert storage.list_prefix(prefix)  # the drop is read, never modified


# ---- the pipeline flow -------------------------------------------------------------------------

def test_pipeline_runs_the_stages_in_order_with_paths_and_retries(monkeypatch, tmp_path):
    calls, failed = [], set()

    def fake(stage, args):
        calls.append((stage, args))
        if stage == "train" and stage not in failed:  # one transient failure: retried
            failed.add(stage)
            raise RuntimeError("worker lost")
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(pipeline_mod, "run_component", fake)
    monkeypatch.setattr(pipeline_mod, "stage", pipeline_mod.stage.with_options(retry_delay_seconds=0))
    result = pipeline_mod.pipeline(params="p.yaml", runs=str(tmp_path / "runs"))
    order = [s for s, _ in calls]
    assert order == ["data", "retrofit", "train", "train", "slot_stats", "continual", "evaluate"]
    args = dict(calls)
    runs = tmp_path / "runs"
    assert args["slot_stats"] == ["--params", "p.yaml", "--model", str(runs / "train"), "--data", str(runs / "data"),
                                  "--out", str(runs / "slot_stats")]
    assert args["continual"][args["continual"].index("--stats") + 1] == str(runs / "slot_stats")
    assert result == {s: str(runs / s) for s in pipeline_mod.STAGES}


def test_pipeline_does_not_retry_bad_params(monkeypatch, tmp_path):
    calls = []

    def fake(stage, args):
        calls.append(stage)
        raise ConfigError("p.yaml: key 'data.n_facts': expected a positive integer")

    monkeypatch.setattr(pipeline_mod, "run_component", fake)
    monkeypatch.setattr(pipeline_mod, "stage", pipeline_mod.stage.with_options(retry_delay_seconds=0))
    with pytest.raises(ConfigError):
        pipeline_mod.pipeline(params="p.yaml", runs=str(tmp_path / "runs"))
    assert calls == ["data"]


# ---- deployment: a local Prefect server, the nightly flow served on a cron, one triggered run ----

def test_prefect_yaml_deployments_point_at_the_flows():
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    repo = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((repo / "prefect.yaml").read_text())
    names = {d["name"]: d for d in spec["deployments"]}
    assert names["nightly"]["schedules"][0]["cron"] and names["nightly"]["concurrency_limit"] == 1
    for d in spec["deployments"]:
        assert d["work_pool"]["name"] in ("slotwise-process", "slotwise-gpu")
        f = load_flow_from_entrypoint(str(repo / d["entrypoint"]))
        assert set(d["parameters"]) <= set(f.parameters.properties), d["name"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, proc=None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f} s; {log.read_text()[-3000:] if log else ''}")


@pytest.mark.slow
def test_served_deployment_runs_on_a_local_prefect_server(world, tmp_path):
    """`prefect server start` + `python -m slotwise.flows.serve` (cron) + run_deployment -> Completed, promoted."""
    import subprocess
    import sys
    import urllib.request

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": url,
           "PYTHONPATH": str(Path(__file__).parent)}
    procs = []
    try:
        server_log = tmp_path / "server.log"
        with open(server_log, "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                           "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        _wait(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, 90, "prefect server", procs[0], server_log)
        serve_log = tmp_path / "serve.log"
        with open(serve_log, "wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "slotwise.flows.serve", "--name", "test", "--cron", "0 2 * * *",
                 "--params", str(world["params"]), "--model", str(world["model"]), "--stats", str(world["stats"]),
                 "--data", str(world["data"]), "--drop", str(world["drop"]), "--serve", str(world["serve"])],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        with temporary_settings({PREFECT_API_URL: url}):
            from prefect.client.orchestration import get_client

            def deployed():
                with get_client(sync_client=True) as c:
                    d = c.read_deployment_by_name("nightly-knowledge-update/test")
                    return d if d.schedules else None

            dep = _wait(deployed, 120, "deployment", procs[1], serve_log)
            assert dep.schedules[0].schedule.cron == "0 2 * * *"
            run = run_deployment("nightly-knowledge-update/test", timeout=240)
            assert run.state.is_completed(), (run.state, serve_log.read_text()[-3000:])
        reg = json.loads((world["serve"] / "registry.json").read_text())
        assert [e["decision"] for e in reg["entries"]] == ["promoted"]
    finally:
        import signal

        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
