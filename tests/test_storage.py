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
from types import SimpleNamespace

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


def _no_backoff(monkeypatch) -> list[float]:
    """botocore's own retry delays, recorded instead of slept."""
    from botocore.retries.standard import ExponentialBackoff

    delays, real = [], ExponentialBackoff.delay_amount

    def record(self, context):
        delays.append(real(self, context))
        return 0

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", record)
    return delays


def _credentials(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "SLOTWISETESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_s3_down_bounded_retries_then_one_line_error(tmp_path, monkeypatch, caplog):
    """A closed port on loopback: botocore makes exactly `attempts` requests, then one StorageError line."""
    _credentials(monkeypatch)
    (port,) = free_ports(1)  # nothing listens there
    sent, delays = [], _no_backoff(monkeypatch)
    real_client = storage.client

    def counting_client(options=None):
        c = real_client(options)
        c.meta.events.register("before-send.s3", lambda **kw: sent.append(kw["request"].url))
        return c

    monkeypatch.setattr(storage, "client", counting_client)
    opts = S3Options(endpoint_url=f"http://127.0.0.1:{port}", attempts=4, connect_timeout_s=1)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError) as info:
        storage.fetch("s3://bucket/runs/x", tmp_path, opts)
    msg = str(info.value)
    assert len(sent) == 4 and len(delays) == 3
    assert msg.startswith("s3://bucket/runs/x") and "Could not connect" in msg and "\n" not in msg
    sent.clear()
    src = make_dir(tmp_path / "art")
    with pytest.raises(StorageError, match=r"^s3://bucket/runs/y.*Could not connect"):
        storage.publish(src, "s3://bucket/runs/y", opts)
    assert len(sent) == 4  # reading the current LATEST fails first; nothing was uploaded
    text = msg + "".join(traceback.format_exception(info.value)) + caplog.text
    assert SECRET_KEY not in text


class _ScriptedS3:
    """An HTTP endpoint answering each request with the next scripted (status, S3 error code)."""

    def __init__(self, script: list[tuple[int, str]]):
        import http.server
        import threading

        self.script, self.requests = list(script), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                outer.requests.append((self.command, self.path))
                status, code = outer.script.pop(0) if outer.script else (404, "NoSuchKey")
                body = f"<Error><Code>{code}</Code><Message>scripted</Message></Error>".encode() if self.command != "HEAD" else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = _answer

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


def test_throttling_is_retried_by_botocore_other_errors_are_not(monkeypatch, tmp_path):
    _credentials(monkeypatch)
    delays = _no_backoff(monkeypatch)
    fake = _ScriptedS3([(503, "SlowDown"), (503, "SlowDown"), (404, "NoSuchKey"), (404, "NotFound")])
    try:
        assert storage.exists("s3://b/k", S3Options(endpoint_url=fake.url, attempts=3)) is False
        assert [m for m, _ in fake.requests] == ["GET", "GET", "GET", "HEAD"] and len(delays) == 2  # LATEST read 3 times
        fake.requests.clear()
        fake.script = [(403, "AccessDenied")] * 5
        with pytest.raises(StorageError, match=r"^s3://b/k/LATEST: read commit record failed: AccessDenied: scripted$"):
            storage.fetch("s3://b/k", tmp_path, S3Options(endpoint_url=fake.url, attempts=3))
        assert len(fake.requests) == 1
        fake.requests.clear()
        fake.script = [(503, "SlowDown")] * 5
        with pytest.raises(StorageError, match=r"SlowDown: scripted \(after 3 attempts\)"):
            storage.fetch("s3://b/k", tmp_path, S3Options(endpoint_url=fake.url, attempts=3, retry_mode="adaptive"))
        assert len(fake.requests) == 3
    finally:
        fake.close()

    # no credentials anywhere: a one-line hint, not a traceback
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    (port,) = free_ports(1)
    with pytest.raises(StorageError, match="no AWS credentials"):
        storage.exists("s3://b/k", S3Options(endpoint_url=f"http://127.0.0.1:{port}"))


