#!/usr/bin/env bash
# The ablation as one SLURM job array: one task per (phase, seed), each training then evaluating into
# $RUNS/<phase>/seed<k>/ (advcap's own ablation command, so finished runs are skipped, interrupted ones
# resumed, runs with another config refused), and a report job once every task has ended.
#
#   sbatch slurm/ablation.sh                                  # 5 phases × 3 seeds = --array=0-14
#   DATASET=flickr8k SEEDS="0 1" sbatch --array=0-9 slurm/ablation.sh
#   PHASES="baseline freeze_vit" SEEDS="0 1" slurm/ablation.sh --time=4:00:00   # not under sbatch: checks,
#                                          then submits the array the lists need (arguments go to sbatch)
#
# Task i runs phase PHASES[i / |SEEDS|] with seed SEEDS[i % |SEEDS|]. Environment (defaults in brackets):
#   PHASES [baseline adversarial adv_train freeze_vit freeze_gpt]  SEEDS [0 1 2]
#   DATASET [coco]  SHARDS [shards/$DATASET]  RUNS [runs/$DATASET]   (relative to the project root)
#   OVERRIDES  dotted advcap overrides for every run, e.g. "train.steps=5000 model.preset=vit-base-gpt2"
#   LAUNCHER_CONFIG [configs/accelerate/ddp.yaml] (or zero1.yaml, zero2.yaml)
#   PROCS_PER_NODE [one per GPU SLURM gave the task, else 1]   ADVCAP_ROOT, ADVCAP_VENV [$ADVCAP_ROOT/.venv]
#   ADVCAP_SIGNAL_LEAD [the --signal line below] when you change --signal on the command line
#   ADVCAP_MAX_REQUEUES [20] requeues after a stop request (a task that made no progress is never requeued)
# A --time not longer than the signal's lead is refused (every start would be told to stop at once).
# Resources below are examples: edit them, or override on the command line (sbatch --time=... --gres=...).
#SBATCH --job-name=advcap-ablation
#SBATCH --array=0-14
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
# A USR1 can come at once (a short time limit, a preemption): remember it until the stop file exists, rather
# than let bash's default action kill the script before it can say anything.
trap 'ADVCAP_USR1_EARLY=1' USR1

# The project: under sbatch this file runs from a spool copy, so $0 says nothing about it; the job record
# keeps the submitted path (Command=). ADVCAP_ROOT overrides both.
submit_dir="$PWD"  # where the user ran it: the task logs go there
script="$0"; [[ -z "${SLURM_JOB_ID:-}" ]] || script="$(scontrol show job "$SLURM_JOB_ID" -o | grep -o 'Command=[^ ]*' | head -n 1 | cut -d= -f2)"
export ADVCAP_ROOT="${ADVCAP_ROOT:-$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$script")/.." && pwd)}"
source "$ADVCAP_ROOT/slurm/lib.sh" || { echo "advcap: error: no advcap project at $ADVCAP_ROOT: set ADVCAP_ROOT" >&2; exit 1; }

