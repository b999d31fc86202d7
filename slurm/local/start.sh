#!/usr/bin/env bash
# Start a throw-away SLURM cluster on this machine: munged, slurmctld and one slurmd per "node" (node1, node2, ...),
# all on 127.0.0.1, all state under one directory. For trying the sbatch scripts on a laptop and for the tests.
#
#   sudo slurm/local/install.sh                 # once: Debian packages slurmctld slurmd slurm-client munge
#   sudo slurm/local/start.sh --nodes 2         # idempotent: a running cluster of the same shape is left alone
#   source /tmp/albef-slurm/env.sh              # exports SLURM_CONF (every client command needs it)
#   sbatch --nodes 2 ... slurm/pretrain.sbatch pretrain/configs/tiny_cpu.yaml
#   sudo slurm/local/stop.sh
#
# Options (all optional):
#   --nodes N        slurmd "nodes" node1..nodeN (default 1)
#   --cpus N         CPUs each node declares (default: nproc; more than the machine has is allowed)
#   --gpus N         fake GPUs per node as GRES gpu:N (device files are symlinks to /dev/null; default 0), so that
#                    scripts with --gpus-per-node run unchanged; CUDA stays unavailable inside the jobs
#   --dir DIR        where config, state, logs and sockets live (default $ALBEF_SLURM_DIR or /tmp/albef-slurm)
#   --ctld-port P    slurmctld port (default 6817)
#   --node-port P    port of node1; nodeK uses P+K-1 (default 17001)
#   --timeout S      seconds to wait for the nodes to become idle (default 60)
#   --requeue-delay S  AuthInfo cred_expire: also the seconds a requeued job waits before it may start again
#                    (default 10 here; SLURM's default, and what real clusters have, is 120)
#   --kill-wait S    seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or times out (default 30)
#
# Needs root (slurmd launches job steps; munged must run as the munge user). Exit codes: 0 running, 2 bad usage,
# 3 not root, 5 SLURM/munge not installed, 6 a differently shaped cluster already runs in DIR, 1 start failed.
set -euo pipefail

NODES=1
CPUS=$(nproc)
GPUS=0
DIR=${ALBEF_SLURM_DIR:-/tmp/albef-slurm}
CTLD_PORT=6817
NODE_PORT=17001
TIMEOUT=60
CRED_EXPIRE=10
KILL_WAIT=30

die() { echo "start.sh: error: $2" >&2; exit "$1"; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
need_int() { [[ $2 =~ ^[0-9]+$ ]] || die 2 "$1 expects a non-negative integer, got '$2'"; }

while (( $# )); do
    case $1 in
        --nodes) need_int "$1" "${2-}"; NODES=$2; shift 2 ;;
        --cpus) need_int "$1" "${2-}"; CPUS=$2; shift 2 ;;
        --gpus) need_int "$1" "${2-}"; GPUS=$2; shift 2 ;;
        --dir) [[ -n ${2-} ]] || die 2 "--dir expects a path"; DIR=$2; shift 2 ;;
        --ctld-port) need_int "$1" "${2-}"; CTLD_PORT=$2; shift 2 ;;
        --node-port) need_int "$1" "${2-}"; NODE_PORT=$2; shift 2 ;;
        --timeout) need_int "$1" "${2-}"; TIMEOUT=$2; shift 2 ;;
        --requeue-delay) need_int "$1" "${2-}"; CRED_EXPIRE=$2; shift 2 ;;
        --kill-wait) need_int "$1" "${2-}"; KILL_WAIT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die 2 "unknown option '$1' (see --help)" ;;
    esac
done
(( NODES >= 1 && NODES <= 16 )) || die 2 "--nodes must be between 1 and 16, got $NODES"
(( CPUS >= 1 )) || die 2 "--cpus must be at least 1"
(( EUID == 0 )) || die 3 "the local cluster needs root (slurmd launches jobs, munged runs as the munge user)"
for c in slurmctld slurmd scontrol sinfo munged munge unmunge runuser; do
    command -v "$c" >/dev/null 2>&1 || die 5 "'$c' not found: run slurm/local/install.sh first"
done
id munge >/dev/null 2>&1 || die 5 "no 'munge' user: run slurm/local/install.sh first"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd -P)
CONF=$DIR/slurm.conf
SHAPE="nodes=$NODES cpus=$CPUS gpus=$GPUS ctld_port=$CTLD_PORT node_port=$NODE_PORT requeue_delay=$CRED_EXPIRE kill_wait=$KILL_WAIT"
HOST=$(hostname -s)
export SLURM_CONF=$CONF

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---- already running? ----------------------------------------------------------------------------------------
if [[ -f $DIR/shape ]] && pid_alive "$DIR/run/slurmctld.pid" && scontrol ping 2>/dev/null | grep -q 'is UP'; then
    running=$(cat "$DIR/shape")
    if [[ $running != "$SHAPE" ]]; then
        die 6 "a cluster with a different shape runs in $DIR ($running); stop it first: slurm/local/stop.sh --dir $DIR"
    fi
    all_up=1
    for ((i = 1; i <= NODES; i++)); do pid_alive "$DIR/run/slurmd-node$i.pid" || all_up=0; done
    if (( all_up )); then
        echo "start.sh: already running in $DIR ($SHAPE)"
        echo "start.sh: source $DIR/env.sh"
        exit 0
    fi
    echo "start.sh: a slurmd of the cluster in $DIR is gone: restarting the cluster"
