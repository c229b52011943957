#!/usr/bin/env bash
# Start a one-node Slurm 22.05 cluster on 127.0.0.1, for the tests and for anyone trying the Slurm
# launcher on one machine. As root, no systemd, no cgroups (proctrack/linuxproc, task/none);
# nothing in /etc is touched. Install the packages first: scripts/install_slurm.sh.
#
# Convention, shared by every script and test that needs a local cluster (the SkyPilot launcher's too):
#   SLURM_ROOT  the folder holding all cluster state; default /tmp/arena-slurm. Inside it:
#               slurm.conf, slurmdbd.conf, munge/ (key), run/ (sockets, pid files), log/, state/,
#               spool/, mysql/ (MariaDB data).
#   SLURM_CONF  $SLURM_ROOT/slurm.conf: every Slurm command, submitit and the tests need it set.
#   127.0.0.1   slurmctld :16817, slurmd :16818, slurmdbd :16819, MariaDB :13306 (one cluster per
#               machine at a time); node `localhost`, partition `debug` (the default), accounting on
#               so `sacct` tells CANCELLED / TIMEOUT / NODE_FAIL apart.
#   SLURM_CPUS  CPUs the node offers (default: nproc); more than the machine has oversubscribes it.
#
# Usage: eval "$(scripts/slurm_up.sh)"   stdout is one line, `export SLURM_CONF=...`; progress goes
# to stderr. Idempotent: with the cluster up it starts nothing; after scripts/slurm_down.sh (or
# anything that killed the daemons) it restarts the missing ones on the same state (jobs, accounting).
# `--fresh` first stops whatever runs from $SLURM_ROOT and deletes it: no jobs left over from an
# earlier session, job ids from 1 (for CI).
set -euo pipefail
R=${SLURM_ROOT:-/tmp/arena-slurm}
if [ "${1:-}" = --fresh ]; then SLURM_ROOT=$R bash "$(dirname "$0")/slurm_down.sh" --purge; fi
mkdir -p "$R"
R=$(cd "$R" && pwd)
export SLURM_CONF=$R/slurm.conf
CPUS=${SLURM_CPUS:-$(nproc)}
say() { echo "slurm_up: $*" >&2; }

# A daemon is up when its pid file names a live process of that name (pid files outlive reboots).
alive() {
  local p; p=$(cat "$R/run/$1.pid" 2>/dev/null) || return 1
  [ -n "$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = "$1" ]
}
node_idle() { timeout 5 sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

for c in munged mungekey slurmctld slurmd slurmdbd mariadbd mariadb-install-db sinfo; do
  command -v $c >/dev/null || { say "$c not found: run scripts/install_slurm.sh first"; exit 1; }
done

if alive munged && alive mariadbd && alive slurmdbd && alive slurmctld && alive slurmd && node_idle; then
  say "already up at $R"
  echo "export SLURM_CONF=$SLURM_CONF"
  exit 0
fi
mkdir -p $R/run $R/log $R/state $R/spool $R/munge $R/mysql
chmod 700 $R/munge

# --- munge: the credentials every daemon and client uses -----------------------------------
[ -f $R/munge/munge.key ] || mungekey --create --keyfile=$R/munge/munge.key
chmod 600 $R/munge/munge.key
alive munged || munged --key-file=$R/munge/munge.key --socket=$R/run/munge.sock --force \
  --pid-file=$R/run/munged.pid --log-file=$R/log/munged.log --seed-file=$R/munge/munged.seed

# --- configuration (regenerated only while the cluster is down) ----------------------------
MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
# AuthInfo cred_expire=10 cuts Slurm's requeue delay from ~150 s to ~15 s. With slurmdbd,
# AccountingStoragePass is the munge socket for controller->dbd traffic; without it slurmctld dies.
cat > $R/slurm.conf <<CONF
ClusterName=arena
SlurmctldHost=localhost
AuthType=auth/munge
AuthInfo=socket=$R/run/munge.sock,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$R/state
SlurmdSpoolDir=$R/spool
SlurmctldPidFile=$R/run/slurmctld.pid
SlurmdPidFile=$R/run/slurmd.pid
SlurmctldLogFile=$R/log/slurmctld.log
SlurmdLogFile=$R/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=16819
AccountingStoragePass=$R/run/munge.sock
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule a submitted job at once instead of batching submissions for up to 3 s.
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
cat > $R/slurmdbd.conf <<CONF
AuthType=auth/munge
AuthInfo=socket=$R/run/munge.sock,cred_expire=10
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=16819
SlurmUser=root
LogFile=$R/log/slurmdbd.log
PidFile=$R/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=13306
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF
chmod 600 $R/slurmdbd.conf

# --- accounting: MariaDB on 127.0.0.1:13306, slurmdbd on :16819 -----------------------------
if ! alive mariadbd; then
  [ -d $R/mysql/mysql ] || mariadb-install-db --no-defaults --user=root --datadir=$R/mysql \
      --auth-root-authentication-method=socket >$R/log/mariadb-install.log 2>&1
  mariadbd --no-defaults --user=root --datadir=$R/mysql --socket=$R/run/mysqld.sock \
    --pid-file=$R/run/mariadbd.pid --port=13306 --bind-address=127.0.0.1 --skip-name-resolve \
    --log-error=$R/log/mariadb.err --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
  for i in $(seq 1 60); do mariadb-admin --no-defaults -S $R/run/mysqld.sock ping >/dev/null 2>&1 && break; sleep 0.5; done
  mariadb --no-defaults -S $R/run/mysqld.sock -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'%' \
    IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'%'; FLUSH PRIVILEGES;"
fi
if ! alive slurmdbd; then
  slurmdbd   # reads dirname($SLURM_CONF)/slurmdbd.conf
  for i in $(seq 1 60); do timeout 5 sacctmgr -n -P show cluster >/dev/null 2>&1 && break; sleep 0.5; done
fi

# --- controller and node daemon (the hostname is not `localhost`, hence -N) ---------------
alive slurmctld || slurmctld -f $R/slurm.conf
alive slurmd || slurmd -f $R/slurm.conf -N localhost
for i in $(seq 1 60); do
  # A node left down or drained (a test that failed a node, a killed slurmd) is put back in service.
  [ $i = 10 ] && scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
  if node_idle; then say "up at $R ($CPUS CPUs, partition debug)"; echo "export SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 0.5
done
say "the node did not come up; last log lines:"
sinfo -N -l >&2 || true
tail -n 20 $R/log/slurmctld.log $R/log/slurmd.log $R/log/slurmdbd.log >&2 || true
exit 1
