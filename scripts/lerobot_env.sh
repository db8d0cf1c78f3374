#!/usr/bin/env bash
# Build the LeRobot test environment (.venv-lerobot) and run the tests marked `lerobot`.
# LeRobot 0.4.x pins torch<2.11, which cannot share .venv with the project's torch 2.13 CPU build, so the
# optional extra gets its own environment. Idempotent: a finished environment is reused (stamp file).
#   scripts/lerobot_env.sh            build (if needed) and run `pytest -m lerobot`
#   scripts/lerobot_env.sh --build    build only
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${LEROBOT_VENV:-.venv-lerobot}
PY=$VENV/bin/python
STAMP=$VENV/.installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    start=$(date +%s)
    test -x "$PY" || "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    # lerobot decides torch (<2.11); everything else of vla-export is unconstrained here. --no-compile: modules are
    # byte-compiled when first imported (below), not all of them at install time (see the Makefile).
    "$PY" -m pip install -q --no-compile -e '.[dev,lerobot]'
    touch "$STAMP"
    echo "lerobot env: built in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
fi
[ "${1:-}" = "--build" ] && exit 0
unset PYTHONDONTWRITEBYTECODE
"$PY" -m pytest -q -m lerobot tests/lerobot
