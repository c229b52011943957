#!/usr/bin/env bash
# Point SkyPilot's Slurm backend at the one-node Slurm on 127.0.0.1 (scripts/slurm_up.sh), so the
# SkyPilot launcher runs for real on a machine with no cloud. As root. What it sets up:
#   - sshd on 127.0.0.1:$SKY_LOCAL_SSH_PORT (the "login node"), its own config and host key;
#   - a throwaway unix user ($SKY_LOCAL_USER) that SkyPilot logs into: its backend writes into that
#     user's real home (.bashrc, .ssh, runtime venvs), never into ours;
#   - the offline fixes: the `uv` binary pip installed, handed out by a `curl` stand-in (SkyPilot
#     would fetch uv from astral.sh into each cluster's HOME), a Python 3.10 for `uv venv --python 3.10` (from pyenv, made relocatable), and, in every
#     ssh session, UV_PYTHON_DOWNLOADS=never, UV_NATIVE_TLS=true, SSL_CERT_FILE, SLURM_CONF;
#   - the client side: ~/.slurm/config (cluster `arena`), ~/.sky/config.yaml, and a small GPU
#     catalog of our own so an H100 request is refused offline (ResourcesUnavailableError)
#     instead of downloading SkyPilot's hosted catalogs;
#   - `sky check slurm`, which also starts SkyPilot's local API server.
# Idempotent. Undo with scripts/skypilot_local_down.sh. Needs: scripts/skypilot_env.sh (the client
# venv), scripts/slurm_up.sh (the cluster), openssh-server, patchelf.
#
# Usage: bash scripts/skypilot_local_up.sh      then: .venv-sky/bin/python run.py launcher=skypilot \
#        launcher.infra=slurm/arena ...
set -euo pipefail
PROJECT=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${SKY_LOCAL_ROOT:-/tmp/arena-skypilot}
PORT=${SKY_LOCAL_SSH_PORT:-12222}
U=${SKY_LOCAL_USER:-arenasky}
SKY_VENV=${ARENA_SKY_VENV:-$PROJECT/.venv-sky}
SLURM_ROOT=${SLURM_ROOT:-/tmp/arena-slurm}
CERTS=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
MARK="# written by autoresearch-arena scripts/skypilot_local_up.sh"
say() { echo "skypilot_local_up: $*" >&2; }

[ "$(id -u)" = 0 ] || { say "run as root (it adds a user and starts sshd)"; exit 1; }
[ -x "$SKY_VENV/bin/sky" ] || { say "no SkyPilot client at $SKY_VENV: run scripts/skypilot_env.sh"; exit 1; }
[ -f "$SLURM_ROOT/slurm.conf" ] || { say "no Slurm at $SLURM_ROOT: run scripts/slurm_up.sh"; exit 1; }
for c in /usr/sbin/sshd patchelf; do
  command -v $c >/dev/null || { say "$c missing: apt-get install -y openssh-server patchelf"; exit 1; }
done
mkdir -p "$ROOT" && chmod 755 "$ROOT"

# --- the throwaway user ----------------------------------------------------------------------
if ! id "$U" >/dev/null 2>&1; then
  useradd -m -s /bin/bash "$U"
  usermod -p '*' "$U"   # no password, but not "locked": sshd without PAM refuses locked accounts
fi
H=$(getent passwd "$U" | cut -d: -f6)

# --- Python 3.10 for SkyPilot's runtime venv (`uv venv --python 3.10`, downloads are off) --------
PY310=$ROOT/python3.10
if [ ! -x "$PY310/bin/python3.10" ]; then
  PREFIX=""
  for c in python3.10 "$(pyenv root 2>/dev/null || echo /root/.pyenv)"/versions/3.10*/bin/python3.10; do
    PREFIX=$("$c" -c 'import sys; print(sys.base_prefix)' 2>/dev/null) && break
  done
  [ -n "$PREFIX" ] || { say "no Python 3.10 on this machine (SkyPilot's runtime needs one)"; exit 1; }
  cp -a "$PREFIX" "$PY310.tmp"
  # pyenv links python to its libpython by an absolute RUNPATH under /root (not readable by $U).
  patchelf --set-rpath '$ORIGIN/../lib' "$PY310.tmp/bin/python3.10"
  mv "$PY310.tmp" "$PY310"
