"""The SLURM templates on a real SLURM cluster (tests/slurm_cluster.py): `sbatch slurm/ablation.sh` as a job
array plus its dependent report, `slurm/train.sh` over two (emulated) nodes, and a task signalled before
its time limit that checkpoints, requeues itself and resumes to the same final step.

Every job is submitted from a directory outside the project, as a user would; resources the templates ask
for (GPUs, 8+ CPUs) are overridden on the sbatch command line, as the templates' comments say to.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import make_tiny_shards, metrics_of

from advcap.model import Captioner
from advcap.train import weights_digest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent if (Path(sys.executable).parent / "activate").is_file() else None
PHASES, SEEDS = ["baseline", "adv_train"], [0, 1]
SMALL = ["--gres=none", "--cpus-per-task=1", "--time=15"]  # what this 2-CPU, GPU-less cluster can give


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("slurm_data"))


def tiny(data: Path, *extra: str) -> list[str]:
    return [
        "model.preset=tiny", "data.image_size=32", "data.workers=0", "data.shuffle_buffer=16",
        f"data.tokenizer={data / 'tok'}", "train.steps=3", "train.global_batch_size=8", "train.warmup_steps=1",
        "train.log_every_steps=1", "eval.train_subset_images=8", "eval.batch_size=8", "eval.max_new_tokens=6",
        "eval.conditions=[clean,fgsm,blind]", "eval.coco_metrics=false", "eval.audit=false", *extra,
    ]


def job_env(cluster, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("ACCELERATE_", "SLURM_JOB", "SLURM_ARRAY"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PROCS_PER_NODE="1")
    if VENV is not None:
        env["ADVCAP_VENV"] = str(VENV)
    env.update(variables)
    return env


def ablation_env(cluster, data: Path, runs: Path) -> dict[str, str]:
    return job_env(
        cluster, PHASES=" ".join(PHASES), SEEDS=" ".join(map(str, SEEDS)), DATASET="micro",
        SHARDS=str(data / "shards"), RUNS=str(runs), OVERRIDES=" ".join(tiny(data)),
    )


def states(records: list[dict]) -> list[str]:
    return [r["JobState"] for r in records]


def test_ablation_array_runs_every_task_then_the_report(slurm_cluster, data, tmp_path):
    submit_dir, runs = tmp_path / "submit", tmp_path / "runs" / "micro"
    submit_dir.mkdir()
    env = ablation_env(slurm_cluster, data, runs)
    job = slurm_cluster.sbatch([*SMALL, "--array=0-3", str(REPO / "slurm" / "ablation.sh")], cwd=submit_dir, env=env)
    tasks = slurm_cluster.wait(job, timeout=600)
    logs = {int(t["ArrayTaskId"]): (submit_dir / f"advcap-ablation-{job}_{t['ArrayTaskId']}.out") for t in tasks}
    assert states(tasks) == ["COMPLETED"] * 4, "\n".join(p.read_text()[-3000:] for p in logs.values() if p.exists())
    # Task i = PHASES[i // |SEEDS|] with SEEDS[i % |SEEDS|].
    for i, log in logs.items():
        assert f"task {i} of array {job}: {PHASES[i // 2]} seed {SEEDS[i % 2]}" in log.read_text()

    report_job = (runs / f".report-job-{job}").read_text().strip()
    (report,) = slurm_cluster.wait(report_job, timeout=180)
    assert report["JobState"] == "COMPLETED", (submit_dir / f"advcap-report-{report_job}.out").read_text()[-3000:]
    assert f"afterany:{job}" in report["Dependency"] or report["Dependency"] == "(null)"  # cleared once satisfied
    assert max(t["EndTime"] for t in tasks) <= report["StartTime"]

    with open(runs / "report" / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for phase in PHASES:
        metrics = [metrics_of(runs / phase / f"seed{s}") for s in SEEDS]
        prov = json.loads((runs / phase / "seed0" / "provenance.json").read_text())
        assert prov["slurm"]["array_job_id"] == job and prov["launcher"].startswith("slurm")
        for condition in ("clean", "fgsm", "blind"):
            values = [m["test"][condition]["bleu4"] for m in metrics]
            (row,) = [r for r in rows if (r["table"], r["phase"], r["split"], r["condition"], r["quantity"])
                      == ("summary", phase, "test", condition, "bleu4")]
            assert int(row["n"]) == 2 and float(row["mean"]) == pytest.approx(sum(values) / 2, abs=1e-9)


def test_a_finished_task_is_not_retrained(slurm_cluster, data, tmp_path):
    """A resubmitted array skips what is done: the run dirs keep their files (same mtimes)."""
    runs = tmp_path / "runs" / "micro"
    env = ablation_env(slurm_cluster, data, runs) | {"PHASES": "baseline", "SEEDS": "0"}
    first = slurm_cluster.sbatch([*SMALL, "--array=0-0", str(REPO / "slurm" / "ablation.sh")], cwd=tmp_path, env=env)
    assert states(slurm_cluster.wait(first, timeout=300)) == ["COMPLETED"]
    model = runs / "baseline" / "seed0" / "hf" / "model.safetensors"
    before = model.stat().st_mtime_ns
    again = slurm_cluster.sbatch([*SMALL, "--array=0-0", str(REPO / "slurm" / "ablation.sh")], cwd=tmp_path, env=env)
    assert states(slurm_cluster.wait(again, timeout=300)) == ["COMPLETED"]
    assert model.stat().st_mtime_ns == before
    assert "skipped" in (tmp_path / f"advcap-ablation-{again}_0.out").read_text()


def test_an_array_that_does_not_match_the_lists_fails_with_the_fix(slurm_cluster, data, tmp_path):
    env = ablation_env(slurm_cluster, data, tmp_path / "runs" / "micro")
    job = slurm_cluster.sbatch([*SMALL, "--array=0-2", str(REPO / "slurm" / "ablation.sh")], cwd=tmp_path, env=env)
    tasks = slurm_cluster.wait(job, timeout=120)
    assert states(tasks) == ["FAILED"] * 3
    log = (tmp_path / f"advcap-ablation-{job}_0.out").read_text()
    assert "2 phases × 2 seeds = 4 tasks, but this array is 0-2 (3 tasks)" in log
    assert "sbatch --array=0-3 slurm/ablation.sh" in log
    assert not (tmp_path / "runs" / "micro" / "baseline").exists()


def test_without_sbatch_the_script_checks_then_submits_the_right_array(slurm_cluster, data, tmp_path):
    import subprocess

    runs = tmp_path / "runs" / "micro"
    env = ablation_env(slurm_cluster, data, runs) | {"SHARDS": str(tmp_path / "missing")}
    bad = subprocess.run(["bash", str(REPO / "slurm" / "ablation.sh")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and f"no manifest.json in {tmp_path / 'missing'}" in bad.stderr
    assert "nothing submitted" in bad.stderr
    env = ablation_env(slurm_cluster, data, runs)
    env["OVERRIDES"] = env["OVERRIDES"].replace("[clean,fgsm,blind]", "[clean,transfer-fgsm]")
    bad = subprocess.run(["bash", str(REPO / "slurm" / "ablation.sh")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "transfer-fgsm needs each seed's baseline trained first" in bad.stderr

    env = ablation_env(slurm_cluster, data, runs) | {"SEEDS": "0 1 2"}  # 2 × 3: array 0-5, not the file's 0-14
    # Held, so that only the submission is checked here, not its 6 trainings; arguments go to sbatch.
    proc = subprocess.run(["bash", str(REPO / "slurm" / "ablation.sh"), *SMALL, "--hold"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split()[-1]
    try:
        record = slurm_cluster.run(["scontrol", "show", "job", job, "-o"]).stdout
        assert "ArrayTaskId=0-5 " in record and "JobName=advcap-ablation" in record, record
        assert f"WorkDir={tmp_path} " in record  # the task logs land where the user is, not in the project
    finally:
        slurm_cluster.run(["scancel", job])

    # A time limit not longer than the USR1 lead: every start would be told to stop at once. Refused here.
    refused = subprocess.run(["bash", str(REPO / "slurm" / "ablation.sh"), "--gres=none", "--time=10"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and not refused.stdout.strip()
    assert "the time limit 10 (600 s) is not longer than the stop signal's lead of 600 s" in refused.stderr


def test_a_time_limit_not_longer_than_the_lead_fails_once_and_the_report_names_what_is_missing(slurm_cluster, data,
                                                                                             tmp_path):
    """`sbatch --time=10 slurm/ablation.sh` with its USR1 lead of 600 s: each task fails once, saying why, instead of
    being told to stop at once, requeueing and looping; the report job lists every run asked for as missing."""
    runs = tmp_path / "runs" / "micro"
    env = ablation_env(slurm_cluster, data, runs)
    job = slurm_cluster.sbatch(["--gres=none", "--cpus-per-task=1", "--time=10", "--array=0-3",
                                str(REPO / "slurm" / "ablation.sh")], cwd=tmp_path, env=env)
    tasks = slurm_cluster.wait(job, timeout=180)
    assert states(tasks) == ["FAILED"] * 4 and {t["Restarts"] for t in tasks} == {"0"}
    log = (tmp_path / f"advcap-ablation-{job}_1.out").read_text()
    assert "the time limit 00:10:00 (600 s) is not longer than the stop signal's lead of 600 s" in log
    report_job = (runs / f".report-job-{job}").read_text().strip()
    (report,) = slurm_cluster.wait(report_job, timeout=180)
    assert report["JobState"] == "COMPLETED", (tmp_path / f"advcap-report-{report_job}.out").read_text()[-3000:]
    md = (runs / "report" / "report.md").read_text()
    assert "4 of the 4 runs asked for (2 phases × 2 seeds) are missing" in md
    for phase in PHASES:
        for seed in SEEDS:
            assert f"- {phase} seed{seed}: no run directory" in md


def test_train_sh_fails_before_training_without_shards(slurm_cluster, data, tmp_path):
    args = ["--config", "baseline", *tiny(data, f"data.shards={tmp_path / 'nowhere'}", f"run.out={tmp_path / 'runs'}")]
    job = slurm_cluster.sbatch([*SMALL, "--nodes=1", str(REPO / "slurm" / "train.sh"), *args], cwd=tmp_path,
                               env=job_env(slurm_cluster))
    (record,) = slurm_cluster.wait(job, timeout=120)
    log = (tmp_path / f"advcap-train-{job}.out").read_text()
    assert record["JobState"] == "FAILED", log
    assert f"no manifest.json in {tmp_path / 'nowhere'}" in log and "the run does not check out" in log
    assert "rendezvous at" not in log and not (tmp_path / "runs").exists()  # stopped before srun


def test_train_sh_runs_one_rank_per_node_on_two_nodes(slurm_cluster_2nodes, data, tmp_path):
    env = job_env(slurm_cluster_2nodes)
    args = ["--config", "adv_train", *tiny(data, f"data.shards={data / 'shards'}", f"run.out={tmp_path / 'runs'}")]
    job = slurm_cluster_2nodes.sbatch([*SMALL, "--nodes=2", str(REPO / "slurm" / "train.sh"), *args], cwd=tmp_path, env=env)
    (record,) = slurm_cluster_2nodes.wait(job, timeout=300)
    log = (tmp_path / f"advcap-train-{job}.out").read_text()
    assert record["JobState"] == "COMPLETED", log[-4000:]
    assert "2 nodes × 1 processes" in log
    out = tmp_path / "runs" / "demo" / "adv_train" / "seed0"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["world_size"] == 2 and prov["slurm"]["nnodes"] == "2" and prov["distributed_type"] == "MULTI_CPU"
    # train() gathers both ranks' weight digests and fails on a difference; the recorded one is the export's.
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(str(out / "hf"))
    model.encoder.pooler = None
    assert prov["weights_sha256"] == weights_digest(Captioner(model, 32))


def test_a_task_stopped_before_any_progress_fails_once_instead_of_requeueing(slurm_cluster, data, tmp_path):
    """USR1 as the job starts (preempted at once, or a lead that eats the whole limit): the ranks find the stop
    file before their first step, there is nothing to checkpoint, and the task fails once with the reason."""
    env = job_env(slurm_cluster)
    args = ["--config", "baseline", *tiny(data, f"data.shards={data / 'shards'}", f"run.out={tmp_path / 'runs'}",
                                          "train.steps=400")]
    job = slurm_cluster.sbatch([*SMALL, "--nodes=1", str(REPO / "slurm" / "train.sh"), *args], cwd=tmp_path, env=env)
    log = tmp_path / f"advcap-train-{job}.out"
    _wait_for_text(log, "rendezvous at", timeout=120)
    time.sleep(1)  # the shell is in its wait, the ranks are still starting
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    (record,) = slurm_cluster.wait(job, timeout=180)
    text = log.read_text()
    assert record["JobState"] == "FAILED" and record["Restarts"] == "0", text[-4000:]
    assert "stop requested before the first step of this start" in text
    assert "stopped on request before making any progress since it started: not requeued" in text
    assert not (tmp_path / "runs" / "demo" / "baseline" / "seed0" / "checkpoints").exists()


def _wait_for_text(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} not in {path}:\n{path.read_text()[-3000:] if path.is_file() else ''}"
        time.sleep(0.2)


def test_a_signalled_task_checkpoints_requeues_and_resumes(slurm_cluster, data, tmp_path):
    steps = 400
    env = job_env(slurm_cluster)
    args = ["--config", "baseline", *tiny(data, f"data.shards={data / 'shards'}", f"run.out={tmp_path / 'runs'}",
                                          f"train.steps={steps}", "train.log_every_steps=5", "train.checkpoint_every_steps=1000")]
    job = slurm_cluster.sbatch([*SMALL, "--nodes=1", str(REPO / "slurm" / "train.sh"), *args], cwd=tmp_path, env=env)
    log = tmp_path / f"advcap-train-{job}.out"
    _wait_for_text(log, f"step 10/{steps}", timeout=120)
    # What --signal=B:USR1@<s> does before the time limit, now: USR1 to the batch shell only.
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    _wait_for_text(log, "requeueing job", timeout=120)
    (record,) = slurm_cluster.wait(job, timeout=300)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", text[-4000:]
    out = tmp_path / "runs" / "demo" / "baseline" / "seed0"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["finished"] and state["step"] == steps
    resumed_at = json.loads((out / "provenance.json").read_text())["resumed_at_step"]
    assert 10 <= resumed_at < steps
    assert f"resumed from {out / 'checkpoints' / f'step{resumed_at:08d}'}" in text
    assert os.path.isdir(out / "checkpoints" / f"step{steps:08d}")
    assert not any((out / ".stop").iterdir())  # the stop file is gone: a later requeue will not stop at once
