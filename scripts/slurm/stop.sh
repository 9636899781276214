#!/usr/bin/env bash
# Stops the cluster scripts/slurm/start.sh started in STATE_DIR: cancels its jobs, then kills exactly
# the daemons recorded in STATE_DIR/pids (TERM, wait, then KILL) and nothing else, and removes the
# short socket directory STATE_DIR/run links to. Does nothing when no cluster is recorded there, so
# it is safe to call twice.
#
# Usage: scripts/slurm/stop.sh STATE_DIR
set -euo pipefail

say() { echo "slurm/stop.sh: $*" >&2; }

if [ $# -ne 1 ]; then
  say "usage: stop.sh STATE_DIR"
  exit 2
fi
state="$1"
pids_file="$state/pids"

# The short directory start.sh made for the daemons' sockets (STATE_DIR/run links to it); removed
# once no daemon uses it.
remove_runtime_dir() {
  if [ -L "$state/run" ]; then
    rm -rf "$(readlink "$state/run")"
    rm -f "$state/run"
  fi
}
if [ ! -e "$pids_file" ]; then
  remove_runtime_dir
  exit 0
fi

# A recorded PID counts only while it still names the daemon we started (a PID reused by an unrelated
# process after the daemon died must never be killed) and is not a zombie (an exited daemon whose
# parent has not reaped it yet; nothing is left to stop).
alive() {
  local stat
  stat="$(cat "/proc/$2/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"  # fields after "PID (COMM) ", the first being the state letter
  [ "${stat%% *}" != Z ] && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]
}

# Job steps run under slurmstepd, which is not among our PIDs and outlives slurmd: cancel the jobs
# through the controller while it is up, so no job of this cluster keeps running after it.
if [ -e "$state/slurm.conf" ] && grep -q '^slurmctld ' "$pids_file" &&
   alive slurmctld "$(awk '$1 == "slurmctld" {print $2}' "$pids_file")"; then
  export SLURM_CONF="$state/slurm.conf"
  jobs="$(squeue -h -o %F 2>/dev/null | sort -u | tr '\n' ' ' || true)"
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086  # one job id per word
    scancel $jobs || true
    for _ in $(seq 150); do
      [ -z "$(squeue -h -o %F 2>/dev/null || true)" ] && break
      sleep 0.1
    done
  fi
fi

# Reverse start order (slurmd, slurmctld, munged): each daemon goes before the ones it talks to.
mapfile -t entries < <(tac "$pids_file")
for entry in "${entries[@]}"; do
  read -r name pid <<< "$entry"
  alive "$name" "$pid" || continue
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    alive "$name" "$pid" || break
    sleep 0.1
  done
  if alive "$name" "$pid"; then
    say "$name ($pid) still up 10 s after TERM; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
done
remove_runtime_dir
rm -f "$pids_file"
