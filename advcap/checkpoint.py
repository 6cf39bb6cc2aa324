"""Training checkpoints: what one holds, and how it is written and read without running pickled code.

`checkpoints/stepNNNNNNNN/` (its commit, validation and pruning belong to `advcap.rundir`):

    trainer_state.json   step, data position, non-finite counters, the LR scheduler's state, world size
    model.safetensors    the full weights, under every engine (what `eval --select best-val` reads)
    optimizer.pt         DDP / one process: the optimizer's state dict (tensors, numbers, lists)
    zero/                DeepSpeed ZeRO-1/2: the engine's own checkpoint (every rank's optimizer partition)
    rng/rank<r>.json     each rank's RNG states (Python, NumPy, torch CPU, CUDA)
    checkpoint.json      the manifest: every file with its size and sha256, written last

Nothing is loaded with `weights_only=False`: safetensors, JSON, `torch.load(weights_only=True)`, and
DeepSpeed's files through a checkpoint engine that does the same with an allow-list of DeepSpeed's
plain record classes. Before anything is loaded, every pickle-based file of the checkpoint is scanned
(without unpickling) for globals outside that allow-list; a checkpoint holding one — a pickle with a
payload — is refused with an error naming the file and the global, and nothing of it runs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from advcap import faults
from advcap.distributed import agree
from advcap.errors import AdvcapError
from advcap.rundir import TRAINING_STATE, RunDir, checkpoint_step

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
ZERO_TAG = "zero"
RNG_DIR = "rng"
PICKLE_SUFFIXES = (".pt", ".bin", ".pkl", ".pth")


@dataclass
class TrainerState:
    """What the loop needs besides model/optimizer/scheduler/RNG to continue exactly."""

    step: int = 0  # optimizer steps done (skipped non-finite steps count: they consumed data)
    micro_batches: int = 0  # micro-batches consumed per rank: the data position
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss or gradient norm, in all
    nonfinite_in_a_row: int = 0
    finished: bool = False
    best_step: Optional[int] = None  # the validation step of checkpoints/best (advcap.validation)
    best_value: Optional[float] = None  # its train.keep_best figure
    overfit_streak: int = 0  # validations in a row showing the catastrophic-overfitting signature
    overfit_alarms: list = field(default_factory=list)  # the guard's alarms, as OverfitAlarm.as_dict()
    stopped_early: Optional[dict] = None  # {"step", "action", "reason"} when the guard ended training

    @classmethod
    def from_dict(cls, data: dict) -> "TrainerState":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class UnsafeCheckpoint(AdvcapError):
    """A checkpoint file that could only be loaded by running code from it."""


# ---------------------------------------------------------------- safe loading of torch.save files


def deepspeed_safe_globals() -> list:
    """DeepSpeed's plain record classes that its ZeRO-1/2 optimizer states pickle (loss scaler settings,
    the ZeRO stage enum, fragment addresses): data only, rebuilt without calling anything else."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _allowed_global_names() -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in deepspeed_safe_globals()}


def unsafe_globals(path: Path) -> list[str]:
    """Globals a torch.save file would import that weights_only loading does not allow (found by reading
    the pickle's opcodes, never by running it)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 — an unreadable file is refused, whatever the reason
        return [f"<unreadable: {err}>"]
    allowed = _allowed_global_names()
    return [name for name in found if name not in allowed]


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True (plus DeepSpeed's record classes); UnsafeCheckpoint otherwise."""
    import pickle

    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        names = unsafe_globals(Path(path)) or [str(err).splitlines()[0]]
        raise UnsafeCheckpoint(
            f"{path} holds pickled objects that only code could rebuild ({', '.join(names)}): refused, "
            "and nothing of it was run"
        ) from None


def check_no_code(checkpoint: Path) -> None:
    """Raise UnsafeCheckpoint if any pickle-based file of `checkpoint` needs a disallowed global to load."""
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES):
        names = unsafe_globals(path)
        if names:
            raise UnsafeCheckpoint(
                f"{path} holds pickled code or objects advcap never writes ({', '.join(names[:3])}): the checkpoint "
                "was changed after it was written. Refused; nothing of it was run. Remove that checkpoint folder to "
                "resume from an older one."
            )


