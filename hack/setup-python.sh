#!/usr/bin/env bash
# Creates .venv and installs the project with every extra the tests use. Idempotent: a
# second run only checks. torch comes from PyPI (a large CUDA build) and pip caches it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet -e '.[operator,trainer,fast,dev]'
  touch "$stamp"
fi
