#!/usr/bin/env bash
# Stop the throw-away cluster started by slurm/local/start.sh: cancel its jobs, shut down slurmctld and the
# slurmd "nodes", stop its munged. Idempotent (nothing running: nothing to do). Logs stay in DIR/log until the
# next start.
#
#   sudo slurm/local/stop.sh [--dir DIR] [--quiet]      # DIR defaults to $ALBEF_SLURM_DIR or /tmp/albef-slurm
#
# Only processes recorded in DIR's pid files are signalled (after checking their command name).
set -euo pipefail

DIR=${ALBEF_SLURM_DIR:-/tmp/albef-slurm}
QUIET=0
while (( $# )); do
    case $1 in
        --dir) [[ -n ${2-} ]] || { echo "stop.sh: error: --dir expects a path" >&2; exit 2; }; DIR=$2; shift 2 ;;
        --quiet) QUIET=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "stop.sh: error: unknown option '$1'" >&2; exit 2 ;;
    esac
done
say() { (( QUIET )) || echo "stop.sh: $*"; }

if [[ ! -d $DIR ]]; then
    say "nothing to stop ($DIR does not exist)"
    exit 0
fi
DIR=$(cd "$DIR" && pwd -P)
export SLURM_CONF=$DIR/slurm.conf

# pid_of FILE NAME: the pid in FILE when that process is alive and is NAME (guards against recycled pids).
pid_of() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == "$2"* ]] || return 1
    echo "$pid"
}

# wait_gone SECONDS PID...: true when every pid has exited in time.
wait_gone() {
    local secs=$1 t p alive
    shift
    for ((t = 0; t < secs * 10; t++)); do
        alive=0
        for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
        (( alive )) || return 0
        sleep 0.1
    done
    return 1
}

stopped=0
ctld=$(pid_of "$DIR/run/slurmctld.pid" slurmctld || true)
if [[ -n $ctld && -f $SLURM_CONF ]] && scontrol ping 2>/dev/null | grep -q 'is UP'; then
    jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n ${jobs// /} ]]; then
        say "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for ((t = 0; t < 100; t++)); do
            [[ -z $(squeue -h -t running,completing -o '%A' 2>/dev/null) ]] && break
            sleep 0.1
        done
        # shellcheck disable=SC2086
        if [[ -n $(squeue -h -o '%A' 2>/dev/null) ]]; then
            scancel --signal=KILL --full $jobs 2>/dev/null || true
        fi
        for ((t = 0; t < 100; t++)); do
            [[ -z $(squeue -h -t running,completing -o '%A' 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
    say "scontrol shutdown"
    scontrol shutdown >/dev/null 2>&1 || true
fi

pids=()
[[ -n $ctld ]] && pids+=("$ctld")
for f in "$DIR"/run/slurmd-*.pid; do
    [[ -e $f ]] || continue
    p=$(pid_of "$f" slurmd || true)
    [[ -n $p ]] && pids+=("$p")
done
if (( ${#pids[@]} )); then
    stopped=1
    if ! wait_gone 20 "${pids[@]}"; then
        say "daemons still alive after 20 s: SIGTERM ${pids[*]}"
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait_gone 5 "${pids[@]}" || kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
fi

munged=$(pid_of "$DIR/munge/munged.pid" munged || true)
if [[ -n $munged ]]; then
    stopped=1
    kill -TERM "$munged" 2>/dev/null || true
    wait_gone 10 "$munged" || kill -KILL "$munged" 2>/dev/null || true
fi
rm -f "$DIR/run/"*.pid "$DIR/shape"

if (( stopped )); then say "stopped the cluster in $DIR"; else say "nothing running in $DIR"; fi
