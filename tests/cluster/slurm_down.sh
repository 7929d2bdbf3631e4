#!/usr/bin/env bash
# Stop the cluster that tests/cluster/slurm_up.sh started from STATE_DIR: each
# daemon by the PID in its pid file (never by name), then the config it wrote.
set -uo pipefail

state=${1:?usage: slurm_down.sh STATE_DIR}
marker="# ftflow test cluster, written by tests/cluster/slurm_up.sh"

stop() { # pid file; SIGTERM, then SIGKILL after 10 s
    local pid_file=$1 pid
    [[ -s $pid_file ]] || return 0
    pid=$(cat "$pid_file")
    kill -TERM "$pid" 2> /dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2> /dev/null || return 0
        sleep 0.2
    done
    kill -KILL "$pid" 2> /dev/null || true
}

# Jobs first, so that no job step outlives the cluster (a test that timed out leaves some).
if [[ -s $state/slurmctld.pid ]] && kill -0 "$(cat "$state/slurmctld.pid")" 2> /dev/null; then
    scancel --full --quiet $(squeue -h -o %i 2> /dev/null) 2> /dev/null || true
fi
stop "$state/slurmd.pid"
stop "$state/slurmctld.pid"
stop "$state/munge/munged.pid"
# Only the config this cluster wrote: its marker and its state folder.
if [[ -e /etc/slurm/slurm.conf ]] && grep -qF "$marker" /etc/slurm/slurm.conf &&
    grep -qxF "# state: $state" /etc/slurm/slurm.conf; then
    rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf
fi
exit 0