fi
"$PY310/bin/python3.10" -c 'import ssl, sqlite3' || { say "the copied Python 3.10 is broken"; exit 1; }

# --- a Python with what train/ needs, readable by $U, for tests: their cluster setup then only
# prepares the data (a real pool's setup pip-installs torch into each cluster, minutes on 2 CPUs).
# Debian's python3, because pyenv's lives under /root; pip (not uv) so torch comes from this disk.
NODE_VENV=$ROOT/node-venv
if ! "$NODE_VENV/bin/python" -c 'import torch, numpy, tokenizers' 2>/dev/null; then
  rm -rf "$NODE_VENV"
  "$SKY_VENV/bin/uv" venv -q --seed --python /usr/bin/python3 "$NODE_VENV"
  "$NODE_VENV/bin/python" -m pip install -q torch==2.13.0 "numpy>=1.26" "tokenizers>=0.20"
fi

# --- the user's ~/.local/bin (first on PATH: sshd sets it, and Debian's ~/.profile re-adds it in
# the login shells SkyPilot runs): uv, python3.10 and an offline `curl` ------------------------
# SkyPilot's Slurm backend gives each cluster its own HOME (~/.sky_clusters/<name>) and installs uv
# there with `curl -LsSf https://astral.sh/uv/install.sh | UV_INSTALL_DIR=$HOME/.local/bin sh`.
# This curl answers that one URL with an installer that copies the uv binary pip gave us, and
# hands every other request to the real curl.
BIN=$H/.local/bin
install -d -o "$U" -g "$U" "$H/.local" "$BIN"
install -o "$U" -g "$U" -m 755 "$SKY_VENV/bin/uv" "$BIN/uv"
ln -sfn "$PY310/bin/python3.10" "$BIN/python3.10"
cat > "$BIN/curl" <<CURL
#!/bin/sh
$MARK: offline stand-in for astral.sh's uv installer
case "\$*" in
  *astral.sh/uv/install.sh*) echo 'mkdir -p "\$UV_INSTALL_DIR" && cp $BIN/uv "\$UV_INSTALL_DIR/uv"' ;;
  *) exec /usr/bin/curl "\$@" ;;
esac
CURL
chown "$U:$U" "$BIN/curl" && chmod 755 "$BIN/curl"

