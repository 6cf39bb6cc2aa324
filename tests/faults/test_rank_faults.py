"""Ranks under faults, on 2 real gloo ranks: one rank SIGKILLed mid-step, one rank frozen (SIGSTOP), a failure
that only rank 0 sees in a multi-rank ablation, and a DeepSpeed checkpoint holding a pickle with a payload.

What must hold: the job ends within the process-group timeout (dist.timeout_s) with a message naming the
rank that stopped answering, never a 30-minute hang; the last checkpoint stays valid and resuming it reaches
the weights of the run nobody interrupted; a failure one rank saw fails that run on every rank, and the
ranks go on together with the next run; no payload ever runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from faulttools import DDP, REPO, data, digest, engine, launch, leftovers, plant, tiny  # noqa: F401 — data is a fixture

from advcap.config import load_config
from advcap.rundir import run_path

pytestmark = pytest.mark.slow

TIMEOUT_S = 10


def train_args(data, out: Path, *extra: str) -> list[str]:
    return [str(REPO / "launch" / "train.py"), "--config", "adv_train",
            *tiny(data, f"run.out={out}", f"dist.timeout_s={TIMEOUT_S}", *extra)]


def run_of(data, out: Path) -> Path:
    return run_path(load_config("adv_train", tiny(data, f"run.out={out}")))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> str:
    """The final weights of the 2-rank run nobody interrupts."""
    out = tmp_path_factory.mktemp("reference")
    done = launch(DDP, *train_args(data, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return digest(run_of(data, out))


def test_a_killed_rank_ends_the_job_at_once_naming_it_and_the_run_resumes(data, tmp_path, reference):
    started = time.monotonic()
    killed = launch(DDP, *train_args(data, tmp_path), faults="train.step=kill@rank=1@step=5")
    assert killed.returncode != 0
    # Start-up included, on a machine whose other core runs another test (make test's second worker).
    assert time.monotonic() - started < 90
    # Rank 0 names who stopped answering (its peer's connection closed); the launcher names the killed rank.
    assert "rank 0: rank 1 (last seen at step 5" in killed.stderr and "stopped answering" in killed.stderr
    assert "exitcode  : -9" in killed.stderr and "rank      : 1" in killed.stderr
    assert "The last checkpoint is intact" in killed.stderr
    run = run_of(data, tmp_path)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step00000002", "step00000004"]

    resumed = launch(DDP, *train_args(data, tmp_path), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digest(run) == reference and leftovers(run) == []


def test_a_hung_rank_ends_the_job_within_the_timeout_naming_it(data, tmp_path):
    started = time.monotonic()
    hung = launch(DDP, *train_args(data, tmp_path), faults="train.step=stop@rank=1@step=3", timeout=240)
    took = time.monotonic() - started
    assert hung.returncode != 0
    # dist.timeout_s, then the launcher's grace period before it SIGKILLs the frozen rank (30 s), and start-up
    # (up to a minute while the other core runs another test); the hang itself would last until timeout=240.
    assert took < TIMEOUT_S + 30 + 60, took
    assert "rank 0: rank 1 (last seen at step 3" in hung.stderr, hung.stderr[-3000:]
    assert f"stopped answering during training {run_of(data, tmp_path)} (dist.timeout_s={TIMEOUT_S}" in hung.stderr
    assert "Timed out" in hung.stderr


def test_a_failure_only_rank_0_sees_fails_that_run_on_both_ranks_and_the_next_run_goes_on(data, tmp_path):
    """The evaluation's files are written by rank 0 only; here its metrics.json cannot be written (a folder is
    in the way), so only rank 0 fails. Both ranks agree, report that run failed, and train the next seed."""
    out = tmp_path / "runs" / "toy"
    blocker = out / "adv_train" / "seed0" / "metrics.json"
    (blocker / "in-the-way").mkdir(parents=True)
    started = time.monotonic()
    proc = launch(DDP, "-m", "advcap.cli", "ablation", "--phases", "adv_train", "--seeds", "0", "1", "--out", str(out),
                  *tiny(data, f"dist.timeout_s={TIMEOUT_S}"))
    assert time.monotonic() - started < 120
    assert proc.returncode != 0
    assert "writing the evaluation of" in proc.stderr and "failed on rank 0: Is a directory" in proc.stderr
    # Both ranks went on to seed 1 together: it trained (2-rank provenance) and was evaluated.
    seed1 = out / "adv_train" / "seed1"
    assert json.loads((seed1 / "metrics.json").read_text())["world_size"] == 2
    assert "adv_train seed 0  failed" in proc.stdout and "adv_train seed 1  done" in proc.stdout
    assert "1 of 2 runs not done: adv_train/seed0 (failed)" in proc.stderr


def test_a_malicious_pickle_in_a_deepspeed_checkpoint_never_runs(data, tmp_path):
    """DeepSpeed would load its optimizer partitions with weights_only=False; advcap scans them first (on the
    main process, agreed by both ranks) and reads them weights-only with an allow-list."""
    marker = tmp_path / "PWNED"
    args = train_args(data, tmp_path, "train.global_batch_size=8")
    stopped = launch(engine("zero2"), *args, "--stop-at-step", "2")
    assert "exitcode: 75" in stopped.stderr, stopped.stderr[-3000:]
    checkpoint = run_of(data, tmp_path) / "checkpoints" / "step00000002"
    (partition,) = (checkpoint / "zero").glob("zero_pp_rank_1_*optim_states.pt")
    plant(checkpoint, f"zero/{partition.name}", marker, update_manifest=True)
    refused = launch(engine("zero2"), *args, "--resume", "auto")
    assert refused.returncode != 0 and not marker.exists()
    assert "failed on rank 0" in refused.stderr and "holds pickled code or objects advcap never writes" in refused.stderr
    assert "posix.system" in refused.stderr
