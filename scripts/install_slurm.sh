#!/usr/bin/env bash
# Install what scripts/slurm_up.sh needs (Debian 12 / Ubuntu, as root): Slurm 22.05 controller, node
# daemon and client commands, munge, and slurmdbd + MariaDB for accounting (submitit and the Slurm
# launcher read job states from `sacct`). --no-install-recommends keeps it to ~30 packages (~15 s).
# Package scripts may try to start system services; nothing here needs them (slurm_up.sh starts its
# own daemons under $SLURM_ROOT), and on machines with a policy-rc.d they are not started at all.
set -euo pipefail
need=(sinfo sbatch sacct slurmctld slurmd slurmdbd munged mungekey mariadbd mariadb-install-db)
missing=0; for c in "${need[@]}"; do command -v "$c" >/dev/null || missing=1; done
if [ "$missing" = 0 ]; then echo "slurm, munge and mariadb already installed" >&2; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
echo "installed: $(dpkg-query -W -f '${Package} ${Version}\n' slurmctld munge mariadb-server | tr '\n' ' ')" >&2
