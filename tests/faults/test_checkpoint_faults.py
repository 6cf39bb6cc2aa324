"""Checkpoints under faults: a training process SIGKILLed at each point of a checkpoint's save and commit,
a damaged or truncated newest checkpoint, all checkpoints damaged, and a checkpoint holding a pickle with a
payload. After each, what a user does next (`advcap train ... --resume auto`) ends with the weights of the
run that was never interrupted, names what it passed over, or refuses with a clear error; nothing is lost
silently, no temporary folder is left behind, and no payload ever runs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from faulttools import advcap, data, digest, leftovers, plant, tiny  # noqa: F401 — data is a fixture

from advcap.config import load_config
from advcap.errors import AdvcapError
from advcap.rundir import run_path
from advcap.train import FINISHED, train

pytestmark = pytest.mark.slow


def cfg_args(data, out: Path, *extra: str) -> list[str]:
    return ["--config", "adv_train", *tiny(data, f"run.out={out}", *extra)]


def config(data, out: Path):
    return load_config("adv_train", tiny(data, f"run.out={out}"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> str:
    """The digest of the final weights of the run that nobody interrupts."""
    cfg = config(data, tmp_path_factory.mktemp("reference"))
    assert train(cfg) == FINISHED
    return digest(run_path(cfg))


def resume_auto(data, out: Path) -> Path:
    cfg = config(data, out)
    assert train(cfg, resume="auto") == FINISHED
    return run_path(cfg)


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.mark.parametrize("point, on_disk, resumed_at", [
    # killed while writing the step-4 files: only step 2 is a checkpoint
    ("checkpoint.mid_write", [".tmp-step00000004", "step00000002"], 2),
    # every file written, the manifest not yet: still not a checkpoint
    ("checkpoint.files_written", [".tmp-step00000004", "step00000002"], 2),
    # complete and checked, not yet renamed: the restart finishes the commit
    ("checkpoint.before_commit", [".tmp-step00000004", "step00000002"], 4),
    # between two checkpoints, in a training step
    ("train.step", ["step00000002", "step00000004"], 4),
])
def test_a_kill_anywhere_in_a_save_resumes_to_the_uninterrupted_weights(data, tmp_path, reference, caplog, point,
                                                                         on_disk, resumed_at):
    step = 5 if point == "train.step" else 4
    killed = advcap("train", *cfg_args(data, tmp_path), faults=f"{point}=kill@step={step}")
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = run_path(config(data, tmp_path))
    assert checkpoints(run) == on_disk
    assert not (run / "provenance.json").exists()

    caplog.set_level(logging.INFO, logger="advcap")
    resume_auto(data, tmp_path)
    assert digest(run) == reference
    assert f"resumed from {run / 'checkpoints' / f'step{resumed_at:08d}'} (step {resumed_at})" in caplog.text
    if point == "checkpoint.before_commit":
        assert "completed the interrupted commit of step00000004" in caplog.text
    elif on_disk[0].startswith(".tmp-"):
        assert "removed the incomplete .tmp-step00000004" in caplog.text
    assert leftovers(run) == []
    assert checkpoints(run) == ["step00000004", "step00000006"]


def damage(path: Path, how: str) -> None:
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    elif how == "empty":
        path.write_bytes(b"")
    else:  # one flipped byte: same size, another sha256
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncate", "empty", "flip"])
def test_a_damaged_newest_checkpoint_is_passed_over_by_name(data, tmp_path, reference, caplog, how):
    stopped = advcap("train", *cfg_args(data, tmp_path), "--stop-at-step", "4")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    run = run_path(config(data, tmp_path))
    damage(run / "checkpoints" / "step00000004" / "model.safetensors", how)

    caplog.set_level(logging.INFO, logger="advcap")
    resume_auto(data, tmp_path)
    assert "not resuming from step00000004: model.safetensors" in caplog.text
    assert "resuming from step00000002, the newest valid checkpoint" in caplog.text
    assert digest(run) == reference
    # The damaged step 4 was written again (moved aside, replaced, removed): nothing else is left.
    assert checkpoints(run) == ["step00000004", "step00000006"] and leftovers(run) == []


def test_a_kill_while_replacing_a_damaged_checkpoint_loses_nothing(data, tmp_path, reference, caplog):
    """Re-saving a step moves the old folder aside first: killed right then, the new one is complete and the
    restart finishes the swap (there is never a moment without a valid checkpoint of that step)."""
    stopped = advcap("train", *cfg_args(data, tmp_path), "--stop-at-step", "4")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    run = run_path(config(data, tmp_path))
    damage(run / "checkpoints" / "step00000004" / "optimizer.pt", "truncate")
    killed = advcap("train", *cfg_args(data, tmp_path), "--resume", "auto", faults="checkpoint.replacing=kill@step=4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert checkpoints(run) == [".old-step00000004", ".tmp-step00000004", "step00000002"]

    caplog.set_level(logging.INFO, logger="advcap")
    resume_auto(data, tmp_path)
    assert "completed the interrupted re-save of step00000004" in caplog.text
    assert f"resumed from {run / 'checkpoints' / 'step00000004'}" in caplog.text
    assert digest(run) == reference and leftovers(run) == []


def test_resume_with_every_checkpoint_damaged_is_an_error_not_a_fresh_start(data, tmp_path):
    stopped = advcap("train", *cfg_args(data, tmp_path), "--stop-at-step", "2")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    run = run_path(config(data, tmp_path))
    damage(run / "checkpoints" / "step00000002" / "trainer_state.json", "empty")
    with pytest.raises(AdvcapError, match=r"holds no valid checkpoint to resume from: step00000002: trainer_state.json "
                                          r"has 0 bytes"):
        train(config(data, tmp_path), resume="auto")
    assert checkpoints(run) == ["step00000002"] and not (run / "provenance.json").exists()


def test_a_malicious_pickle_in_a_checkpoint_never_runs(data, tmp_path, reference):
    marker = tmp_path / "PWNED"
    stopped = advcap("train", *cfg_args(data, tmp_path), "--stop-at-step", "4")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    run = run_path(config(data, tmp_path))

    # The manifest fixed too: the checkpoint "validates", but loading it would need code: refused by name.
    plant(run / "checkpoints" / "step00000004", "optimizer.pt", marker, update_manifest=True)
    refused = advcap("train", *cfg_args(data, tmp_path), "--resume", "auto")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "step00000004/optimizer.pt holds pickled code or objects advcap never writes (posix.system)" in refused.stderr
    assert "nothing of it was run" in refused.stderr and "Traceback" not in refused.stderr
    assert not marker.exists()


def test_a_tampered_file_that_no_longer_matches_its_manifest_is_passed_over_unread(data, tmp_path, reference, caplog):
    marker = tmp_path / "PWNED"
    stopped = advcap("train", *cfg_args(data, tmp_path), "--stop-at-step", "4")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    run = run_path(config(data, tmp_path))
    plant(run / "checkpoints" / "step00000004", "optimizer.pt", marker, update_manifest=False)
    caplog.set_level(logging.INFO, logger="advcap")
    resume_auto(data, tmp_path)
    assert "not resuming from step00000004: optimizer.pt has" in caplog.text
    assert digest(run) == reference and not marker.exists()
