#!/usr/bin/env bash
# The SkyPilot client gets its own venv (.venv-sky) because SkyPilot 0.14.1 pins click<8.2,
# uvicorn 0.35 and protobuf<7, and installing it into .venv would downgrade what MLflow, Hydra and
# the Hugging Face tools there were resolved with. `.venv-sky` sees .venv's packages through a .pth
# file placed last on sys.path, so it holds only SkyPilot and the few versions it pins; run the
# study with `.venv-sky/bin/python run.py launcher=skypilot ...`. `.venv` stays untouched: pip
# only installs into .venv-sky ("Not uninstalling ... outside environment").
#
# Usage: bash scripts/skypilot_env.sh        (idempotent; ~20 s from PyPI)
set -euo pipefail
PROJECT=$(cd "$(dirname "$0")/.." && pwd)
MAIN=${ARENA_VENV:-$PROJECT/.venv}
SKY=${ARENA_SKY_VENV:-$PROJECT/.venv-sky}
SKYPILOT_SPEC=${SKYPILOT_SPEC:-skypilot[slurm]==0.14.1}

[ -x "$MAIN/bin/python" ] || { echo "skypilot_env: no main venv at $MAIN (create it first)" >&2; exit 1; }
PY=$("$MAIN/bin/python" -c 'import sys; print(f"python{sys.version_info.major}.{sys.version_info.minor}")')
# The same interpreter as the main venv, so .venv's compiled packages load in .venv-sky.
BASE_PY=$("$MAIN/bin/python" -c 'import sys; print(sys._base_executable)')
[ -x "$SKY/bin/python" ] || "$BASE_PY" -m venv "$SKY"
MAIN_SITE=$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# "zz_" sorts last, so .venv-sky's own packages (the pinned click/uvicorn/protobuf) win.
echo "$MAIN_SITE" > "$SKY/lib/$PY/site-packages/zz_arena_main_venv.pth"
# uv: SkyPilot's remote runtime would fetch it from the internet; pip ships the binary, which
# scripts/skypilot_local_up.sh copies to the ssh user.
# (pip warns that huggingface-hub's CLI wants click>=8.4: harmless, the arena never runs it.)
"$SKY/bin/pip" install -q "$SKYPILOT_SPEC" uv
"$SKY/bin/python" -c 'import sys, sky, mlflow; print("skypilot", sky.__version__, "ready in", sys.prefix)'
