#!/usr/bin/env bash
# A real, private, one-node SLURM on this machine, for testing the sbatch scripts.
#
#   slurm/local-cluster.sh start     install (if needed) and start munged, slurmctld, slurmd;
#                                    wait until the node is idle; print the SLURM_CONF to export
#   slurm/local-cluster.sh stop      cancel its jobs, stop the daemons this script started
#   slurm/local-cluster.sh status    what runs (daemons, node state, queue)
#   slurm/local-cluster.sh env       print `export SLURM_CONF=...` (eval "$(slurm/local-cluster.sh env)")
#   slurm/local-cluster.sh purge     stop, then delete the state directory
#
# Everything lives under one directory, MPITRAIN_SLURM_DIR (default /tmp/mpitrain-slurm):
# slurm.conf, the munge key and socket, controller state, spool, logs and pid files.
# Nothing under /etc is written; the daemons use their own ports, so a system SLURM or
# munge on the same machine is left alone. Clients (sbatch, srun, squeue, ...) find this
# cluster through SLURM_CONF, which you must export.
#
# Knobs (environment):
#   MPITRAIN_SLURM_DIR    state directory                      [/tmp/mpitrain-slurm]
#   MPITRAIN_SLURM_PORT   slurmctld port; slurmd uses PORT+1    [6917]
#   MPITRAIN_SLURM_CPUS   CPUs the node declares (may exceed the real cores, so that
#                         3- and 4-task jobs fit on a 2-core machine)           [4]
#   MPITRAIN_SLURM_GPUS   fake GPUs the node declares (GRES gpu backed by placeholder files,
#                         so SLURM sets CUDA_VISIBLE_DEVICES as on a GPU node; for testing how
#                         --gpus-per-task / --gres bind GPUs to ranks; nothing runs on them) [0]
#   MPITRAIN_SLURM_NO_INSTALL=1   never run apt-get; fail if the packages are missing
#
# Exit status: 0 ok; 3 when this machine cannot run it (not root, SLURM missing and no apt,
# no network); 1 for any other failure (with the log lines that explain it).
# Needs: root (slurmd launches jobs as the submitting user) and the Debian/Ubuntu packages
# slurmctld slurmd slurm-client munge, which `start` installs with apt-get when missing.
# Tested with SLURM 22.05 (Debian 12). The node has no cgroups (proctrack/linuxproc,
# task/none), no accounting, JobRequeue=1, KillWait=5 s, and no memory limits.
set -u

DIR=${MPITRAIN_SLURM_DIR:-/tmp/mpitrain-slurm}
PORT=${MPITRAIN_SLURM_PORT:-6917}
CPUS=${MPITRAIN_SLURM_CPUS:-4}
GPUS=${MPITRAIN_SLURM_GPUS:-0}
NODE=$(hostname -s)
CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=$DIR/munge/run/munge.socket.2
PACKAGES="slurmctld slurmd slurm-client munge"
WAIT_S=60

say() { echo "local-cluster: $*"; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }
cannot_run() { echo "local-cluster: error: $*" >&2; exit 3; }   # exit 3: this machine cannot run it (see the header)

pid_of() {  # pid from a pid file, only if that process is alive
  local f=$1 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && { echo "$pid"; return 0; }
  return 1
}

have_packages() {
  command -v munged >/dev/null && command -v slurmctld >/dev/null \
    && command -v slurmd >/dev/null && command -v sbatch >/dev/null
}

