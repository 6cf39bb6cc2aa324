"""The run directory's rules, piece by piece (the fault suite in tests/faults/ breaks whole runs): atomic
writes, checkpoint validation, recovery of every interrupted commit, pruning, the lock, agreed failures."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from advcap import atomic
from advcap.distributed import RankFailure, agree
from advcap.errors import AdvcapError
from advcap.rundir import CHECKPOINT_MANIFEST, RunDir, RunDirBusy, sha256_file, validate_checkpoint


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    atomic.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as a plain open() would make it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_kill_between_the_two_renames_of_replace_dir_loses_nothing(tmp_path):
    """The old folder moved aside, the new one not yet in (what a SIGKILL there leaves): recover() at the next
    start puts the old one back, and so does the next replace_dir before it writes."""
    run = RunDir(tmp_path / "run")
    for folder in (run.export_dir, run.checkpoints_dir / "best"):
        atomic.replace_dir(folder, lambda d: (d / "w").write_text("old"))
        folder.rename(folder.with_name(f".{folder.name}.old-prev"))
        folder.with_name(f".{folder.name}{atomic.TEMP_MARK}new").mkdir()  # the half-written new one
    assert sorted(run.recover()) == ["restored best/ (its replacement was interrupted)",
                                     "restored hf/ (its replacement was interrupted)"]
    assert (run.export_dir / "w").read_text() == (run.checkpoints_dir / "best" / "w").read_text() == "old"
    final = tmp_path / "export"
    atomic.replace_dir(final, lambda d: (d / "w").write_text("old"))
    final.rename(final.with_name(".export.old-prev"))
    with pytest.raises(OSError):
        atomic.replace_dir(final, lambda d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert (final / "w").read_text() == "old"


def test_replace_dir_swaps_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    final = tmp_path / "hf"
    atomic.replace_dir(final, lambda d: (d / "a").write_text("1"))
    with pytest.raises(OSError):
        atomic.replace_dir(final, lambda d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert [p.name for p in final.iterdir()] == ["a"] and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    atomic.replace_dir(final, lambda d: (d / "b").write_text("2"))
    assert [p.name for p in final.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def checkpoint(run: RunDir, step: int, commit: bool = True, payload: bytes = b"weights") -> Path:
    """A checkpoint folder of `step` as the checkpointer leaves it: committed, or pending with its manifest."""
    tmp = run.begin_checkpoint(step)
    (tmp / "model.safetensors").write_bytes(payload)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    if commit:
        return run.commit_checkpoint(tmp, step, keep=10)
    files = {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
             for n in ("model.safetensors", "trainer_state.json")}
    (tmp / CHECKPOINT_MANIFEST).write_text(json.dumps({"format": 1, "step": step, "files": files}))
    return tmp


def names(run: RunDir) -> list[str]:
    return sorted(p.name for p in run.checkpoints_dir.iterdir())


def test_validation_names_what_is_wrong(tmp_path):
    run = RunDir(tmp_path / "run")
    good = checkpoint(run, 2)
    assert validate_checkpoint(good) is None
    bad = checkpoint(run, 4)
    (bad / "model.safetensors").write_bytes(b"weightz")
    assert validate_checkpoint(bad) == ("model.safetensors does not match its sha256 in checkpoint.json "
                                        "(damaged or changed)")
    (bad / "model.safetensors").write_bytes(b"w")
    assert validate_checkpoint(bad).startswith("model.safetensors has 1 bytes, its manifest says 7")
    manifest = json.loads((bad / CHECKPOINT_MANIFEST).read_text())
    manifest["files"] = {"../../escape": {"bytes": 1, "sha256": "0"}, **manifest["files"]}
    (bad / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest))
    assert validate_checkpoint(bad) == "../../escape is missing"  # never read outside the checkpoint
    (bad / CHECKPOINT_MANIFEST).unlink()
    assert validate_checkpoint(bad).startswith("no checkpoint.json")
    path, passed = run.latest_valid_checkpoint()
    assert path == good and [str(p) for p in passed] == ["step00000004: no checkpoint.json (incomplete, or written "
                                                          "by an older advcap)"]


def test_recover_finishes_or_undoes_every_interrupted_commit(tmp_path):
    run = RunDir(tmp_path / "run")
    checkpoint(run, 2)
    # 1. killed before the manifest: removed.
    incomplete = run.begin_checkpoint(4)
    (incomplete / "model.safetensors").write_bytes(b"half")
    assert run.recover() == ["removed the incomplete .tmp-step00000004"] and names(run) == ["step00000002"]
    # 2. killed after the manifest, before the rename: finished.
    checkpoint(run, 4, commit=False)
    assert run.recover() == ["completed the interrupted commit of step00000004"]
    assert names(run) == ["step00000002", "step00000004"]
    # 3. a re-save killed between moving the old folder aside and renaming the new one: finished.
    (run.checkpoints_dir / "step00000004").rename(run.checkpoints_dir / ".old-step00000004")
    checkpoint(run, 4, commit=False, payload=b"newer")
    assert run.recover() == ["completed the interrupted re-save of step00000004"]
    assert (run.checkpoints_dir / "step00000004" / "model.safetensors").read_bytes() == b"newer"
    # 4. the same, killed before the new one was complete: the old one comes back.
    (run.checkpoints_dir / "step00000004").rename(run.checkpoints_dir / ".old-step00000004")
    assert run.recover() == ["restored step00000004 (its re-save was interrupted)"]
    assert names(run) == ["step00000002", "step00000004"] and validate_checkpoint(run.checkpoints_dir / "step00000004") is None


def test_pruning_keeps_the_newest_and_only_after_a_newer_one_is_committed(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (2, 4, 6):
        tmp = run.begin_checkpoint(step)
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "trainer_state.json").write_text("{}")
        run.commit_checkpoint(tmp, step, keep=2)
    assert names(run) == ["step00000004", "step00000006"]


def test_the_lock_is_reentrant_in_a_process_and_refuses_another_naming_the_holder(tmp_path):
    run = RunDir(tmp_path / "run")
    probe = ("import sys; from advcap.rundir import RunDir\n"
             "try:\n    with RunDir(sys.argv[1]).lock(): print('got it')\n"
             "except Exception as err: print(type(err).__name__, err)\n")
    with run.lock():
        with run.lock():  # the ablation holds a run across training and evaluation, which take it again
            other = subprocess.run([sys.executable, "-c", probe, str(run.path)], capture_output=True, text=True)
    assert other.stdout.startswith(f"RunDirBusy {run.path} is in use by another advcap process (host "
                                   f"{os.uname().nodename}, pid {os.getpid()}, since ")
    again = subprocess.run([sys.executable, "-c", probe, str(run.path)], capture_output=True, text=True)
    assert again.stdout.strip() == "got it"  # released with the last holder
    assert issubclass(RunDirBusy, AdvcapError)


def test_agree_alone_turns_os_errors_into_one_line_and_keeps_user_errors(tmp_path):
    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    with pytest.raises(RankFailure, match=rf"writing x failed: No space left on device \({tmp_path / 'x'}\)"):
        agree("writing x", full)
    with pytest.raises(AdvcapError, match="bad input") as info:
        agree("checking", lambda: (_ for _ in ()).throw(AdvcapError("bad input")))
    assert type(info.value) is AdvcapError
    assert agree("reading", lambda: 42, main_only=True) == 42


def test_predictions_are_read_only_when_they_are_the_ones_the_record_names(tmp_path):
    """The report's audit resamples the evaluation's captions: it gets them only from the predictions.jsonl that
    metrics.json names by sha256 — not from a file changed after the evaluation, nor from a missing one."""
    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    lines = [{"image_id": f"i{k}", "split": "test", "references": ["a red circle"], "captions": {"clean": "a red circle"}}
             for k in range(3)]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    rundir.write_evaluation(text, {"metrics": {}, "settings": {}, "images": {}})
    record = rundir.evaluation()
    assert rundir.predictions(record) == lines
    rundir.predictions_file.write_bytes(text.replace("\n", "\r\n").encode())  # the same text once decoded
    assert rundir.predictions(record) is None
    rundir.predictions_file.write_text(text.replace("red", "blue"))
    assert rundir.predictions(record) is None
    rundir.predictions_file.unlink()
    assert rundir.predictions(record) is None
