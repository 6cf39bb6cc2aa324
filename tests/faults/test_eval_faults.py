"""Evaluation and the ablation under faults: a kill between an evaluation's files, a kill between the metrics
and config.yaml, shards that went missing, and a `--parallel` worker killed mid-run. Results must answer
to their settings: a run counts as evaluated only when its one record is written, a partial evaluation
never passes silently, and the report says what it could not average."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faulttools import BIN, REPO, advcap, data, env, tiny  # noqa: F401 — data is a fixture

from advcap.data.shardwriter import convert

pytestmark = pytest.mark.slow


def ablation(out: Path, data, *extra: str, phases: tuple[str, ...] = ("baseline",), seeds: tuple[str, ...] = ("0",)):
    return ["ablation", "--phases", *phases, "--seeds", *seeds, "--out", str(out), *tiny(data, *extra)]


def record(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_a_kill_between_the_predictions_and_the_metrics_leaves_the_run_unevaluated(data, tmp_path):
    out = tmp_path / "runs" / "toy"
    run = out / "baseline" / "seed0"
    killed = advcap(*ablation(out, data), faults="eval.after_predictions=kill")
    assert killed.returncode == -9
    assert (run / "predictions.jsonl").is_file() and not (run / "metrics.json").exists()
    plan = advcap(*ablation(out, data), "--dry-run")
    assert "evaluate (already trained): not evaluated yet" in plan.stdout, plan.stdout

    done = advcap(*ablation(out, data))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "baseline seed 0  evaluated" in done.stdout
    again = advcap(*ablation(out, data), "--dry-run")
    assert "skip (finished with this config)" in again.stdout
    reference = tmp_path / "reference" / "toy"
    assert advcap(*ablation(reference, data)).returncode == 0
    assert record(run)["metrics"] == record(reference / "baseline" / "seed0")["metrics"]


def test_a_kill_between_the_metrics_and_config_yaml_is_flagged_then_repaired(data, tmp_path):
    out = tmp_path / "runs" / "toy"
    run = out / "baseline" / "seed0"
    assert advcap(*ablation(out, data)).returncode == 0
    # New eval settings: the run is evaluated again; killed after its record, before config.yaml says so.
    killed = advcap(*ablation(out, data, "eval.max_new_tokens=4"), faults="ablation.evaluated=kill")
    assert killed.returncode == -9
    assert record(run)["settings"]["max_new_tokens"] == 4 and "max_new_tokens: 6" in (run / "config.yaml").read_text()

    report = advcap("report", str(out))
    assert report.returncode == 0, report.stderr[-3000:]
    assert "config.yaml's eval settings are not those its metrics answer to (eval.max_new_tokens: 6 != 4)" in report.stdout

    repaired = advcap(*ablation(out, data, "eval.max_new_tokens=4"))
    assert repaired.returncode == 0 and "baseline seed 0  skipped" in repaired.stdout
    assert "max_new_tokens: 4" in (run / "config.yaml").read_text()
    assert "warning:" not in advcap("report", str(out)).stdout


@pytest.fixture
def split_shards(data, tmp_path) -> Path:
    """The same images with 3 per shard: the test split in 2 shards."""
    convert("karpathy", data.root / "src" / "captions.json", data.root / "src" / "images", tmp_path / "shards",
            resize=0, shard_size=3)
    return tmp_path / "shards"


def test_missing_shards_fail_the_checks_and_the_evaluation_unless_partial_is_allowed(data, tmp_path, split_shards):
    out = tmp_path / "runs" / "toy"
    run = out / "baseline" / "seed0"
    shards = [f"data.shards={split_shards}"]
    assert advcap(*ablation(out, data, *shards)).returncode == 0
    (split_shards / "test-000001.tar").unlink()

    check = advcap("train", "--config", "baseline", "--check", *tiny(data, *shards, f"run.out={tmp_path / 'runs'}"))
    assert check.returncode == 2 and "test-000001.tar: missing" in check.stderr
    plan = advcap(*ablation(out, data, *shards), "--dry-run")
    assert plan.returncode == 2 and "test-000001.tar: missing" in plan.stderr

    before = (run / "metrics.json").read_bytes()
    scored = advcap("eval", str(run))
    assert scored.returncode == 2
    assert "eval test: 3 of the 6 images the manifest lists could be read" in scored.stderr
    assert "nothing written" in scored.stderr and (run / "metrics.json").read_bytes() == before

    partial = advcap("eval", str(run), "eval.allow_partial=true")
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert record(run)["partial"] is True and record(run)["images"]["test"] == {"evaluated": 3, "expected": 6}
    report = advcap("report", str(out))
    assert "test scored 3 of the 6 images its shards list (a partial evaluation" in report.stdout


def test_a_killed_parallel_worker_fails_only_its_run(data, tmp_path):
    """The OOM killer or an admin takes one worker of `--parallel 2`: that run is failed (and resumable), the
    others finish, and the summary is printed instead of a BrokenProcessPool traceback."""
    out = tmp_path / "runs" / "toy"
    cmd = [str(BIN / "advcap"), *ablation(out, data, "train.steps=400", "train.checkpoint_every_steps=100",
                                          phases=("baseline", "adv_train"), seeds=("0", "1")), "--parallel", "2"]
    log = tmp_path / "ablation.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        lock = out / "baseline" / "seed0" / ".lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.kill(json.loads(lock.read_text())["pid"], signal.SIGKILL)  # the worker that holds baseline seed 0
        assert proc.wait(timeout=600) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert re.search(r"baseline +seed 0 +failed", text) and "its worker process died (killed by SIGKILL)" in text
    for phase, seed in (("adv_train", 0), ("baseline", 1), ("adv_train", 1)):
        assert re.search(rf"{phase} +seed {seed} +done", text), text[-3000:]
    assert "Traceback" not in text and "BrokenProcessPool" not in text