install_packages() {
  have_packages && return 0
  [ "${MPITRAIN_SLURM_NO_INSTALL:-0}" = 1 ] && cannot_run "SLURM is not installed ($PACKAGES) and MPITRAIN_SLURM_NO_INSTALL=1"
  [ "$(id -u)" = 0 ] || cannot_run "SLURM is not installed; as root run: apt-get install $PACKAGES"
  command -v apt-get >/dev/null || cannot_run "SLURM is not installed and there is no apt-get; install $PACKAGES with your package manager"
  say "installing $PACKAGES (apt-get, about a minute) ..."
  export DEBIAN_FRONTEND=noninteractive
  local log=/tmp/mpitrain-slurm-apt.$$.log
  # shellcheck disable=SC2086  # $PACKAGES: several words
  if ! { timeout 300 apt-get update -q \
         && timeout 600 apt-get install -y -q --no-install-recommends $PACKAGES; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    cannot_run "apt-get could not install $PACKAGES (full log: $log)"
  fi
  rm -f "$log"
  have_packages || die "apt-get finished but munged/slurmctld/slurmd/sbatch are still missing"
}

port_busy() {  # is a TCP port listened on (by someone other than our daemons)?
  if command -v ss >/dev/null; then
    ss -ltnH "sport = :$1" 2>/dev/null | grep -q .
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

write_config() {
  mkdir -p "$DIR"/{etc,state,spool,log,run,munge/etc,munge/run,munge/lib} || die "cannot create $DIR"
  # munged insists: key directory 0700 with a 0400 key, socket directory 0755, and no
  # group/other-writable directory on the way (the state dir sits in /tmp, so it is 0755).
  chmod 0755 "$DIR" "$DIR/munge" "$DIR/munge/run" "$DIR/log"
  chmod 0700 "$DIR/munge/etc" "$DIR/munge/lib"
  if [ ! -s "$DIR/munge/etc/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/etc/munge.key" bs=1024 count=1 status=none \
      || die "cannot write the munge key"
  fi
  chmod 0400 "$DIR/munge/etc/munge.key"
  cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: a private one-node test cluster. Do not use in production.
ClusterName=mpitrain-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
PlugStackConfig=$DIR/etc/plugstack.conf
# No cgroups, no accounting: runs in containers and without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# The node may declare more CPUs than the machine has.
SlurmdParameters=config_overrides
ReturnToService=2
# Requeue (scontrol requeue, --requeue) and short time limits for tests.
JobRequeue=1
KillWait=5
OverTimeLimit=0
MinJobAge=600
InactiveLimit=0
MessageTimeout=10
SlurmdTimeout=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  : >"$DIR/etc/plugstack.conf"
  : >"$DIR/etc/gres.conf"
  if [ "$GPUS" -gt 0 ]; then
    mkdir -p "$DIR/dev"
    local i
    for i in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$DIR/dev/gpu$i"; done   # slurmd wants character devices
    echo "NodeName=$NODE Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" >"$DIR/etc/gres.conf"
    sed -i -e "s|^NodeName=.*|& Gres=gpu:$GPUS|" -e "s|^SelectTypeParameters=.*|&\nGresTypes=gpu|" "$CONF"
  fi
}

start_munged() {
  if pid_of "$DIR/munge/run/munged.pid" >/dev/null; then return 0; fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --key-file="$DIR/munge/etc/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$DIR/munge/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/lib/munged.seed" \
    || { tail -n 5 "$DIR/log/munged.log" >&2 2>/dev/null; die "munged did not start (log: $DIR/log/munged.log)"; }
  local i
  for i in $(seq 50); do [ -S "$MUNGE_SOCKET" ] && return 0; sleep 0.1; done
  die "munged started but its socket $MUNGE_SOCKET did not appear (log: $DIR/log/munged.log)"
}

start_daemon() {  # start_daemon NAME PIDFILE PORT CMD...
  local name=$1 pidfile=$2 port=$3; shift 3
  if pid_of "$pidfile" >/dev/null; then return 0; fi
  if port_busy "$port"; then
    die "port $port (for $name) is taken by another program; set MPITRAIN_SLURM_PORT to a free port"
  fi
  "$@" || die "$name did not start (log: $DIR/log/$name.log)"
  local i
  for i in $(seq 50); do pid_of "$pidfile" >/dev/null && return 0; sleep 0.1; done
  tail -n 15 "$DIR/log/$name.log" >&2 2>/dev/null
  die "$name exited right after starting (log: $DIR/log/$name.log)"
}

node_state() { SLURM_CONF=$CONF timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1; }

cmd_start() {
  install_packages
  if pid_of "$DIR/run/slurmctld.pid" >/dev/null && pid_of "$DIR/run/slurmd.pid" >/dev/null \
     && pid_of "$DIR/munge/run/munged.pid" >/dev/null && [ -n "$(node_state)" ]; then
    say "already running (node $NODE: $(node_state))"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  [ "$(id -u)" = 0 ] || cannot_run "start needs root: slurmd must be able to launch jobs as the submitting user"
  # Config is (re)written only while the controller is down, so a running one never
  # sees a file it did not read.
  if ! pid_of "$DIR/run/slurmctld.pid" >/dev/null; then write_config; fi
  start_munged
  export SLURM_CONF=$CONF
  start_daemon slurmctld "$DIR/run/slurmctld.pid" "$PORT" slurmctld -f "$CONF"
  start_daemon slurmd "$DIR/run/slurmd.pid" "$((PORT + 1))" slurmd -f "$CONF"
  local i st=""
  for i in $(seq $((WAIT_S * 2))); do
    st=$(node_state)
    case "$st" in
      idle*|mix*|alloc*|comp*) break ;;
      down*|drain*|drng*|fail*)
        timeout 10 scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 ;;
    esac
    sleep 0.5
  done
  case "$st" in
    idle*|mix*|alloc*|comp*) ;;
    *) tail -n 10 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null
       die "node $NODE did not become idle within ${WAIT_S}s (state: '${st:-no answer}'; logs in $DIR/log)" ;;
  esac
  say "running: node $NODE ($(grep -o 'CPUs=[0-9]*' "$CONF" | head -n 1)$(grep -o ' Gres=[^ ]*' "$CONF"), state $st), partition debug, state in $DIR"
  echo "export SLURM_CONF=$CONF"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
  local name=$1 pidfile=$2 pid i
  pid=$(pid_of "$pidfile") || { rm -f "$pidfile"; return 0; }
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name (pid $pid) ignored TERM for 10 s; killing it"
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$pidfile"
  say "stopped $name (pid $pid)"
}

