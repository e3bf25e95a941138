#!/usr/bin/env bash
# Install what the tests need and run ruff and the test suite (the README's second
# command; .ci/run runs it on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned: the machines carry its CPU wheel (an open range pulls CUDA builds).
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
# anonymeter pins numpy < 2, which the rest of the project has outgrown: it lives in its
# own virtual environment and the validation suite runs it in a separate process.
[ -x .venv-anonymeter/bin/python ] || "$PY" -m venv .venv-anonymeter
.venv-anonymeter/bin/python -m pip install --quiet "anonymeter==1.1.0"
export FEDSYNTH_ANONYMETER_PYTHON="$PWD/.venv-anonymeter/bin/python"
# Chromium renders the HTML report in one test; install it where apt is ours to use.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed"
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
