# Shared by slurm/ablation.sh and slurm/train.sh (sourced, not run). Expects ADVCAP_ROOT to be set.
#
# Preemption and time limits: the job has `--signal=B:USR1@<s>`, which reaches only this batch shell
# (the launcher forwards no USR1 to the ranks). The shell creates a stop file instead; the ranks poll it
# ($ADVCAP_STOP_FILE, on the shared file system): training agrees on the step, checkpoints and exits,
# evaluation exits before its next batch (writing nothing). The shell then requeues the job, whose next
# start resumes from that checkpoint, or evaluates the trained model again.

advcap_die() {
    echo "advcap: error: $*" >&2
    exit 1
}

# The project's virtualenv, if there is one (ADVCAP_VENV overrides; set it empty to use PATH as it is).
advcap_activate() {
    local venv="${ADVCAP_VENV-$ADVCAP_ROOT/.venv}"
    if [[ -n "$venv" && -f "$venv/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
    command -v accelerate >/dev/null || advcap_die "accelerate is not on PATH: install advcap (make install) or set ADVCAP_VENV"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
}

# A rendezvous port per job: array tasks sharing a node must not collide.
advcap_port() {
    echo $((29500 + ${SLURM_JOB_ID:-0} % 20000))
}

# Processes per node: one per GPU SLURM gave the job, else PROCS_PER_NODE (default 1).
advcap_procs_per_node() {
    if [[ -n "${PROCS_PER_NODE:-}" ]]; then
        echo "$PROCS_PER_NODE"
    elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    else
        echo 1
    fi
}

# The address of the job's first node, as the other nodes reach it (NodeAddr, which is the host name
# on most clusters).
advcap_head_address() {
    local head
    head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    scontrol show node "$head" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p'
}

# Set the stop file up for this job and turn USR1 into it.
advcap_prepare_stop() {
    mkdir -p "$1/.stop"
    ADVCAP_STOP_FILE="$(cd "$1/.stop" && pwd)/${SLURM_JOB_ID:-$$}"  # absolute: every rank, every node
    export ADVCAP_STOP_FILE
    rm -f "$ADVCAP_STOP_FILE"  # left over from the run this one requeues
    trap 'echo "advcap: SIGUSR1 (time limit or preemption): asking the ranks to checkpoint and stop" >&2; touch "$ADVCAP_STOP_FILE"' USR1
}

# Run a command in the background and wait for it: a bash trap runs only between commands, so the
# shell must be in `wait`, not in a foreground child, for USR1 to be acted on at once.
advcap_run() {
    "$@" &
    local child=$! status
    while true; do
        wait "$child"
        status=$?
        kill -0 "$child" 2>/dev/null || break  # wait was only interrupted by the trap: keep waiting
    done
    return "$status"
}

# After the run: if a stop was requested and the run did not finish, requeue this job so that it
# resumes from its checkpoint; otherwise pass the run's status on.
advcap_finish() {
    local status=$1
    if [[ -e "$ADVCAP_STOP_FILE" ]]; then
        rm -f "$ADVCAP_STOP_FILE"
        if [[ $status -ne 0 ]]; then
            echo "advcap: stopped at a checkpoint; requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})" >&2
            scontrol requeue "$SLURM_JOB_ID" || advcap_die "scontrol requeue $SLURM_JOB_ID failed: resubmit the job to resume"
            exit 0
        fi
    fi
    exit "$status"
}
