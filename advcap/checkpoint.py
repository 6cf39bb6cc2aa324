"""Checkpoints: atomic, the last k kept, resumable to the bit.

A checkpoint directory `checkpoints/step00000100/` holds Accelerate's state (model, optimizer,
registered scheduler, every rank's RNG states) plus `trainer_state.json` (step, data position,
non-finite step counters). It is written under `.tmp-step…` and renamed by the main process once
every rank has finished writing, so a directory named `step…` is always complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

_NAME = re.compile(r"step(\d{8})$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What the loop needs besides model/optimizer/scheduler/RNG to continue exactly."""

    step: int = 0  # optimizer steps done (skipped non-finite steps count: they consumed data)
    micro_batches: int = 0  # micro-batches consumed per rank: the data position
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss, in all
    nonfinite_in_a_row: int = 0
    finished: bool = False


class Checkpointer:
    """Decides when to save (`due`) and saves/loads/prunes checkpoints under `run_dir/checkpoints`."""

    def __init__(self, run_dir: Path, every_steps: int, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.every_steps, self.keep = every_steps, keep

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def latest(self) -> Path | None:
        complete = sorted(p for p in self.root.glob("step*") if _NAME.search(p.name))
        return complete[-1] if complete else None

    def save(self, accelerator, state: TrainerState) -> Path:
        final = self.root / f"step{state.step:08d}"
        tmp = self.root / f".tmp-step{state.step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        # Every rank writes files of its own (its RNG state; under ZeRO its optimizer partition): all must be
        # done before the directory is renamed, or a slower rank writes into a path that no longer exists.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
            log.info("checkpoint saved: %s", final)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator, which: str) -> TrainerState:
        """Restore `which` ('latest' or a checkpoint dir) into the prepared objects; return its state."""
        path = self.latest() if which == "latest" else Path(which)
        if path is None:
            raise AdvcapError(f"--resume latest: no checkpoint in {self.root}")
        if not (path / STATE_FILE).is_file():
            raise AdvcapError(f"{path} is not a complete advcap checkpoint (no {STATE_FILE})")
        accelerator.load_state(str(path))
        state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
        log.info("resumed from %s (step %d)", path, state.step)
        return state

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step*") if _NAME.search(p.name))
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