# --- ssh: a key for us, sshd on loopback that only lets $U in ----------------------------------
[ -f "$ROOT/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C arena-skypilot -f "$ROOT/id_ed25519"
[ -f "$ROOT/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$ROOT/ssh_host_ed25519_key"
install -d -o "$U" -g "$U" -m 700 "$H/.ssh"
grep -qF "$(cat "$ROOT/id_ed25519.pub")" "$H/.ssh/authorized_keys" 2>/dev/null \
  || cat "$ROOT/id_ed25519.pub" >> "$H/.ssh/authorized_keys"
chown "$U:$U" "$H/.ssh/authorized_keys" && chmod 600 "$H/.ssh/authorized_keys"
cat > "$ROOT/sshd_config" <<CONF
$MARK
Port $PORT
ListenAddress 127.0.0.1
HostKey $ROOT/ssh_host_ed25519_key
PidFile $ROOT/sshd.pid
AllowUsers $U
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp /usr/lib/openssh/sftp-server
SetEnv SLURM_CONF=$SLURM_ROOT/slurm.conf UV_PYTHON_DOWNLOADS=never UV_NATIVE_TLS=true SSL_CERT_FILE=$CERTS PATH=$BIN:/usr/local/bin:/usr/bin:/bin
CONF
mkdir -p /run/sshd
pid=$(cat "$ROOT/sshd.pid" 2>/dev/null || true)
if [ -n "$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = sshd ]; then
  kill -HUP "$pid"   # reload the config
else
  /usr/sbin/sshd -f "$ROOT/sshd_config"
fi
SSH="ssh -q -i $ROOT/id_ed25519 -p $PORT -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes"
for i in $(seq 1 20); do $SSH "$U@127.0.0.1" true 2>/dev/null && break; sleep 0.5; done
$SSH "$U@127.0.0.1" "bash --login -c 'sinfo -h -o %P >/dev/null && uv -V >/dev/null && python3.10 -V >/dev/null && [ \$(command -v curl) = $BIN/curl ]'" \
  || { say "ssh $U@127.0.0.1:$PORT: a login shell does not find sinfo, uv, python3.10 and our curl"; exit 1; }

# --- the client side: ~/.slurm/config, ~/.sky/config.yaml, our GPU catalog -------------------
write_ours() {  # never overwrite a file a person wrote
  local f=$1
  if [ -f "$f" ] && ! grep -qF "$MARK" "$f"; then say "$f exists and is not ours: leaving it"; return 1; fi
  mkdir -p "$(dirname "$f")"; cat > "$f"
}
write_ours "$HOME/.slurm/config" <<CONF || true
$MARK
Host arena
  HostName 127.0.0.1
  Port $PORT
  User $U
  IdentityFile $ROOT/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
CONF
write_ours "$HOME/.sky/config.yaml" <<CONF || true
$MARK
allowed_clouds: [slurm]
slurm:
  allowed_clusters: [arena]
CONF
# SkyPilot reads GPU names from catalogs it downloads on first use (unreachable here); ours lists
# the GPUs a study may ask for, so an H100 request resolves and is then refused by the CPU-only
# cluster with ResourcesUnavailableError. A catalog already there (a real one) is left alone.
CAT=$HOME/.sky/catalogs/v8/common
mkdir -p "$CAT"
if [ ! -f "$CAT/accelerators.csv" ]; then
  printf '%s\n' 'AcceleratorName,Clouds' \
    "H100,\"['AWS', 'GCP', 'Azure', 'Kubernetes', 'Slurm']\"" \
    "H200,\"['AWS', 'GCP', 'Azure', 'Kubernetes', 'Slurm']\"" \
    "A100,\"['AWS', 'GCP', 'Azure', 'Kubernetes', 'Slurm']\"" \
    "L4,\"['AWS', 'GCP', 'Kubernetes', 'Slurm']\"" > "$CAT/accelerators.csv"
  printf '%s\n' GPU,MemoryGB,Manufacturer H100,80,NVIDIA H200,141,NVIDIA A100,40,NVIDIA L4,24,NVIDIA \
    > "$CAT/metadata.csv"
  echo "$CAT" > "$ROOT/catalog_written"
fi

# --- enable Slurm (this starts the API server on demand) ---------------------------------------
export SKYPILOT_DISABLE_USAGE_COLLECTION=1
timeout 300 "$SKY_VENV/bin/sky" check slurm >"$ROOT/sky_check.log" 2>&1 || true
if ! grep -q "Slurm.*enabled\|arena: enabled\|enabled" "$ROOT/sky_check.log"; then
  say "sky check slurm did not enable Slurm:"; cat "$ROOT/sky_check.log" >&2; exit 1
fi
say "SkyPilot -> Slurm cluster 'arena' via $U@127.0.0.1:$PORT. Run a study on it with"
say "  .venv-sky/bin/python run.py launcher=skypilot launcher.infra=slurm/arena launcher.cpus=1 objective=tiny"
say "  (faster setup: launcher.python=$NODE_VENV/bin/python 'launcher.setup=cd ~/arena && $NODE_VENV/bin/python -m train.prepare --corpus austen --vocab-size 512')"