def test_the_endpoint_comes_from_botocore_and_options(monkeypatch):
    _credentials(monkeypatch)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    assert storage.client().meta.endpoint_url == "http://127.0.0.1:9"  # botocore reads the service-specific variable
    assert storage.client(S3Options(endpoint_url="http://127.0.0.1:8")).meta.endpoint_url == "http://127.0.0.1:8"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:7")
    assert storage.client().meta.endpoint_url == "http://127.0.0.1:7"
    assert storage.client().meta.config.retries == {"mode": "standard", "total_max_attempts": 5}


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
    got = storage.fetch(f"s3://{s3_bucket}/raw.bin", cache, S3Options(allow_unpublished=True))
    assert got.read_bytes() == b"no checksum" and no_leftovers(cache)


@pytest.mark.s3
def test_uncommitted_prefix_and_bad_pointer_are_refused(s3_env, s3_bucket, tmp_path):
    c = s3_env.client()
    c.put_object(Bucket=s3_bucket, Key="half/.v-20250101T000000000000Z-0123456789ab/a.txt", Body=b"a")
    with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/half: objects but no LATEST"):
        storage.fetch(f"s3://{s3_bucket}/half", tmp_path)
    c.put_object(Bucket=s3_bucket, Key=f"half/{POINTER}", Body=b'{"version": "../../etc", "files": {}}')
    with pytest.raises(StorageError, match="not a valid slotwise LATEST"):
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
    real_put = storage._put_files

    def dies_after_first_file(uri_, pairs, *args):
        real_put(uri_, pairs[:1], *args)  # the first file of v2 is on the server ...
        raise ConnectionResetError("simulated crash mid-publish")  # ... then the upload dies

    monkeypatch.setattr(storage, "_put_files", dies_after_first_file)
    with pytest.raises(StorageError, match=rf"^{uri}: publish of .* not committed") as info:
        storage.publish(v2, uri)
    assert "\n" not in str(info.value)
    assert storage.list_prefix(uri) == before  # the uploaded first file of v2 was cleaned up
    got = storage.fetch(uri, tmp_path / "cache")
    assert tree(got) == tree(v1)


def _versions(uri: str) -> set[str]:
    prefix = uri.rstrip("/") + "/"
    return {k[len(prefix):].split("/")[0] for k in storage.list_prefix(uri) if k[len(prefix):].startswith(".v-")}


def _latest(s3_env, bucket: str, key: str) -> dict:
    return json.loads(s3_env.client().get_object(Bucket=bucket, Key=f"{key}/{POINTER}")["Body"].read())


def _publish_tag(src: Path, uri: str, tag: str, **kw) -> None:
    (src / "config.json").write_text(json.dumps({"tag": tag}))
    storage.publish(src, uri, **kw)