cmd_stop() {
  if [ ! -d "$DIR" ]; then say "nothing to stop ($DIR does not exist)"; return 0; fi
  export SLURM_CONF=$CONF
  if pid_of "$DIR/run/slurmctld.pid" >/dev/null && [ -n "$(squeue -h -o %i 2>/dev/null | head -n 1)" ]; then
    say "cancelling the jobs still queued or running"
    timeout 10 scancel --full --quiet --partition=debug 2>/dev/null || true
    local i
    for i in $(seq 30); do [ -z "$(timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  stop_pidfile slurmd "$DIR/run/slurmd.pid"
  stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
  stop_pidfile munged "$DIR/munge/run/munged.pid"
}

cmd_status() {
  local rc=0 name pidfile pid
  for name in munged slurmctld slurmd; do
    case $name in munged) pidfile=$DIR/munge/run/munged.pid ;; *) pidfile=$DIR/run/$name.pid ;; esac
    if pid=$(pid_of "$pidfile"); then say "$name running (pid $pid)"; else say "$name not running"; rc=1; fi
  done
  if [ $rc = 0 ]; then
    export SLURM_CONF=$CONF
    timeout 10 sinfo || rc=1
    timeout 10 squeue || rc=1
    echo "export SLURM_CONF=$CONF"
  fi
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  purge) cmd_stop; rm -rf "$DIR"; say "removed $DIR" ;;
  *) echo "usage: $0 start|stop|status|env|purge   (state in MPITRAIN_SLURM_DIR=$DIR)" >&2; exit 2 ;;
esac
