"""slotwise.storage against a real S3 server (SeaweedFS on 127.0.0.1): round trips, refusal of
corrupted or uncommitted artifacts, interrupted publishes, retries, secrets, and DVC on the same
server. Run with `pytest -m s3 tests/test_storage.py`; the local-path and retry tests run by default."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from s3server import SECRET_KEY, free_ports, s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)
from slotwise import storage
from slotwise.storage import POINTER, S3Options, StorageError


def make_dir(root: Path, tag: str = "v1") -> Path:
    root.mkdir(parents=True)
    (root / "weights.bin").write_bytes(os.urandom(300_000))
    (root / "config.json").write_text(json.dumps({"tag": tag}))
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "sub" / "deep" / "notes.txt").write_text(f"notes {tag}\n")
    (root / "empty.txt").write_bytes(b"")
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def no_leftovers(local_dir: Path) -> bool:
    return not [p for p in local_dir.iterdir() if p.name.startswith(".")] if local_dir.exists() else True


# --------------------------------------------------------------------------- no server needed

def test_local_paths_pass_through(tmp_path):
    src = make_dir(tmp_path / "ckpt")
    assert not storage.is_s3(src) and storage.is_s3("s3://b/x")
    assert storage.split_s3("s3://bucket/a/b/") == ("bucket", "a/b")
    assert storage.fetch(src, tmp_path / "cache") == src
    assert storage.fetch(str(src), "unused") == src and not (tmp_path / "cache").exists()
    assert storage.exists(src) and not storage.exists(tmp_path / "nope")
    assert storage.list_prefix(src) == sorted(str(p) for p in src.rglob("*") if p.is_file())
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.fetch(tmp_path / "nope", tmp_path)
    out = tmp_path / "published" / "ckpt"
    assert storage.publish(src, out) == str(out)
    assert tree(out) == tree(src)
    assert storage.publish(src, src) == str(src) and tree(src) == tree(out)
    storage.publish(src / "config.json", tmp_path / "c.json")
    assert (tmp_path / "c.json").read_bytes() == (src / "config.json").read_bytes()


def test_inconsistent_checkpoint_is_not_published(tmp_path):
    src = make_dir(tmp_path / "ckpt")
    digests = {p.name: storage.sha256_file(p) for p in src.iterdir() if p.is_file()}
    (src / "manifest.json").write_text(json.dumps(digests))
    storage.publish(src, tmp_path / "ok")  # consistent: fine
    (src / "config.json").write_text("{}")
    for dest in (tmp_path / "bad", "s3://bucket/never-contacted"):
        with pytest.raises(StorageError, match=r"ckpt/config\.json: does not match the artifact's manifest\.json"):
            storage.publish(src, dest)
    assert not (tmp_path / "bad").exists()


def test_s3_down_bounded_retries_then_one_line_error(tmp_path, monkeypatch, caplog):
    """A closed port on loopback: exactly `attempts` requests, growing waits, one StorageError line."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "SLOTWISETESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    (port,) = free_ports(1)  # nothing listens there
    sent, waits = [], []
    real_client = storage.client

    def counting_client(options=None):
        c = real_client(options)
        c.meta.events.register("before-send.s3", lambda **kw: sent.append(kw["request"].url))
        return c

    monkeypatch.setattr(storage, "client", counting_client)
    monkeypatch.setattr(storage, "_sleep", waits.append)
    opts = S3Options(endpoint_url=f"http://127.0.0.1:{port}", attempts=4, backoff_s=0.5, connect_timeout_s=1)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError) as info:
        storage.fetch("s3://bucket/runs/x", tmp_path, opts)
    msg = str(info.value)
    assert len(sent) == 4 and len(waits) == 3
    assert waits == sorted(waits) and 0.25 <= waits[0] <= 0.5 and 1.0 <= waits[2] <= 2.0
    assert msg.startswith("s3://bucket/runs/x") and "after 4 attempts" in msg and "\n" not in msg
    sent.clear()
    src = make_dir(tmp_path / "art")
    with pytest.raises(StorageError, match=r"^s3://bucket/runs/y.*after 4 attempts"):
        storage.publish(src, "s3://bucket/runs/y", opts)
    assert len(sent) == 4  # reading the current LATEST fails first; nothing was uploaded
    text = msg + "".join(traceback.format_exception(info.value)) + caplog.text
    assert SECRET_KEY not in text


