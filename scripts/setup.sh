#!/usr/bin/env bash
# Set up autoresearch-arena in ./.venv on a fresh machine (idempotent, ~1-2 min the first time).
# torch comes first and pinned: an unpinned torch would pull a multi-GB CUDA build. On a GPU machine
# set ARENA_TORCH to the build you want (e.g. ARENA_TORCH="torch==2.13.0" with the CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "${ARENA_TORCH:-torch==2.13.0}"
.venv/bin/pip install -q -e ".[slurm,claude,test]"
.venv/bin/python -c "import torch, hydra, mlflow, optuna; print(f'arena ready: torch {torch.__version__}, mlflow {mlflow.__version__}, optuna {optuna.__version__}')"
