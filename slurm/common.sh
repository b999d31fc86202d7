# shellcheck shell=bash
# Shared by slurm/pretrain.sbatch, slurm/finetune.sbatch and slurm/data_prep.sbatch (sourced, never run).
#
# What it does for a batch script:
#   * albef_setup: checks that it runs inside a SLURM job, finds the Python to use, sets the environment of the
#     tasks (PYTHONPATH, OMP_NUM_THREADS, no stale torchrun variables) and prints a job header.
#   * albef_run_step MODE CMD...: starts CMD on every task with srun in the background and waits for it. SIGUSR1
#     and SIGTERM reaching the batch shell (--signal=B:USR1@N, scancel --batch) are forwarded to the tasks with
#     `scancel --signal` (never to srun itself: srun turns a SIGTERM into SIGKILL for its tasks), not before the step
#     has run ALBEF_SIGNAL_GRACE seconds, and re-sent every ALBEF_RESIGNAL_SECONDS in case they arrived while a task
#     was still starting up. MODE "same" forwards the
#     signal as received, MODE "term" forwards SIGTERM (for programs that only know SIGTERM).
#   * albef_requeue_or_exit WANT RC: requeues the job (scontrol requeue) when WANT is 1 and SLURM still runs it,
#     else exits with RC. albef_train (pretrain/finetune) wants a requeue when the tasks exit 75.
#
# Environment knobs (export them before sbatch, or sbatch --export=ALL,NAME=value):
#   ALBEF_REPO              the repository (default: the directory sbatch was run from, else the script's path)
#   ALBEF_PYTHON            the interpreter (default: $ALBEF_REPO/.venv/bin/python, else python3)
#   ALBEF_MASTER_PORT       rendezvous port (default: 20000 + job id % 20000, derived by albef.engine.dist)
#   ALBEF_MAX_REQUEUES      stop requeueing after this many restarts (default 20)
#   ALBEF_REQUEUE           0: never requeue, just exit 75 (default 1)
#   ALBEF_RESIGNAL_SECONDS  re-send a forwarded signal this often until the tasks end (default 60; 0: never)
#   ALBEF_SIGNAL_GRACE      a signal that arrives in a step's first N seconds is forwarded N seconds after its start
#                           (default 5: the tasks must exist and have set up their USR1 handling)
#   ALBEF_SRUN_WAIT         seconds srun waits for the other tasks once one has ended (default 300)

ALBEF_EXIT_REQUEUE=75  # albef.engine.trainer.EXIT_REQUEUE: "checkpoint saved, requeue me"
ALBEF_EXIT_USAGE=2     # bad arguments / config (the engine uses 2 for config errors too)

albef_log() { printf '[albef-slurm %s] %s\n' "$(date '+%F %T')" "$*"; }
albef_die() {
    local code=$1
    shift
    printf '[albef-slurm %s] error: %s\n' "$(date '+%F %T')" "$*" >&2
    exit "$code"
}