read -r -a phases <<< "${PHASES:-baseline adversarial adv_train freeze_vit freeze_gpt}"
read -r -a seeds <<< "${SEEDS:-0 1 2}"
read -r -a overrides <<< "${OVERRIDES:-}"
DATASET="${DATASET:-coco}"
SHARDS="${SHARDS:-shards/$DATASET}"
RUNS="${RUNS:-runs/$DATASET}"
LAUNCHER_CONFIG="${LAUNCHER_CONFIG:-configs/accelerate/ddp.yaml}"
tasks=$(( ${#phases[@]} * ${#seeds[@]} ))
((tasks > 0)) || advcap_die "PHASES and SEEDS must not be empty"
# Tasks run in parallel, so no task can count on another's model (transfer-fgsm is crafted on the baseline's).
[[ "${OVERRIDES:-}" != *transfer-fgsm* ]] || advcap_die "transfer-fgsm needs each seed's baseline trained first," \
    "which an array cannot promise: leave it out of eval.conditions here; once the array is done, one job of" \
    "advcap ablation with it added evaluates the trained runs again (changed eval settings never retrain)"

cd "$ADVCAP_ROOT"
advcap_activate
[[ -f "$LAUNCHER_CONFIG" ]] || advcap_die "no launcher config $LAUNCHER_CONFIG (in $ADVCAP_ROOT)"
ablation=(advcap ablation --phases "${phases[@]}" --seeds "${seeds[@]}" --out "$RUNS" "data.shards=$SHARDS" "${overrides[@]}")

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    # Not under SLURM: check everything here, then submit the array these lists need, from where the user is.
    advcap_check_time_limit "$(advcap_requested_time "$0" "$@")" "$(advcap_signal_lead "$0")"
    "${ablation[@]}" --dry-run >/dev/null || advcap_die "the ablation does not check out (see above); nothing submitted"
    cd "$submit_dir"
    exec sbatch "$@" --array="0-$((tasks - 1))" --export="ALL,ADVCAP_ROOT=$ADVCAP_ROOT" "$ADVCAP_ROOT/slurm/ablation.sh"
fi

[[ -n "${SLURM_ARRAY_TASK_ID:-}" ]] || advcap_die "run as a job array: sbatch slurm/ablation.sh (or without sbatch: slurm/ablation.sh)"
# `#SBATCH --array` is static: the lists decide how many tasks there must be.
if [[ "${SLURM_ARRAY_TASK_COUNT:-}" != "$tasks" || "${SLURM_ARRAY_TASK_MIN:-}" != 0 ]]; then
    advcap_die "${#phases[@]} phases × ${#seeds[@]} seeds = $tasks tasks, but this array is" \
        "${SLURM_ARRAY_TASK_MIN:-?}-${SLURM_ARRAY_TASK_MAX:-?} (${SLURM_ARRAY_TASK_COUNT:-?} tasks):" \
        "submit with sbatch --array=0-$((tasks - 1)) slurm/ablation.sh, or run slurm/ablation.sh without sbatch"
fi
index=$SLURM_ARRAY_TASK_ID
phase="${phases[index / ${#seeds[@]}]}"
seed="${seeds[index % ${#seeds[@]}]}"

echo "advcap: task $index of array $SLURM_ARRAY_JOB_ID: $phase seed $seed on $(hostname), restart ${SLURM_RESTART_COUNT:-0}"
task=(advcap ablation --phases "$phase" --seeds "$seed" --out "$RUNS" "data.shards=$SHARDS" "${overrides[@]}")
"${task[@]}" --dry-run || advcap_die "the run does not check out (see above)"

# The report, once every task has ended (whatever their outcome): submitted once per array.
mkdir -p "$RUNS"
marker="$RUNS/.report-job-$SLURM_ARRAY_JOB_ID"
if [[ "$index" == 0 && ! -e "$marker" ]]; then
    sbatch --parsable --dependency="afterany:$SLURM_ARRAY_JOB_ID" --job-name=advcap-report \
        --chdir="${SLURM_SUBMIT_DIR:-$ADVCAP_ROOT}" --output=%x-%j.out --nodes=1 --ntasks=1 --cpus-per-task=1 \
        --time=01:00:00 --export="ALL,ADVCAP_ROOT=$ADVCAP_ROOT" \
        --wrap "cd '$ADVCAP_ROOT' && advcap report '$RUNS' --out '$RUNS/report' --phases ${phases[*]} --seeds ${seeds[*]}" \
        > "$marker"
    echo "advcap: report job $(cat "$marker") runs after array $SLURM_ARRAY_JOB_ID"
fi

advcap_check_job_time_limit "$0"  # after the report job: it lists what this array could not do
advcap_prepare_stop "$RUNS"
status=0
advcap_run accelerate launch --config_file "$LAUNCHER_CONFIG" --num_machines 1 \
    --num_processes "$(advcap_procs_per_node)" --main_process_port "$(advcap_port)" -m advcap.cli "${task[@]:1}" \
    || status=$?
advcap_finish "$status"
