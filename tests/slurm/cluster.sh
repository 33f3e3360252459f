#!/usr/bin/env bash
# A real single-node SLURM on this host: the scheduler the workflow's cluster test
# (tests/test_slurm.py) submits to, and a way to try the SLURM profile on one machine.
#
#   tests/slurm/cluster.sh start    install slurm-wlm + munge when missing (apt-get, root),
#                                   write slurm.conf for this host, start munged, slurmctld
#                                   and slurmd, wait until the node is idle
#   tests/slurm/cluster.sh stop     cancel every job, stop the daemons
#   tests/slurm/cluster.sh status   sinfo
#
# The configuration is the smallest real one (as the SLURM executor plugin's own CI runs):
# one node with this host's CPUs and memory (`slurmd -C`), one partition, processes tracked
# by /proc (proctrack/linuxproc, task/none: no cgroups, no systemd), no accounting database
# (so `sacct` knows nothing: query job status with squeue). It writes /etc/slurm/slurm.conf
# only when that file is absent or was written by this script.
set -euo pipefail

PARTITION=${MEDPIPE_SLURM_PARTITION:-debug}
STATE=${MEDPIPE_SLURM_STATE:-/var/lib/medpipe-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by medpipe tests/slurm/cluster.sh"

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
  fi
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "error: $CONF exists and was not written by this script; not touching it" >&2
    exit 1
  fi
  local node cpus memory
  node=$(hostname -s)
  cpus=$(slurmd -C | grep -o 'CPUs=[0-9]*' | cut -d= -f2)
  memory=$(slurmd -C | grep -o 'RealMemory=[0-9]*' | cut -d= -f2)
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
  cat > "$CONF" <<CONF
$MARK
ClusterName=medpipe
SlurmctldHost=$node
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# finished jobs stay visible to squeue for 10 minutes (status by squeue needs that)
MinJobAge=600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
NodeName=$node CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

wait_idle() {
  for _ in $(seq 60); do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -1)
    case "$state" in
      idle|mixed|allocated) echo "slurm: node $(hostname -s) $state, partition $PARTITION"; return 0 ;;
      drain*|down*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  echo "error: the SLURM node did not become idle; see $STATE/log/" >&2
  sinfo -N -l >&2 || true
  exit 1
}

case "${1:-}" in
  start)
    install
    start_munge
    write_conf
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    wait_idle
    ;;
  stop)
    scancel --user="$(id -un)" 2>/dev/null || true
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    ;;
  status)
    sinfo -N -l
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
