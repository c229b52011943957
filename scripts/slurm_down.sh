#!/usr/bin/env bash
# Stop the local cluster that scripts/slurm_up.sh started, by the pid files under $SLURM_ROOT
# (default /tmp/arena-slurm), node daemon first. State and accounting stay, so slurm_up.sh resumes
# them (job ids keep counting); `--purge` also deletes $SLURM_ROOT. Stopping a stopped cluster is a no-op.
set -euo pipefail
R=${SLURM_ROOT:-/tmp/arena-slurm}
stopped=()
for d in slurmd slurmctld slurmdbd mariadbd munged; do
  p=$(cat "$R/run/$d.pid" 2>/dev/null || true)
  if [ -n "$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = "$d" ]; then
    kill "$p" && echo "slurm_down: stopped $d ($p)" >&2 && stopped+=("$p")
  fi
done
for i in $(seq 1 80); do
  alive=0
  for p in "${stopped[@]}"; do [ -d /proc/$p ] && ! grep -q '^State:.*Z' /proc/$p/status 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break; sleep 0.25
done
[ $alive = 0 ] || echo "slurm_down: some daemons still stopping after 20 s" >&2
if [ "${1:-}" = --purge ] && [ -d "$R" ]; then rm -rf "$R" && echo "slurm_down: removed $R" >&2; fi
