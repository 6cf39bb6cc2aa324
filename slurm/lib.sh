# Shared by slurm/ablation.sh and slurm/train.sh (sourced, not run). Expects ADVCAP_ROOT to be set.
#
# Preemption and time limits: the job has `--signal=B:USR1@<s>`, which reaches only this batch shell
# (the launcher forwards no USR1 to the ranks). The shell creates a stop file instead; the ranks poll it
# ($ADVCAP_STOP_FILE, on the shared file system): training agrees on the step, checkpoints and exits,
# evaluation exits before its next batch (writing nothing). The main rank writes how far it got beside
# the stop file (<stop file>.outcome: progress | no-progress), since the launcher hides the ranks' exit
# codes. The shell then requeues the job (whose next start resumes from that checkpoint, or evaluates the
# trained model again) only if that start made progress, and at most ADVCAP_MAX_REQUEUES times: a job
# that would be stopped again before doing anything fails once, saying why, instead of looping.

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

# Seconds in a SLURM time string (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); nothing for UNLIMITED or an unknown form.
advcap_seconds() {
    local t=$1 days=0 h=0 m=0 s=0
    [[ $t =~ ^[0-9]+(-[0-9]+)?(:[0-9]+){0,2}$ ]] || return 0
    if [[ $t == *-* ]]; then
        days=${t%%-*}; t=${t#*-}
        IFS=: read -r h m s <<< "$t"
    else
        local parts; IFS=: read -r -a parts <<< "$t"
        case ${#parts[@]} in
            1) m=${parts[0]} ;;
            2) m=${parts[0]}; s=${parts[1]} ;;
            3) h=${parts[0]}; m=${parts[1]}; s=${parts[2]} ;;
        esac
    fi
    echo $(( 10#$days * 86400 + 10#${h:-0} * 3600 + 10#${m:-0} * 60 + 10#${s:-0} ))
}

# The USR1 lead in seconds: ADVCAP_SIGNAL_LEAD, else the script's own `#SBATCH --signal=B:USR1@<s>` line.
advcap_signal_lead() {
    local script=$1
    if [[ -n "${ADVCAP_SIGNAL_LEAD:-}" ]]; then
        echo "$ADVCAP_SIGNAL_LEAD"
    else
        grep -o -m 1 'USR1@[0-9]*' "$script" | cut -d@ -f2
    fi
}

# Refuse a time limit that is not longer than the lead: USR1 would come at once, every start would stop
# before doing anything and requeue itself, forever.
advcap_check_time_limit() {
    local limit=$1 lead=$2 seconds
    seconds="$(advcap_seconds "$limit")"
    [[ -n "$seconds" && -n "$lead" ]] || return 0
    ((seconds > lead)) || advcap_die "the time limit $limit (${seconds} s) is not longer than the stop signal's lead of" \
        "$lead s (--signal=B:USR1@$lead): every start would be asked to stop before doing anything. Give --time more" \
        "than $lead s, or a shorter lead (--signal=B:USR1@<s> with ADVCAP_SIGNAL_LEAD=<s>)"
}

# The --time among sbatch arguments (or the script's #SBATCH --time line when none is given).
advcap_requested_time() {
    local script=$1 time="" next=0 arg
    shift
    for arg in "$@"; do
        if ((next)); then time=$arg; next=0; continue; fi
        case $arg in
            --time=*) time=${arg#--time=} ;;
            -t|--time) next=1 ;;
            -t*) time=${arg#-t} ;;
        esac
    done
    [[ -n "$time" ]] || time="$(grep -o -m 1 '^#SBATCH --time=[^ ]*' "$script" | cut -d= -f2)"
    echo "$time"
}

# Under sbatch: this job's own time limit against the lead.
advcap_check_job_time_limit() {
    local limit
    limit="$(scontrol show job "$SLURM_JOB_ID" -o | grep -o 'TimeLimit=[^ ]*' | head -n 1 | cut -d= -f2)"
    advcap_check_time_limit "$limit" "$(advcap_signal_lead "$1")"
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
    rm -f "$ADVCAP_STOP_FILE" "$ADVCAP_STOP_FILE.outcome"  # left over from the run this one requeues
    trap 'echo "advcap: SIGUSR1 (time limit or preemption): asking the ranks to checkpoint and stop" >&2; touch "$ADVCAP_STOP_FILE"' USR1
    if [[ -n "${ADVCAP_USR1_EARLY:-}" ]]; then  # it came while the script was getting ready
        echo "advcap: SIGUSR1 (time limit or preemption) came before the run started: asking it to stop" >&2
        touch "$ADVCAP_STOP_FILE"
    fi
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
# resumes from its checkpoint, if this start made progress and the requeue cap is not reached; otherwise
# fail with the reason. Without a stop request, pass the run's status on.
advcap_finish() {
    local status=$1 outcome="" restarts=${SLURM_RESTART_COUNT:-0} cap=${ADVCAP_MAX_REQUEUES:-20}
    if [[ -e "$ADVCAP_STOP_FILE" ]]; then
        outcome="$(cat "$ADVCAP_STOP_FILE.outcome" 2>/dev/null || true)"
        rm -f "$ADVCAP_STOP_FILE" "$ADVCAP_STOP_FILE.outcome"
        if [[ $status -ne 0 ]]; then
            case "$outcome" in
                progress)
                    ((restarts < cap)) || advcap_die "stopped again after $restarts requeues (ADVCAP_MAX_REQUEUES=$cap):" \
                        "not requeued; resubmit the same job to go on from its last checkpoint"
                    echo "advcap: stopped at a checkpoint; requeueing job $SLURM_JOB_ID (restart $restarts)" >&2
                    scontrol requeue "$SLURM_JOB_ID" || advcap_die "scontrol requeue $SLURM_JOB_ID failed: resubmit the job to resume"
                    exit 0
                    ;;
                no-progress)
                    advcap_die "stopped on request before making any progress since it started: not requeued (it would" \
                        "only be stopped again). The time limit is probably not longer than the stop signal's lead, or the" \
                        "job was preempted before its first checkpoint: give it more time (--time) or a shorter lead"
                    ;;
                *)
                    advcap_die "the run ended with status $status while a stop was requested, without saying how far it" \
                        "got (see the log above): not requeued"
                    ;;
            esac
        fi
    fi
    rm -f "$ADVCAP_STOP_FILE.outcome"
    exit "$status"
}
