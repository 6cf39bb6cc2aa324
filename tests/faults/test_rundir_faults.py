"""The run directory under faults: a second writer while a run trains, a holder that dies, and a real full
disk (a small tmpfs as the run directory) in the middle of a run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faulttools import BIN, REPO, advcap, data, digest, env, leftovers, tiny  # noqa: F401 — data is a fixture

from advcap.config import load_config
from advcap.rundir import run_path
from advcap.train import FINISHED, train

pytestmark = pytest.mark.slow


def args(data, out: Path, *extra: str) -> list[str]:
    return ["--config", "adv_train", *tiny(data, f"run.out={out}", *extra)]


def start(data, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([str(BIN / "advcap"), "train", *args(data, out, *extra)], cwd=REPO, env=env(),
                                stdout=f, stderr=subprocess.STDOUT)


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in {log}"
        time.sleep(0.1)


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_blocks_nobody(data, tmp_path):
    log = tmp_path / "first.log"
    first = start(data, tmp_path, log, "train.steps=100000", "train.checkpoint_every_steps=5")
    try:
        wait_for(log, "checkpoint saved", first)
        second = advcap("train", *args(data, tmp_path, "train.steps=100000", "train.checkpoint_every_steps=5"),
                        "--resume", "auto", timeout=60)
        assert second.returncode == 2
        assert f"is in use by another advcap process (host {os.uname().nodename}, pid {first.pid}," in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the holder goes on, untouched
        # The holder dies without a word (no cleanup can run): the lock goes with it.
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    cfg = load_config("adv_train", tiny(data, f"run.out={tmp_path}", "train.steps=100000",
                                        "train.checkpoint_every_steps=5"))
    run = run_path(cfg)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step*"))
    resumed = advcap("train", *args(data, tmp_path, "train.steps=100000", "train.checkpoint_every_steps=5"),
                     "--resume", "auto", "--stop-at-step", str(int(kept[-1][4:]) + 1), timeout=90)
    assert resumed.returncode == 75, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / kept[-1]}" in resumed.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: a real file system that runs out of space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_mid_run_is_a_clear_error_and_the_run_resumes_once_there_is_space(data, tmp_path, small_disk):
    reference = load_config("adv_train", tiny(data, f"run.out={tmp_path / 'reference'}"))
    assert train(reference) == FINISHED

    # Leave room for the config and the first checkpoint (~0.7 MB), not for the second.
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (6 * 2**20 - 1_500_000))
    full = advcap("train", *args(data, small_disk))
    assert full.returncode == 2, full.stderr[-3000:]
    run = run_path(load_config("adv_train", tiny(data, f"run.out={small_disk}")))
    assert f"error: writing the checkpoint failed: No space left on device ({run / 'checkpoints'}" in full.stderr
    assert "Traceback" not in full.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")) == ["step00000002"]

    filler.unlink()
    resumed = advcap("train", *args(data, small_disk), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removed the incomplete .tmp-step00000004" in resumed.stderr
    assert digest(run) == digest(run_path(reference)) and leftovers(run) == []
