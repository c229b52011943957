#!/usr/bin/env bash
# Undo scripts/skypilot_local_up.sh: cancel whatever the throwaway user still runs on the local Slurm
# (clusters a study kept or left behind), stop SkyPilot's API server and the loopback sshd, remove
# the user, our client config files and $SKY_LOCAL_ROOT. The Slurm cluster itself is left running
# (scripts/slurm_down.sh stops it). As root; idempotent.
set -uo pipefail
PROJECT=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${SKY_LOCAL_ROOT:-/tmp/arena-skypilot}
U=${SKY_LOCAL_USER:-arenasky}
SKY_VENV=${ARENA_SKY_VENV:-$PROJECT/.venv-sky}
SLURM_ROOT=${SLURM_ROOT:-/tmp/arena-slurm}
MARK="# written by autoresearch-arena scripts/skypilot_local_up.sh"
say() { echo "skypilot_local_down: $*" >&2; }

if id "$U" >/dev/null 2>&1 && [ -f "$SLURM_ROOT/slurm.conf" ]; then
  SLURM_CONF=$SLURM_ROOT/slurm.conf timeout 30 scancel -u "$U" 2>/dev/null && say "cancelled $U's Slurm jobs"
fi
if [ -x "$SKY_VENV/bin/sky" ]; then
  timeout 60 "$SKY_VENV/bin/sky" api stop >/dev/null 2>&1 && say "stopped the SkyPilot API server"
fi
pid=$(cat "$ROOT/sshd.pid" 2>/dev/null || true)
if [ -n "$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = sshd ]; then kill "$pid" && say "stopped sshd ($pid)"; fi
for f in "$HOME/.slurm/config" "$HOME/.sky/config.yaml"; do
  [ -f "$f" ] && grep -qF "$MARK" "$f" && rm -f "$f" && say "removed $f"
done
if [ -f "$ROOT/catalog_written" ]; then rm -rf "$(cat "$ROOT/catalog_written")" && say "removed our GPU catalog"; fi
if id "$U" >/dev/null 2>&1; then
  for i in $(seq 1 20); do pgrep -u "$U" >/dev/null || break; sleep 0.5; done
  pkill -KILL -u "$U" 2>/dev/null  # only the throwaway user's leftovers (skylet, ssh sessions)
  userdel -r "$U" 2>/dev/null && say "removed user $U"
fi
rm -rf "$ROOT"
exit 0
