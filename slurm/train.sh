#!/usr/bin/env bash
# One training run over several nodes: srun starts one launcher per node, and each runs the same
# `accelerate launch launch/train.py` as a local run, with this node's rank and the first node as the
# rendezvous host. Arguments are those of `advcap train`:
#
#   sbatch --nodes=4 slurm/train.sh --config freeze_vit data.shards=/shared/shards/coco
#
# Environment: LAUNCHER_CONFIG [configs/accelerate/ddp.yaml], PROCS_PER_NODE [one per GPU on the node,
# else 1], ADVCAP_ROOT, ADVCAP_VENV [$ADVCAP_ROOT/.venv], ADVCAP_SIGNAL_LEAD [the --signal line below] when you
# change --signal on the command line, ADVCAP_MAX_REQUEUES [20]. A requeued or resubmitted job resumes from the
# run's latest checkpoint (--resume auto); a finished run is not retrained; a job stopped before it made any
# progress is not requeued, and a --time not longer than the signal's lead is refused at its start.
# Resources below are examples: edit them, or override on the command line.
#SBATCH --job-name=advcap-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --gres=gpu:8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
# A USR1 can come at once (a short time limit, a preemption): remember it until the stop file exists, rather
# than let bash's default action kill the script before it can say anything.
trap 'ADVCAP_USR1_EARLY=1' USR1

# The project: under sbatch this file runs from a spool copy, so $0 says nothing about it; the job record
# keeps the submitted path (Command=). ADVCAP_ROOT overrides both.
script="$0"; [[ -z "${SLURM_JOB_ID:-}" ]] || script="$(scontrol show job "$SLURM_JOB_ID" -o | grep -o 'Command=[^ ]*' | head -n 1 | cut -d= -f2)"
export ADVCAP_ROOT="${ADVCAP_ROOT:-$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$script")/.." && pwd)}"
source "$ADVCAP_ROOT/slurm/lib.sh" || { echo "advcap: error: no advcap project at $ADVCAP_ROOT: set ADVCAP_ROOT" >&2; exit 1; }

[[ -n "${SLURM_JOB_ID:-}" ]] || advcap_die "submit with sbatch: sbatch slurm/train.sh --config <phase> [overrides]"
(($# > 0)) || advcap_die "no arguments: sbatch slurm/train.sh --config <phase> [overrides]"
advcap_check_job_time_limit "$0"
LAUNCHER_CONFIG="${LAUNCHER_CONFIG:-configs/accelerate/ddp.yaml}"
cd "$ADVCAP_ROOT"
advcap_activate
[[ -f "$LAUNCHER_CONFIG" ]] || advcap_die "no launcher config $LAUNCHER_CONFIG (in $ADVCAP_ROOT)"
check="$(advcap train "$@" --check)" || advcap_die "the run does not check out (see above)"
run_dir="${check##*; run dir }"

procs=$(advcap_procs_per_node)
head_address="$(advcap_head_address)"
port="$(advcap_port)"
echo "advcap: $SLURM_NNODES nodes × $procs processes, rendezvous at $head_address:$port, restart ${SLURM_RESTART_COUNT:-0}"
advcap_prepare_stop "$run_dir"
# One launcher per node. SLURM_NODEID is read inside each srun task, hence the single quotes.
status=0
advcap_run srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec accelerate launch --config_file "$0" --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
        --num_processes "$1" --main_process_ip "$2" --main_process_port "$3" \
        "$ADVCAP_ROOT/launch/train.py" "${@:4}" --resume auto' \
    "$LAUNCHER_CONFIG" "$((procs * SLURM_NNODES))" "$head_address" "$port" "$@" \
    || status=$?
advcap_finish "$status"
