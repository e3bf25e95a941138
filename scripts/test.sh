#!/usr/bin/env bash
# Install what the tests need into .venv and run ruff and the test suite.
# (The README's second command.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first, pinned: the machines carry its CPU wheel (an open range pulls CUDA builds).
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
ruff check .
python -m pytest -q "$@"
