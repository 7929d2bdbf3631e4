#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on loopback: munged + slurmctld + slurmd, all
# run as root from one state folder, for tests of `snakemake --executor slurm`.
#
#   tests/cluster/slurm_up.sh STATE_DIR      # prints "ready" when sinfo shows the node idle
#   tests/cluster/slurm_down.sh STATE_DIR    # stops the daemons by the PIDs in STATE_DIR
#
# Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge
# (`apt-get install -y slurm-wlm munge`). Facts this setup relies on:
#  - the job-step helper of snakemake-executor-plugin-slurm drops SLURM_CONF from
#    the environment, so the config has to be at /etc/slurm/slurm.conf; the file
#    is written with a marker line and a foreign one is never overwritten;
#  - without slurmdbd, sacct cannot answer: the caller polls with squeue
#    (--slurm-status-command squeue), so finished jobs must stay visible to
#    squeue for a while (MinJobAge = 300 s, above the plugin's 120 s threshold);
#  - DefMemPerCPU keeps a job that gives no memory from taking the whole node;
#  - the node declares this machine's real CPUs and memory, so a job asking for
#    more is refused at submission instead of pending forever.
# Two fake GPUs (gres gpu:2 backed by /dev/tty0 and /dev/tty1, which only have
# to exist) let jobs request GPUs with --gpus; SLURM then sets CUDA_VISIBLE_DEVICES.
set -euo pipefail

state=${1:?usage: slurm_up.sh STATE_DIR}
mkdir -p "$state"
state=$(cd "$state" && pwd)
conf_dir=/etc/slurm
marker="# ftflow test cluster, written by tests/cluster/slurm_up.sh"

if [[ $(id -u) -ne 0 ]]; then
    echo "slurm_up.sh: needs root (slurmd starts jobs as their user)" >&2
    exit 2
fi
for tool in munged slurmctld slurmd sinfo sbatch squeue scontrol; do
    command -v "$tool" > /dev/null || {
        echo "slurm_up.sh: $tool not found; apt-get install -y slurm-wlm munge" >&2
        exit 2
    }
done
if [[ -e $conf_dir/slurm.conf ]]; then
    if ! grep -qF "$marker" "$conf_dir/slurm.conf"; then
        echo "slurm_up.sh: $conf_dir/slurm.conf belongs to another cluster; not touching it" >&2
        exit 2
    fi
    # A test cluster left behind by a run that was killed: stop its daemons by their PIDs.
    previous=$(sed -n 's/^# state: //p' "$conf_dir/slurm.conf")
    [[ -n $previous ]] && "$(dirname "$0")/slurm_down.sh" "$previous"
fi

mkdir -p "$state"/{munge,spool,ctld,log}
chmod 700 "$state/munge"

# A free TCP port on loopback for each daemon, so a second cluster or a real one does not clash.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ctld_port=$(free_port)
slurmd_port=$(free_port)
node=$(hostname -s)
cpus=$(nproc)
memory_mb=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)

# munge: its own key and socket, so it needs no system service.
dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$state/munge/munge.key"
munged --force \
    --key-file="$state/munge/munge.key" \
    --socket="$state/munge/munge.sock" \
    --pid-file="$state/munge/munged.pid" \
    --log-file="$state/log/munged.log" \
    --seed-file="$state/munge/munged.seed"

mkdir -p "$conf_dir"
cat > "$conf_dir/slurm.conf" << EOF
$marker
# state: $state
ClusterName=ftflowtest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
AuthInfo=socket=$state/munge/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
MinJobAge=300
DefMemPerCPU=512
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
cat > "$conf_dir/gres.conf" << EOF
$marker
NodeName=$node Name=gpu File=/dev/tty[0-1]
EOF

slurmctld -i -f "$conf_dir/slurm.conf"
slurmd -f "$conf_dir/slurm.conf"

for _ in $(seq 1 60); do
    if sinfo -h -N -o '%T' 2> /dev/null | grep -qx idle; then
        echo ready
        exit 0
    fi
    sleep 0.5
done
echo "slurm_up.sh: the node did not become idle in 30 s" >&2
sinfo -N -l >&2 || true
tail -n 20 "$state"/log/*.log >&2 || true
exit 1