def weights_only_checkpoint_engine(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoints with `safe_torch_load` (it would use weights_only=False),
    and write them through Python file objects (so that a full disk is an OSError)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise AdvcapError(
            f"DeepSpeed's checkpoint engine is {type(current).__name__}; advcap resumes only through DeepSpeed's "
            "torch checkpoint engine, which it can make refuse pickled code (remove the checkpoint engine setting)"
        )

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location=map_location)

        def save(self, state_dict: Any, path: str) -> None:
            with open(path, "wb") as f:  # a file object: a full disk is an OSError, not a RuntimeError
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)

    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    safe.__dict__.update(current.__dict__)  # the same settings (serialization format, name)
    engine.checkpoint_engine = safe


# ---------------------------------------------------------------- RNG states as JSON


def rng_state() -> dict:
    """This process's RNG states as plain JSON data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    encode = lambda t: base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")  # noqa: E731
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": encode(torch.get_rng_state()),
        "cuda": [encode(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    decode = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(decode(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


# ---------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Decides when to save, and saves/resumes the training state of one run.

    Every rank calls `save` and `resume` (they contain collectives); the folder's lifecycle is the run
    directory's (`RunDir.begin_checkpoint` / `commit_checkpoint`). Failures are agreed on by all ranks
    (`advcap.distributed.agree`), so no rank goes on while another has stopped.
    """

    def __init__(self, rundir: RunDir, every_steps: int, keep: int, accelerator: Any, model: Any, unwrapped: Any,
                 optimizer: Any, scheduler: Any):
        from accelerate.utils import DistributedType

        self.rundir, self.every_steps, self.keep = rundir, every_steps, keep
        self.accelerator, self.model, self.unwrapped = accelerator, model, unwrapped
        self.optimizer, self.scheduler = optimizer, scheduler
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.resumed_from: Optional[Path] = None
        if self.deepspeed:
            weights_only_checkpoint_engine(model)

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, state: TrainerState) -> Path:
        """Write and commit the checkpoint of `state.step` (all ranks). Returns the committed folder."""
        acc = self.accelerator
        tmp = agree("creating the checkpoint folder", lambda: self.rundir.begin_checkpoint(state.step), main_only=True)
        if self.deepspeed:
            # Collective inside DeepSpeed (barriers): a rank that fails here ends the job.
            self.model.save_checkpoint(str(tmp), tag=ZERO_TAG, client_state={}, save_latest=False)
        agree("writing the checkpoint", lambda: self._write_files(tmp, state))
        final = agree("committing the checkpoint",
                      lambda: self.rundir.commit_checkpoint(tmp, state.step, self.keep), main_only=True)
        if acc.is_main_process:
            log.info("checkpoint saved: %s", final)
        return final

    def _write_files(self, tmp: Path, state: TrainerState) -> None:
        from advcap import atomic

        acc = self.accelerator
        rng_file = tmp / RNG_DIR / f"rank{acc.process_index}.json"
        rng_file.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(rng_file, json.dumps(rng_state()))
        if not acc.is_main_process:
            return
        save_weights(self.unwrapped, tmp / MODEL_FILE)
        faults.point("checkpoint.mid_write", step=state.step)
        if not self.deepspeed:
            with _naming(tmp / OPTIMIZER_FILE), open(tmp / OPTIMIZER_FILE, "wb") as f:
                torch.save(self.optimizer.state_dict(), f)  # to a file object: a full disk is an OSError
        record = {**asdict(state), "scheduler": self.scheduler.state_dict(), "world_size": acc.num_processes}
        atomic.write_text(tmp / TRAINING_STATE, json.dumps(record, indent=1) + "\n")

    def resume(self, which: str) -> TrainerState:
        """Restore `which` ('latest': the newest valid checkpoint; or a checkpoint folder) into the model,
        optimizer, scheduler and RNG of every rank; return its state."""
        chosen = agree("choosing the checkpoint to resume from", lambda: self._choose(which), main_only=True)
        path = Path(chosen)
        if self.deepspeed:
            self.model.load_checkpoint(str(path), tag=ZERO_TAG, load_module_strict=True, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        state = agree("loading the checkpoint", lambda: self._load_files(path))
        self.resumed_from = path
        if self.accelerator.is_main_process:
            log.info("resumed from %s (step %d)", path, state.step)
        return state

    def _choose(self, which: str) -> Path:
        """The checkpoint to resume from (main process): validated, scanned for code; names what it passed over."""
        from advcap.rundir import validate_checkpoint

        if which == "latest":
            path, passed = self.rundir.latest_valid_checkpoint()
            for skipped in passed:
                log.warning("not resuming from %s", skipped)
            if path is None:
                if passed:
                    raise AdvcapError(
                        f"{self.rundir.checkpoints_dir} holds no valid checkpoint to resume from: "
                        + "; ".join(map(str, passed)) + ". Remove the damaged ones to start afresh."
                    )
                raise AdvcapError(f"--resume latest: no checkpoint in {self.rundir.checkpoints_dir}")
            if passed:
                log.warning("resuming from %s, the newest valid checkpoint", path.name)
        else:
            path = Path(which)
            problem = validate_checkpoint(path) if path.is_dir() else "not a folder"
            if problem is not None:
                raise AdvcapError(f"--resume {which}: not a valid advcap checkpoint ({problem})")
        check_no_code(path)
        return path

    def _load_files(self, path: Path) -> TrainerState:
        acc = self.accelerator
        record = json.loads((path / TRAINING_STATE).read_text())
        if record.get("world_size", acc.num_processes) != acc.num_processes:
            raise AdvcapError(
                f"{path} was written by {record['world_size']} ranks and this run has {acc.num_processes}: an exact "
                "resume needs the same world size (the data position and RNG states are per rank)"
            )
        rng_file = path / RNG_DIR / f"rank{acc.process_index}.json"
        if not self.deepspeed:
            load_checkpoint_weights(self.unwrapped, path)
            # (to the CPU first: load_state_dict moves the state to each parameter's device)
            self.optimizer.load_state_dict(safe_torch_load(path / OPTIMIZER_FILE, map_location="cpu"))
        self.scheduler.load_state_dict(record["scheduler"])
        set_rng_state(json.loads(rng_file.read_text()))
        return TrainerState.from_dict(record)


# ---------------------------------------------------------------- weights


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The model's state dict as safetensors, each tensor once. Tied weights (the same view twice: GPT-2's
    lm_head and token embedding) are saved under their first name; a parameter that is a view into a larger
    buffer (DeepSpeed's flat partitions) is copied out."""
    from safetensors.torch import save

    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    with _naming(path), open(path, "wb") as f:  # written by Python: a full disk is an OSError
        f.write(save(tensors))


@contextlib.contextmanager
def _naming(path: Path) -> Any:
    """An OSError from writing through a file object names no file: name `path`."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise



def load_checkpoint_weights(captioner: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load a training checkpoint's weights (`model.safetensors`, every engine) into `captioner`.

    Tied weights (GPT-2's lm_head is its token embedding) are saved once; every other key must match.
    """
    from safetensors.torch import load_file

    path = Path(checkpoint) / MODEL_FILE
    if not path.is_file():
        raise AdvcapError(f"{checkpoint} holds no weights ({MODEL_FILE} is missing): not an advcap checkpoint")
    device = next(captioner.parameters()).device
    state = load_file(str(path), device=str(device))
    missing, unexpected = captioner.load_state_dict(state, strict=False)
    params = dict(captioner.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if unexpected or untied:
        raise AdvcapError(
            f"{path} does not fit the run's exported model: missing {untied[:5]}, unexpected {list(unexpected)[:5]}"
        )


__all__ = ["Checkpointer", "TrainerState", "UnsafeCheckpoint", "check_no_code", "checkpoint_step",
           "load_checkpoint_weights", "safe_torch_load"]