fi
# Anything left over from an earlier start in this directory goes first (a reused state dir resurrects old jobs).
"$(dirname "${BASH_SOURCE[0]}")/stop.sh" --dir "$DIR" --quiet || true
rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log" "$DIR/munge" "$DIR/fake-gpus"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log"
chmod 0755 "$DIR"

# munged runs as the munge user and must be able to reach its socket directory.
install -d -o munge -g munge -m 0755 "$DIR/munge"
if ! runuser -u munge -- test -w "$DIR/munge"; then
    die 1 "the munge user cannot reach $DIR/munge (is a parent directory private, e.g. mode 0700?): choose --dir elsewhere"
fi

# ---- node names resolve to this machine (MASTER_ADDR is the first name of the job's node list) ----------------
for ((i = 1; i <= NODES; i++)); do
    if ! getent hosts "node$i" >/dev/null 2>&1; then
        echo "127.0.0.1 node$i # added by albef slurm/local/start.sh" >>/etc/hosts
    fi
done

# ---- configuration ---------------------------------------------------------------------------------------------
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 * 0.9 / 1024}' /proc/meminfo)
GRES_LINE=""
if (( GPUS > 0 )); then
    mkdir -p "$DIR/fake-gpus"
    : >"$DIR/gres.conf"
    for ((i = 1; i <= NODES; i++)); do
        files=()
        for ((g = 0; g < GPUS; g++)); do
            ln -sf /dev/null "$DIR/fake-gpus/node$i-gpu$g"
            files+=("$DIR/fake-gpus/node$i-gpu$g")
        done
        (IFS=,; echo "NodeName=node$i Name=gpu File=${files[*]}") >>"$DIR/gres.conf"
    done
    GRES_LINE="Gres=gpu:$GPUS"
fi

{
    echo "# Written by slurm/local/start.sh ($SHAPE). Throw-away: state lives in $DIR and is wiped on start."
    echo "ClusterName=albeflocal"
    echo "SlurmctldHost=$HOST(127.0.0.1)"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmdPort=$NODE_PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
    echo "AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "MpiDefault=none"
    # Without batch_sched_delay=0 every job waits for a 3 s scheduling tick; a requeued job that becomes eligible
    # waits for the next periodic pass (sched_interval, default 60 s; backfill every bf_interval, default 30 s).
    echo "SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2"
    # Without it an afterok dependency on a failed job pends forever.
    echo "DependencyParameters=kill_invalid_depend"
    # Nodes may declare more CPUs/GPUs than the machine has.
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    echo "MailProg=/bin/true"
    # Batch jobs may be requeued (the sbatch scripts also say --requeue). RequeueExit is deliberately NOT set:
    # requeueing on exit code 75 is the batch script's job, as on a real cluster where admins rarely set it.
    echo "JobRequeue=1"
    # Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or hits its time limit.
    echo "KillWait=$KILL_WAIT"
    # Finished jobs stay visible to 'scontrol show job' for this long (there is no slurmdbd/sacct here).
    echo "MinJobAge=600"
    (( GPUS > 0 )) && echo "GresTypes=gpu"
    for ((i = 1; i <= NODES; i++)); do
        echo "NodeName=node$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((NODE_PORT + i - 1)) CPUs=$CPUS RealMemory=$MEM_MB $GRES_LINE State=UNKNOWN"
    done
    if (( NODES == 1 )); then nodelist=node1; else nodelist="node[1-$NODES]"; fi
    echo "PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP"
} >"$CONF"

cat >"$DIR/env.sh" <<EOF
# source this file to talk to the local cluster in $DIR ($SHAPE)
export SLURM_CONF=$CONF
export ALBEF_SLURM_DIR=$DIR
EOF
echo "$SHAPE" >"$DIR/shape"

fail() {
    echo "start.sh: error: $1" >&2
    for f in "$DIR/munge/munged.log" "$DIR/log/slurmctld.log" "$DIR"/log/slurmd-*.log; do
        [[ -f $f ]] && { echo "---- last lines of $f" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}

# ---- daemons ---------------------------------------------------------------------------------------------------
SOCK=$DIR/munge/munge.socket
runuser -u munge -- munged --socket="$SOCK" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" || fail "munged did not start"
munge -S "$SOCK" -n | unmunge -S "$SOCK" >/dev/null || fail "munge credentials do not round-trip on $SOCK"

slurmctld -f "$CONF" || fail "slurmctld did not start"
for ((t = 0; t < TIMEOUT * 10; t++)); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.1
done
scontrol ping 2>/dev/null | grep -q 'is UP' || fail "slurmctld does not answer 'scontrol ping'"
for ((i = 1; i <= NODES; i++)); do
    slurmd -f "$CONF" -N "node$i" || fail "slurmd for node$i did not start"
done

for ((t = 0; t < TIMEOUT * 10; t++)); do
    states=$(sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')
    [[ $states == "idle " ]] && break
    sleep 0.1
done
[[ $states == "idle " ]] || fail "nodes are not idle after ${TIMEOUT}s (states: ${states:-none})"

echo "start.sh: cluster up in $DIR ($SHAPE)"
sinfo -N -o '%N %P %T %c %G'
echo "start.sh: source $DIR/env.sh"