# albef_setup WHAT: environment checks and the job header (WHAT names the job kind in messages).
albef_setup() {
    ALBEF_WHAT=$1
    # From here on a SIGUSR1/SIGTERM is recorded (and forwarded once the tasks run) instead of killing the shell.
    trap '_albef_on_signal USR1' USR1
    trap '_albef_on_signal TERM' TERM
    [[ -n ${SLURM_JOB_ID:-} ]] || albef_die "$ALBEF_EXIT_USAGE" "not inside a SLURM job: submit with sbatch"
    command -v srun >/dev/null 2>&1 || albef_die 1 "srun not found on $(hostname -s)"
    if [[ -n ${ALBEF_PYTHON:-} ]]; then
        ALBEF_PY=$ALBEF_PYTHON
    elif [[ -x $ALBEF_REPO/.venv/bin/python ]]; then
        ALBEF_PY=$ALBEF_REPO/.venv/bin/python
    else
        ALBEF_PY=$(command -v python3 || true)
    fi
    [[ -n $ALBEF_PY && -x $(command -v "$ALBEF_PY" 2>/dev/null || true) ]] ||
        albef_die 1 "no Python interpreter: set ALBEF_PYTHON or create $ALBEF_REPO/.venv"

    export PYTHONPATH="$ALBEF_REPO${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
    # srun (22.05+) no longer inherits --cpus-per-task from the job; pass it on explicitly.
    export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
    # Variables a torchrun/deepspeed launcher would set must not leak in from the submitting shell: under srun the
    # engine derives rank, world size and rendezvous from SLURM_PROCID/NTASKS/LOCALID/JOB_NODELIST/JOB_ID.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK GROUP_WORLD_SIZE MASTER_ADDR MASTER_PORT
    if [[ -n ${ALBEF_MASTER_PORT:-} ]]; then
        export MASTER_PORT=$ALBEF_MASTER_PORT
    fi

    # An array task is addressed as ARRAYID_TASKID: its own SLURM_JOB_ID equals the array's id for one of the
    # tasks, and `scancel`/`scontrol requeue`/`squeue` on that id would act on the whole array.
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        ALBEF_JOB_SPEC=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    else
        ALBEF_JOB_SPEC=$SLURM_JOB_ID
    fi
    local restarts=${SLURM_RESTART_COUNT:-0} limit first_host commit=""
    limit=$(squeue -h -j "$ALBEF_JOB_SPEC" -o '%l' 2>/dev/null | head -n 1 || true)
    first_host=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1 || true)
    if command -v git >/dev/null 2>&1; then
        commit=$(git -C "$ALBEF_REPO" rev-parse --short HEAD 2>/dev/null || true)
        if [[ -n $commit && -n $(git -C "$ALBEF_REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
            commit+=" (with uncommitted changes)"
        fi
    fi
    albef_log "==== $ALBEF_WHAT: job ${SLURM_JOB_ID}${SLURM_ARRAY_JOB_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})} '${SLURM_JOB_NAME:-}' restart $restarts ===="
    albef_log "nodes: ${SLURM_JOB_NODELIST:-?} (${SLURM_JOB_NUM_NODES:-?}), tasks: ${SLURM_NTASKS:-1}" \
        "(per node: ${SLURM_TASKS_PER_NODE:-?}), cpus per task: ${SLURM_CPUS_PER_TASK:-1}," \
        "gpus per node: ${SLURM_GPUS_PER_NODE:-0}, time limit: ${limit:-?}, partition: ${SLURM_JOB_PARTITION:-?}"
    albef_log "repo: $ALBEF_REPO${commit:+ at $commit}; python: $ALBEF_PY; working directory: $PWD"
    if [[ $ALBEF_WHAT != data_prep ]] && (( ${SLURM_NTASKS:-1} > 1 )); then
        local port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
        albef_log "rendezvous: ${first_host:-?}:$port (albef.engine.dist: first node of SLURM_JOB_NODELIST," \
            "port 20000 + job id % 20000 unless ALBEF_MASTER_PORT is set)"
    fi
    if (( restarts > 0 )) && [[ $ALBEF_WHAT == data_prep ]]; then
        albef_log "this is restart $restarts of the job: finished shards are kept, unfinished ones are redone"
    elif (( restarts > 0 )); then
        albef_log "this is restart $restarts of the job: the run continues from its newest complete checkpoint"
    fi
}

# ---- signals ----------------------------------------------------------------------------------------------------
ALBEF_STEP_PID=""
ALBEF_STEP_STARTED=0    # $SECONDS when the step was launched
ALBEF_SIGNALS=""        # signals the batch shell received, in order
ALBEF_FORWARD_MODE=same
_ALBEF_INTERRUPTED=0
_ALBEF_RESENDER=""

_albef_forward() {  # forward $1 to every task of this job's steps (the batch shell itself is not signalled)
    local sig=$1
    [[ $ALBEF_FORWARD_MODE == term ]] && sig=TERM
    if scancel --signal="$sig" "$ALBEF_JOB_SPEC" 2>/dev/null; then
        albef_log "forwarded SIG$sig to the tasks (scancel --signal=$sig $ALBEF_JOB_SPEC)"
    elif [[ $sig != TERM && -n $ALBEF_STEP_PID ]]; then
        kill -s "$sig" "$ALBEF_STEP_PID" 2>/dev/null && albef_log "forwarded SIG$sig to srun (pid $ALBEF_STEP_PID)"
    else
        albef_log "could not forward SIG$sig (scancel failed)"
    fi
}

_albef_on_signal() {
    local sig=$1
    _ALBEF_INTERRUPTED=1
    ALBEF_SIGNALS+="$sig "
    albef_log "batch script received SIG$sig"
    if [[ -n $ALBEF_STEP_PID ]] && kill -0 "$ALBEF_STEP_PID" 2>/dev/null; then
        if (( SECONDS - ALBEF_STEP_STARTED >= ${ALBEF_SIGNAL_GRACE:-5} )); then
            _albef_forward "$sig"
        fi  # else the tasks may not exist yet, or not yet ignore USR1: the resender forwards it after the grace
        _albef_start_resender "$sig"
    fi
}

# A signal sent in the first moments of a job step is lost or fatal: before slurmstepd has started the tasks,
# `scancel --signal` finds nothing to signal; in the instant between a task's start and its `trap "" USR1` the
# signal's default action kills it (exit 138 instead of a checkpoint). So a signal is first forwarded once the step
# has run ALBEF_SIGNAL_GRACE seconds, then re-sent every ALBEF_RESIGNAL_SECONDS for a task still importing torch.
_albef_start_resender() {
    local sig=$1 every=${ALBEF_RESIGNAL_SECONDS:-60} grace=${ALBEF_SIGNAL_GRACE:-5}
    [[ -z $_ALBEF_RESENDER ]] || return 0
    local first=$(( grace - (SECONDS - ALBEF_STEP_STARTED) ))
    (( first > 0 || every > 0 )) || return 0  # already forwarded, and no repeats wanted
    (
        trap - USR1 TERM
        if (( first > 0 )); then
            sleep "$first"
            kill -0 "$ALBEF_STEP_PID" 2>/dev/null || exit 0
            _albef_forward "$sig"
        fi
        (( every > 0 )) || exit 0
        while sleep "$every"; do
            kill -0 "$ALBEF_STEP_PID" 2>/dev/null || exit 0
            _albef_forward "$sig"
        done
    ) &
    _ALBEF_RESENDER=$!
}

# albef_run_step MODE CMD...: run CMD under srun on every task of the job; sets ALBEF_STEP_RC.
albef_run_step() {
    ALBEF_FORWARD_MODE=$1
    shift
    local label=()
    (( ${SLURM_NTASKS:-1} > 1 )) && label=(--label)  # prefix each output line with the task rank
    local cmd=(srun ${label[@]+"${label[@]}"} --kill-on-bad-exit=0 --wait="${ALBEF_SRUN_WAIT:-300}"
               --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"
               # Each task ignores SIGUSR1 until the program installs its own handler: a USR1 that arrives while
               # Python is still importing would otherwise kill the task (the default action) instead of asking
               # it to checkpoint. The resender repeats the signal, so it is not lost.
               bash -c 'trap "" USR1; exec "$@"' albef-task "$@")
    albef_log "command: $(printf '%q ' "${cmd[@]}")"
    ALBEF_STEP_STARTED=$SECONDS
    "${cmd[@]}" &
    ALBEF_STEP_PID=$!
    if [[ -n $ALBEF_SIGNALS ]]; then  # a signal arrived before the step started: forward it after the grace
        _albef_start_resender "${ALBEF_SIGNALS%% *}"
    fi
    # `wait` returns early (status > 128) when a trapped signal arrives; then wait again for the real status.
    local rc previous=""
    while :; do
        _ALBEF_INTERRUPTED=0
        set +e
        wait "$ALBEF_STEP_PID"
        rc=$?
        set -e
        if (( rc == 127 )) && [[ -n $previous ]]; then  # the status was already collected
            rc=$previous
            break
        fi
        if (( _ALBEF_INTERRUPTED && rc > 128 )); then
            previous=$rc
            continue
        fi
        break
    done
    if [[ -n $_ALBEF_RESENDER ]]; then
        kill "$_ALBEF_RESENDER" 2>/dev/null || true
        wait "$_ALBEF_RESENDER" 2>/dev/null || true
        _ALBEF_RESENDER=""
    fi
    ALBEF_STEP_RC=$rc
    albef_log "job step ended with exit code $rc${ALBEF_SIGNALS:+ (signals received: ${ALBEF_SIGNALS% })}"
}

# albef_requeue_or_exit WANT_REQUEUE RC: requeue this job when WANT_REQUEUE is 1 and SLURM still runs it, else exit.
albef_requeue_or_exit() {
    local want=$1 rc=$2 state restarts=${SLURM_RESTART_COUNT:-0} max=${ALBEF_MAX_REQUEUES:-20}
    if (( want == 0 )); then
        exit "$rc"
    fi
    # After scancel, a time limit, a preemption or an `scontrol requeue` from outside, SLURM already ends (or
    # requeues) the job and its state is no longer RUNNING: requeueing then would resurrect a cancelled job.
    state=$(squeue -h -j "$ALBEF_JOB_SPEC" -o '%T' 2>/dev/null | head -n 1 || true)
    if [[ -n $state && $state != RUNNING ]]; then
        albef_log "checkpoint saved; not requeueing: SLURM is already ending this job (state $state: cancelled," \
            "timed out, preempted or requeued by SLURM). Submitting the same command again resumes the run."
        exit "$rc"
    fi
    if [[ ${ALBEF_REQUEUE:-1} == 0 ]]; then
        albef_log "checkpoint saved; not requeueing (ALBEF_REQUEUE=0). Submit the same command again to resume."
        exit "$rc"
    fi
    if (( restarts >= max )); then
        albef_log "checkpoint saved; not requeueing: the job was already restarted $restarts times" \
            "(ALBEF_MAX_REQUEUES=$max). Submit the same command again to resume."
        exit "$rc"
    fi
    albef_log "requeueing job $ALBEF_JOB_SPEC (restart $((restarts + 1))); it resumes where it stopped"
    if scontrol requeue "$ALBEF_JOB_SPEC"; then
        exit 0  # SLURM ends this batch script and puts the job back in the queue (same job id, same log file)
    fi
    albef_log "scontrol requeue failed (is the job requeueable? sbatch --requeue / JobRequeue=1); exiting $rc"
    exit "$rc"
}

# albef_train MODULE CONFIG [key=value ...]: one training/fine-tuning process per task, requeue on exit 75.
albef_train() {
    local module=$1 config=${2:-} arg rc
    shift 2
    [[ -f $config ]] || albef_die "$ALBEF_EXIT_USAGE" "config file '$config' not found (relative paths are" \
        "resolved from the job's working directory $PWD: the directory you ran sbatch from, unless --chdir)"
    [[ -r $config ]] || albef_die "$ALBEF_EXIT_USAGE" "config file '$config' is not readable"
    for arg in "$@"; do
        [[ $arg == *=* && $arg != =* ]] || albef_die "$ALBEF_EXIT_USAGE" "'$arg' is not a key=value override" \
            "(usage: CONFIG.yaml [key=value ...], e.g. train.max_steps=1000)"
    done
    albef_run_step same "$ALBEF_PY" -u -m "$module" "$config" "$@"
    rc=$ALBEF_STEP_RC
    case $rc in
        0) albef_log "finished: the run completed"; exit 0 ;;
        "$ALBEF_EXIT_REQUEUE") albef_requeue_or_exit 1 "$rc" ;;
        "$ALBEF_EXIT_USAGE") albef_log "failed: configuration error (exit 2, message above)"; exit "$rc" ;;
        *) albef_log "failed with exit code $rc (task output above; lines start with the task rank)"; exit "$rc" ;;
    esac
}