def test_throttling_is_retried_other_errors_are_not(monkeypatch, tmp_path):
    from botocore.exceptions import ClientError

    waits, calls = [], []
    monkeypatch.setattr(storage, "_sleep", waits.append)

    def flaky(code, fail_times):
        def fn():
            calls.append(code)
            if len(calls) <= fail_times:
                raise ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")
            return "ok"
        return fn

    assert storage._retry("read", "s3://b/k", S3Options(attempts=3), flaky("SlowDown", 2)) == "ok"
    assert len(calls) == 3 and len(waits) == 2
    calls.clear()
    with pytest.raises(StorageError, match=r"^s3://b/k: read failed: AccessDenied: m$"):
        storage._retry("read", "s3://b/k", S3Options(attempts=3), flaky("AccessDenied", 5))
    assert len(calls) == 1

    # no credentials anywhere: a one-line hint, not a traceback
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    (port,) = free_ports(1)
    with pytest.raises(StorageError, match="no AWS credentials"):
        storage.exists("s3://b/k", S3Options(endpoint_url=f"http://127.0.0.1:{port}"))


# --------------------------------------------------------------------------- real S3 server

@pytest.mark.s3
def test_directory_round_trip(s3_env, s3_bucket, tmp_path):
    src = make_dir(tmp_path / "ckpt")
    uri = f"s3://{s3_bucket}/runs/retrofit"
    assert not storage.exists(uri)
    assert storage.publish(src, uri) == uri
    assert storage.exists(uri)
    keys = storage.list_prefix(uri)
    assert f"{uri}/{POINTER}" in keys and len(keys) == 5
    got = storage.fetch(uri + "/", tmp_path / "cache")
    assert got == tmp_path / "cache" / "retrofit" and tree(got) == tree(src)
    # a second publish of the same bytes is a no-op; a changed one replaces the fetched copy whole
    storage.publish(src, uri)
    assert storage.list_prefix(uri) == keys
    (src / "config.json").write_text('{"tag": "v2"}')
    (src / "empty.txt").unlink()
    storage.publish(src, uri)
    got = storage.fetch(uri, tmp_path / "cache")
    assert tree(got) == tree(src) and no_leftovers(tmp_path / "cache")


