#!/usr/bin/env bash
# Starts a private single-node Slurm cluster (munged, slurmctld, slurmd) for the sweep tests: its
# config, state, logs and PID files live under STATE_DIR (munged and the sockets in a short directory
# it links to, see below), on free ports, leaving the system's Slurm and munge configuration alone.
# Prints `SLURM_CONF=STATE_DIR/slurm.conf` on stdout: Slurm clients (sbatch, squeue, kvdrift sweep)
# need it in their environment. scripts/slurm/stop.sh STATE_DIR stops exactly the daemons this started.
#
# Usage: scripts/slurm/start.sh STATE_DIR
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
say() { echo "slurm/start.sh: $*" >&2; }

if [ $# -ne 1 ]; then
  say "usage: start.sh STATE_DIR"
  exit 2
fi

# Each binary with the Debian package that provides it, so a missing one names what to install.
for tool in munged:munge mungekey:munge slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client \
            sbatch:slurm-client squeue:slurm-client scancel:slurm-client; do
  if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
    say "${tool%%:*} not found: install the Debian package ${tool#*:} (slurm-wlm and munge; scripts/setup.sh does)"
    exit 1
  fi
done

mkdir -p "$1"
state="$(cd "$1" && pwd)"

# A cluster left running from an earlier run in this STATE_DIR: stop it (by its recorded PIDs) and
# start from clean state rather than inherit its queue.
if [ -e "$state/pids" ]; then
  say "stopping the cluster an earlier run left in $state"
fi
bash "$here/stop.sh" "$state"
rm -rf "$state/ctld" "$state/log" "$state/slurm.conf"
mkdir -p "$state/ctld" "$state/log"
# Unix sockets (munged's, and slurmd's in its spool directory) must have paths under 108 bytes, which
# a STATE_DIR deep in a build tree exceeds: they live in a short directory under /tmp, recorded as
# the symlink STATE_DIR/run so that stop.sh removes it. munged's key, log and socket go there too:
# munged refuses files in or under a directory others may write to, and that directory is ours alone
# (0755 under the sticky /tmp) whatever the umask of the build tree.
runtime="$(mktemp -d /tmp/kvdrift-slurm.XXXXXX)"
ln -s "$runtime" "$state/run"
mkdir -p "$runtime/munge" "$runtime/slurmd"
chmod 755 "$runtime" "$runtime/munge"
: > "$state/pids"

daemon_logs() {
  for log in "$runtime/munge/munged.log" "$state/log/slurmctld.log" "$state/log/slurmd.log" \
             "$state/log/"*.out; do
    [ -s "$log" ] || continue
    echo "--- last lines of $log" >&2
    tail -n 20 "$log" >&2
  done
}
# Never leave a half-started cluster behind: on any failure (an error or an explicit exit) stop
# whatever was already started. Cleared once the cluster is up.
on_failure() {
  say "failed; daemon logs follow and the daemons started so far are stopped"
  daemon_logs
  bash "$here/stop.sh" "$state" || true
}
trap on_failure EXIT

# Ports are chosen while holding a host-wide lock, so two clusters started at the same time (two
# build trees testing at once) do not pick the same free ports. The lock is released when this script
# exits; daemons get the descriptor closed (9>&-) so they do not hold it for their lifetime.
exec 9>"${TMPDIR:-/tmp}/kvdrift-slurm-start.lock"
flock -w 120 9 || { say "timed out waiting for ${TMPDIR:-/tmp}/kvdrift-slurm-start.lock"; exit 1; }
port_in_use() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ctld_port=""
for ((port = 6817; port < 7017; port += 2)); do
  if ! port_in_use "$port" && ! port_in_use "$((port + 1))"; then
    ctld_port=$port
    break
  fi
done
if [ -z "$ctld_port" ]; then
  say "no two free TCP ports between 6817 and 7017 for slurmctld and slurmd"
  exit 1
fi

# The node as slurmd sees it (real CPUs, sockets, cores, memory), so the controller accepts its
# registration instead of draining it for a mismatch.
node="$(hostname -s)"
hardware="$(slurmd -C | head -n 1 | sed -E 's/^NodeName=[^ ]+ //')"

cat > "$state/slurm.conf" <<EOF
# Written by scripts/slurm/start.sh for a private single-node test cluster.
ClusterName=kvdrift
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$((ctld_port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged, so the system's /etc/munge and /run/munge stay untouched.
AuthInfo=socket=$runtime/munge/munge.socket
# No cgroups in containers: process-group tracking and no task binding.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$runtime/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
# Short timeouts: a test cluster should come up, cancel and shut down in seconds.
SlurmctldTimeout=10
SlurmdTimeout=10
MessageTimeout=10
KillWait=5
ReturnToService=2
NodeName=$node NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$state/slurm.conf"

# Starts daemon NAME (the command after PID_FILE; it forks into the background), waits (bounded) for
# its PID file, and records "NAME PID" in STATE_DIR/pids for stop.sh.
start_daemon() {
  local name=$1 pid_file=$2 status=0
  shift 2
  "$@" </dev/null >"$state/log/$name.out" 2>&1 9>&- || status=$?
  if [ "$status" -ne 0 ]; then
    say "$name exited with status $status while starting"
    return 1
  fi
  for _ in $(seq 100); do
    if [ -s "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
      echo "$name $(cat "$pid_file")" >> "$state/pids"
      return 0
    fi
    sleep 0.1
  done
  say "$name did not start (no live PID in $pid_file after 10 s)"
  return 1
}

mungekey --create --keyfile="$runtime/munge/munge.key"
chmod 600 "$runtime/munge/munge.key"
start_daemon munged "$runtime/munge/munged.pid" \
  munged --key-file="$runtime/munge/munge.key" --socket="$runtime/munge/munge.socket" \
  --pid-file="$runtime/munge/munged.pid" --log-file="$runtime/munge/munged.log" \
  --seed-file="$runtime/munge/munged.seed"
start_daemon slurmctld "$state/slurmctld.pid" slurmctld -f "$SLURM_CONF"
start_daemon slurmd "$state/slurmd.pid" slurmd -f "$SLURM_CONF"

# The cluster is usable once the controller lists the node idle (registered, nothing running).
node_state=""
for _ in $(seq 300); do
  node_state="$(sinfo -h -n "$node" -o %T 2>/dev/null || true)"
  [ "$node_state" = "idle" ] && break
  sleep 0.1
done
if [ "$node_state" != "idle" ]; then
  say "node $node not idle after 30 s (sinfo says '${node_state:-nothing}')"
  exit 1
fi

trap - EXIT
say "cluster up: node $node, slurmctld port $ctld_port, daemons $(tr '\n' ' ' < "$state/pids")"
echo "SLURM_CONF=$SLURM_CONF"
