"""Stop requests: preemption and time limits, for training and evaluation alike.

Two ways in: SIGUSR1/SIGTERM to a rank (a local run, or the launcher forwarding SIGTERM), and a stop
file whose path is in $ADVCAP_STOP_FILE. The file is what the SLURM scripts use: `--signal=B:USR1`
reaches only the batch shell, and the launcher forwards no USR1 to the ranks, so the shell creates
the file instead; on a shared file system it reaches the ranks of every node.

Training acts on a request after the current step (all ranks agree on it through a reduced flag) and
writes a checkpoint; evaluation stops before its next batch and keeps nothing (its outputs are written
only when complete), so the run is evaluated again from the start when the job comes back. Either way the
process exits with EXIT_STOPPED, which the SLURM scripts answer with `scontrol requeue`.

A stop that comes before this start made any progress (no new checkpoint, no result) exits with
EXIT_NO_PROGRESS instead: requeueing would only repeat it (typically a time limit not longer than the
stop signal's lead). Since a launcher hides its ranks' exit codes, the main process also writes the
outcome beside the stop file (`<stop file>.outcome`: `progress` or `no-progress`) for the scripts to read.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early on request; run the same command again to go on
EXIT_NO_PROGRESS = 76  # stopped on request before any progress: running it again the same way would loop
STOP_FILE_VARIABLE = "ADVCAP_STOP_FILE"
OUTCOME_SUFFIX = ".outcome"
NO_PROGRESS_ADVICE = (
    "it was stopped before making any progress since it started, so running it again the same way would only "
    "repeat this: the time limit is probably not longer than the stop signal's lead (--signal=B:USR1@<seconds>), "
    "or the job was preempted before its first checkpoint. Give the job more time (--time) or a shorter lead"
)


class Stopped(Exception):
    """Work stopped on request. `progress`: whether this start left anything durable (a checkpoint, a result)."""

    def __init__(self, message: str, progress: bool = True):
        super().__init__(message)
        self.progress = progress


def report_outcome(progress: bool) -> None:
    """Write `<stop file>.outcome` for the SLURM scripts (main process, when exiting on a stop request)."""
    stop_file = os.environ.get(STOP_FILE_VARIABLE)
    if stop_file:
        from advcap import atomic

        atomic.write_text(stop_file + OUTCOME_SUFFIX, ("progress" if progress else "no-progress") + "\n")


class StopRequest:
    """Whether a stop was asked for, by signal (after `install`) or by the stop file."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, stop_file: str | None = None):
        self.signalled = False
        self.stop_file = stop_file if stop_file is not None else os.environ.get(STOP_FILE_VARIABLE) or None

    @property
    def requested(self) -> bool:
        if not self.signalled and self.stop_file and os.path.exists(self.stop_file):
            log.warning("stop file %s exists: stopping at the next safe point", self.stop_file)
            self.signalled = True
        return self.signalled

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: stopping at the next safe point", signal.Signals(signum).name)
        self.signalled = True
