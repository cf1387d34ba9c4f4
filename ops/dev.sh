#!/usr/bin/env bash
# Entry point for a fresh machine (Python 3.11, pip, apt): makes .venv, installs the project with
# pinned versions (ops/constraints.txt) when pyproject.toml or the pins changed, then runs a target.
#   bash ops/dev.sh demo   the main job on the embedded default
#   bash ops/dev.sh test   the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: PLUM-stream needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

stamp=.venv/.installed
if [ ! -x .venv/bin/python ] || [ pyproject.toml -nt "$stamp" ] || [ ops/constraints.txt -nt "$stamp" ]; then
  echo "== installing into .venv (first run takes about two minutes)"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c ops/constraints.txt -e ".[test]"
  touch "$stamp"
fi

target=${1:-help}
shift || true
case "$target" in
  demo)
    exec .venv/bin/plum demo "$@" ;;
  test)
    .venv/bin/plum assets fetch recbole minilm smollm2 kafka prism
    exec .venv/bin/python -m pytest -q "$@" ;;
  *)
    echo "usage: bash ops/dev.sh demo|test [extra arguments]" >&2
    exit 2 ;;
esac
