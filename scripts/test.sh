#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up .venv, then (as root on Debian/Ubuntu) install and
# start the one-node Slurm cluster on 127.0.0.1 and the SkyPilot-on-Slurm setup, run pytest, and
# stop every service it started. Extra arguments go to pytest (e.g. -k slurm).
# ARENA_REQUIRE_SLURM=1 / ARENA_REQUIRE_SKYPILOT=1 (CI sets them) turn "skip: no cluster" into failures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SLURM_ROOT=${SLURM_ROOT:-/tmp/arena-slurm}
started_slurm=0; started_sky=0
cleanup() {
  [ "$started_sky" = 1 ] && bash scripts/skypilot_local_down.sh >/dev/null 2>&1 || true
  [ "$started_slurm" = 1 ] && bash scripts/slurm_down.sh >/dev/null 2>&1 || true
}
trap cleanup EXIT
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if [ -z "$(find /var/lib/apt/lists -name '*Packages*' -print -quit 2>/dev/null)" ]; then apt-get update -qq; fi
  bash scripts/install_slurm.sh
  # headless Chromium opens the HTML report in tests/test_analysis_report.py
  command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  if [ -n "${ARENA_SLURM_FRESH:-}" ]; then   # CI: never inherit a cluster's leftover jobs or state
    bash scripts/slurm_down.sh >/dev/null 2>&1 || true
    eval "$(bash scripts/slurm_up.sh --fresh)"; started_slurm=1
  elif SLURM_CONF=$SLURM_ROOT/slurm.conf timeout 5 sinfo -h >/dev/null 2>&1; then
    export SLURM_CONF=$SLURM_ROOT/slurm.conf   # already up (someone else's): use it, leave it running
  else
    eval "$(bash scripts/slurm_up.sh)"; started_slurm=1
  fi
  if [ "${ARENA_SKIP_SKYPILOT:-0}" != 1 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server patchelf >/dev/null
    bash scripts/skypilot_env.sh && bash scripts/skypilot_local_up.sh && started_sky=1
  fi
else
  echo "test.sh: not root on Debian: Slurm and SkyPilot tests will skip" >&2
fi
.venv/bin/ruff check .   # every `noqa` must silence something real (pyproject.toml [tool.ruff])
.venv/bin/python -m pytest "$@"