@pytest.mark.s3
def test_file_round_trip_with_sha256_metadata(s3_env, s3_bucket, tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_bytes(os.urandom(100_000))
    uri = f"s3://{s3_bucket}/data/data.jsonl"
    storage.publish(src, uri)
    head = s3_env.client().head_object(Bucket=s3_bucket, Key="data/data.jsonl")
    assert head["Metadata"]["sha256"] == storage.sha256_file(src)
    got = storage.fetch(uri, tmp_path / "cache")
    assert got.name == "data.jsonl" and got.read_bytes() == src.read_bytes()


@pytest.mark.s3
def test_corrupted_object_is_refused_naming_the_file(s3_env, s3_bucket, tmp_path):
    src = make_dir(tmp_path / "ckpt")
    uri = f"s3://{s3_bucket}/ckpt"
    storage.publish(src, uri)
    c = s3_env.client()
    pointer = json.loads(c.get_object(Bucket=s3_bucket, Key=f"ckpt/{POINTER}")["Body"].read())
    key = f"ckpt/{pointer['version']}/sub/deep/notes.txt"
    c.put_object(Bucket=s3_bucket, Key=key, Body=b"notes v1\n".replace(b"1", b"X"))  # same size
    cache = tmp_path / "cache"
    with pytest.raises(StorageError, match=r"ckpt/sub/deep/notes\.txt: sha256 does not match"):
        storage.fetch(uri, cache)
    assert not (cache / "ckpt").exists() and no_leftovers(cache)

    single = tmp_path / "one.bin"
    single.write_bytes(b"abc" * 1000)
    storage.publish(single, f"s3://{s3_bucket}/one.bin")
    meta = c.head_object(Bucket=s3_bucket, Key="one.bin")["Metadata"]
    c.put_object(Bucket=s3_bucket, Key="one.bin", Body=b"abd" * 1000, Metadata=meta)
    with pytest.raises(StorageError, match=r"one\.bin: sha256 does not match"):
        storage.fetch(f"s3://{s3_bucket}/one.bin", cache)
    c.put_object(Bucket=s3_bucket, Key="raw.bin", Body=b"no checksum")
    with pytest.raises(StorageError, match=r"raw\.bin: object has no sha256 metadata"):
        storage.fetch(f"s3://{s3_bucket}/raw.bin", cache)
    got = storage.fetch(f"s3://{s3_bucket}/raw.bin", cache, S3Options(require_checksum=False))
    assert got.read_bytes() == b"no checksum" and no_leftovers(cache)


@pytest.mark.s3
def test_uncommitted_prefix_and_bad_pointer_are_refused(s3_env, s3_bucket, tmp_path):
    c = s3_env.client()
    c.put_object(Bucket=s3_bucket, Key="half/.v-20250101T000000000000Z-0123456789ab/a.txt", Body=b"a")
    with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/half: objects but no LATEST"):
        storage.fetch(f"s3://{s3_bucket}/half", tmp_path)
    c.put_object(Bucket=s3_bucket, Key=f"half/{POINTER}", Body=b'{"version": "../../etc", "files": {}}')
    with pytest.raises(StorageError, match="not a valid slotwise pointer"):
        storage.fetch(f"s3://{s3_bucket}/half", tmp_path)
    with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/nothing: not found"):
        storage.fetch(f"s3://{s3_bucket}/nothing", tmp_path)
    assert no_leftovers(tmp_path)


@pytest.mark.s3
def test_interrupted_publish_leaves_previous_version(s3_env, s3_bucket, tmp_path, monkeypatch):
    uri = f"s3://{s3_bucket}/runs/train"
    v1 = make_dir(tmp_path / "v1", "v1")
    storage.publish(v1, uri)
    before = storage.list_prefix(uri)
    v2 = make_dir(tmp_path / "v2", "v2")
    real_upload, calls = storage._upload_file, []

    def dies_after_first_file(*args, **kwargs):
        if calls:
            raise ConnectionResetError("simulated crash mid-publish")  # transient, but not on retry
        calls.append(args)
        return real_upload(*args, **kwargs)

    monkeypatch.setattr(storage, "_upload_file", dies_after_first_file)
    with pytest.raises(StorageError, match=rf"^{uri}: publish of .* not committed") as info:
        storage.publish(v2, uri)
    assert "\n" not in str(info.value)
    assert storage.list_prefix(uri) == before  # the uploaded first file of v2 was cleaned up
    got = storage.fetch(uri, tmp_path / "cache")
    assert tree(got) == tree(v1)


@pytest.mark.s3
def test_old_versions_are_collected(s3_env, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/art"
    src = make_dir(tmp_path / "art")
    for i in range(3):
        (src / "config.json").write_text(str(i))
        storage.publish(src, uri, keep=2)
    versions = {k.split("/")[4] for k in storage.list_prefix(uri) if "/.v-" in k}
    assert len(versions) == 2
    assert (storage.fetch(uri, tmp_path / "cache") / "config.json").read_text() == "2"


@pytest.mark.s3
def test_secret_never_logged(s3_env, s3_bucket, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # botocore's debug log included
    src = make_dir(tmp_path / "ckpt")
    storage.publish(src, f"s3://{s3_bucket}/ckpt")
    storage.fetch(f"s3://{s3_bucket}/ckpt", tmp_path / "cache")
    errors = []
    for bad in (f"s3://{s3_bucket}/missing", "s3://no-such-bucket-xyz/a"):
        with pytest.raises(StorageError) as info:
            storage.fetch(bad, tmp_path / "cache")
        errors.append(str(info.value) + "".join(traceback.format_exception(info.value)))
    assert "botocore" in caplog.text  # the debug log was captured
    assert SECRET_KEY not in caplog.text + "".join(errors)


@pytest.mark.s3
def test_dvc_push_pull_against_seaweedfs(s3_env, s3_bucket, tmp_path):
    dvc = Path(sys.executable).parent / "dvc"
    if not dvc.is_file() or shutil.which("git") is None:
        pytest.skip("needs .venv/bin/dvc and git")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site")}

    def run(*cmd):
        res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{cmd}: {res.stdout}\n{res.stderr}"
        return res

    run("git", "init", "-q")
    run(str(dvc), "init", "-q")
    payload = os.urandom(50_000)
    (repo / "data.bin").write_bytes(payload)
    run(str(dvc), "add", "-q", "data.bin")
    run(str(dvc), "remote", "add", "-d", "s3remote", f"s3://{s3_bucket}/dvc")
    run(str(dvc), "remote", "modify", "s3remote", "endpointurl", s3_env.endpoint_url)
    run(str(dvc), "push", "-q")
    assert [k for k in storage.list_prefix(f"s3://{s3_bucket}/dvc") if "/files/md5/" in k]
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "data.bin").unlink()
    run(str(dvc), "pull", "-q")
    assert (repo / "data.bin").read_bytes() == payload


@pytest.mark.s3
def test_checkpoint_round_trip_loads(s3_env, s3_bucket, tmp_path, input_ids):
    """A real slotwise checkpoint survives publish -> fetch -> load_checkpoint with identical logits."""
    import torch

    from conftest import tiny_model, tiny_retrofit_cfg
    from slotwise.checkpoint import load_checkpoint, save_checkpoint
    from slotwise.retrofit import retrofit

    model, cfg = tiny_model("llama"), tiny_retrofit_cfg()
    retrofit(model, cfg)
    ckpt = save_checkpoint(model, None, tmp_path / "ckpt", cfg)
    uri = f"s3://{s3_bucket}/runs/retrofit/checkpoint"
    storage.publish(ckpt, uri)
    loaded, _ = load_checkpoint(storage.fetch(uri, tmp_path / "cache"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