@pytest.mark.s3
def test_old_versions_are_collected_by_the_commit_record(s3_env, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/art"
    src = make_dir(tmp_path / "art")
    for i in range(4):
        _publish_tag(src, uri, str(i), keep=2)
    latest = _latest(s3_env, s3_bucket, "art")
    assert _versions(uri) == {latest["version"], latest["history"][0]} and len(latest["history"]) == 3
    assert json.loads((storage.fetch(uri, tmp_path / "cache") / "config.json").read_text()) == {"tag": "3"}


@pytest.mark.s3
def test_a_publisher_with_a_slow_clock_never_loses_its_commit(s3_env, s3_bucket, tmp_path, monkeypatch):
    """Versions are named by the publisher's clock; 5 minutes behind, its new version's name sorts
    oldest. Cleanup ordered by names deleted the version LATEST had just been pointed at."""
    import datetime as dt

    uri = f"s3://{s3_bucket}/art"
    src = make_dir(tmp_path / "art")
    _publish_tag(src, uri, "a")
    _publish_tag(src, uri, "b")

    class SlowClock:
        @staticmethod
        def now(tz=None):
            return dt.datetime.now(tz) - dt.timedelta(minutes=5)

    monkeypatch.setattr(storage, "_dt", SimpleNamespace(datetime=SlowClock, timezone=dt.timezone))
    _publish_tag(src, uri, "c")
    monkeypatch.setattr(storage, "_dt", dt)
    latest = _latest(s3_env, s3_bucket, "art")
    assert _versions(uri) == {latest["version"], latest["history"][0]}  # the one just committed and the one before
    assert json.loads((storage.fetch(uri, tmp_path / "cache") / "config.json").read_text()) == {"tag": "c"}


@pytest.mark.s3
def test_orphans_of_killed_publishes_are_collected_not_counted(s3_env, s3_bucket, tmp_path):
    """A killed publish leaves a version prefix (named to sort newest here) and an unfinished multipart
    upload. They must not count as a kept version (the previous committed one was deleted for them);
    once older than the grace period (server clock) they are collected."""
    uri, c = f"s3://{s3_bucket}/art", s3_env.client()
    src = make_dir(tmp_path / "art")
    _publish_tag(src, uri, "a")
    orphan = ".v-20991231T235959000000Z-0123456789ab"
    c.put_object(Bucket=s3_bucket, Key=f"art/{orphan}/weights.bin", Body=b"half")
    upload = c.create_multipart_upload(Bucket=s3_bucket, Key=f"art/{orphan}/big.bin")
    c.upload_part(Bucket=s3_bucket, Key=f"art/{orphan}/big.bin", UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1000)
    _publish_tag(src, uri, "b")  # default grace (a day): the orphan is young, left alone
    latest = _latest(s3_env, s3_bucket, "art")
    committed = {latest["version"], latest["history"][0]}
    assert _versions(uri) == committed | {orphan}
    assert storage.collect(uri, options=S3Options(orphan_grace_s=0)) == [orphan]
    assert _versions(uri) == committed
    assert not c.list_multipart_uploads(Bucket=s3_bucket, Prefix="art/").get("Uploads")
    assert json.loads((storage.fetch(uri, tmp_path / "cache") / "config.json").read_text()) == {"tag": "b"}


@pytest.mark.s3
def test_a_concurrent_commit_is_never_overwritten(s3_env, s3_bucket, tmp_path, monkeypatch):
    """Publisher A reads LATEST, B commits while A uploads: A's commit is refused (conditional write), B's stays."""
    uri = f"s3://{s3_bucket}/art"
    a, b = make_dir(tmp_path / "a", "a"), make_dir(tmp_path / "b", "b")
    storage.publish(make_dir(tmp_path / "first", "first"), uri)
    real_put = storage._put_files

    def b_commits_meanwhile(*args):
        monkeypatch.setattr(storage, "_put_files", real_put)
        storage.publish(b, uri)
        real_put(*args)

    monkeypatch.setattr(storage, "_put_files", b_commits_meanwhile)
    with pytest.raises(StorageError, match="another publish committed LATEST meanwhile"):
        storage.publish(a, uri)
    assert tree(storage.fetch(uri, tmp_path / "cache")) == tree(b)
    latest = _latest(s3_env, s3_bucket, "art")
    assert _versions(uri) == {latest["version"], latest["history"][0]}  # A's upload was removed


@pytest.mark.s3
def test_a_plain_prefix_or_object_is_read_only_when_asked(s3_env, s3_bucket, tmp_path):
    """What `aws s3 sync` / `aws s3 cp` leave: no LATEST, no sha256 metadata."""
    c = s3_env.client()
    src = make_dir(tmp_path / "synced")
    for p in src.rglob("*"):
        if p.is_file():
            c.upload_file(str(p), s3_bucket, f"synced/{p.relative_to(src).as_posix()}")
    uri = f"s3://{s3_bucket}/synced"
    with pytest.raises(StorageError, match=r"no LATEST commit record .*--s3-unpublished"):
        storage.fetch(uri, tmp_path / "cache")
    got = storage.fetch(uri, tmp_path / "cache", S3Options(allow_unpublished=True))
    assert tree(got) == tree(src) and no_leftovers(tmp_path / "cache")
    got = storage.fetch(f"{uri}/config.json", tmp_path / "one", S3Options(allow_unpublished=True))
    assert got.read_bytes() == (src / "config.json").read_bytes()


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
