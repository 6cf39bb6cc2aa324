"""The run directory `runs/<dataset>/<phase>/seed<k>/`: a small transactional store with one owner.

This module is the only one that builds a run path or knows its file names. Its rules:

- **One writer at a time.** A process that writes a run directory holds `lock()`: an `flock` on
  `.lock`, which records the holder (host, pid, SLURM job, start time). A second writer is refused
  at once, naming the holder. The kernel releases the lock when the holder dies, so a killed or
  requeued task never blocks the one that follows it (on a shared file system: when that file
  system's lock manager releases it; see the README for file systems without `flock`).
- **Every file written atomically** (advcap.atomic: temp file, fsync, rename, fsync the folder).
- **Checkpoints commit like a journal.** A checkpoint is written into `checkpoints/.tmp-stepN`, then
  `checkpoint.json` (every file with its size and sha256) is written last, then the folder is renamed
  to `stepN`. Re-saving a step moves the old folder to `.old-stepN` first and removes it only after the
  new one is in place. `recover()` (run at start, under the lock) finishes or undoes whatever a kill
  interrupted, so there is never a moment without a valid checkpoint of a step that had one. A
  checkpoint is valid only if its manifest is present and every file matches it; resume takes the
  newest valid one and names the ones it passed over. Older checkpoints are pruned only after a newer
  one is valid.
- **Results answer to their settings.** `metrics.json` is one record: the metrics together with the
  evaluation settings, image counts and model digests they answer to, written after the predictions,
  as the last file of an evaluation.
- **Nothing read from here executes code**: JSON, YAML through the config schema, safetensors, and
  `torch.load(weights_only=True)` in `advcap.checkpoint`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from advcap import atomic
from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
PROVENANCE = "provenance.json"
PARAMETERS = "parameters.json"
TRAINING_STATE = "trainer_state.json"  # the run's own (finished flag); each checkpoint has one too
METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
COCO_FILES = "coco"  # the captions in the COCO results format, per split and condition
BEST_CHECKPOINT = "best"  # checkpoints/best: kept by validation (advcap.validation), outside the rotation
EXPORT = "hf"
TENSORBOARD = "tensorboard"
MLFLOW = "mlflow"  # MLflow's file store, when advcap picks the tracking URI (advcap.tracking)
DVCLIVE = "dvclive"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
CHECKPOINT_MANIFEST = "checkpoint.json"
LOCK_VARIABLE = "ADVCAP_RUN_LOCK"  # "none": run without the lock (a file system without flock; see README)

_COMMITTED = re.compile(r"step(\d{8})")
_PENDING, _REPLACED = ".tmp-", ".old-"
_HASH_BLOCK = 1 << 20


def run_path(cfg: Any) -> Path:
    """`<run.out>/<run.dataset>/<run.phase>/seed<train.seed>` of a config (not created)."""
    return Path(cfg.run.out) / cfg.run.dataset / cfg.run.phase / f"seed{cfg.train.seed}"


def checkpoint_name(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_step(path: Path) -> int:
    match = _COMMITTED.fullmatch(Path(path).name.removeprefix(_PENDING).removeprefix(_REPLACED))
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder name")
    return int(match[1])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class RunDirBusy(AdvcapError):
    """Another process holds the run directory."""


@dataclass(frozen=True)
class PassedOver:
    """A checkpoint that resume did not take, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path.name}: {self.reason}"


# Locks this process holds: realpath of the lock file → [fd, depth]. flock is per open file, so a second
# open in the same process would refuse its own holder; nested users (the ablation holds the run across
# training and evaluation) share the first one.
_held: dict[str, list[int]] = {}


class RunDir:
    """One run directory: its paths, its files, its lock and its checkpoints."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @classmethod
    def of(cls, cfg: Any) -> "RunDir":
        return cls(run_path(cfg))

    @classmethod
    def discover(cls, root: str | os.PathLike[str]) -> list["RunDir"]:
        """The run directories `root/<phase>/seed<k>/` that hold a config.yaml, sorted."""
        return [cls(p.parent) for p in sorted(Path(root).glob(f"*/seed*/{CONFIG}"))]

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ paths

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def mlflow_dir(self) -> Path:
        return self.path / MLFLOW

    @property
    def dvclive_dir(self) -> Path:
        return self.path / DVCLIVE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def predictions_file(self) -> Path:
        return self.path / PREDICTIONS

    # ------------------------------------------------------------ reading

    def exists(self) -> bool:
        return self.config_file.is_file()

    def config(self) -> Any:
        """The resolved config (advcap.config.Config) stored here, or None."""
        from advcap.config import load_config

        return load_config(self.config_file) if self.config_file.is_file() else None

    def conflicts_with(self, cfg: Any, ignore: Sequence[str] = ("eval",)) -> list[str]:
        """Keys in which the stored config differs from `cfg` (outside `ignore`); [] if none is stored."""
        from advcap.config import diff_configs

        stored = self.config()
        return [] if stored is None else diff_configs(stored, cfg, ignore=tuple(ignore))

    def _json(self, name: str) -> Optional[dict]:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AdvcapError(f"{path} is unreadable ({err}); remove it and run again") from None
        if not isinstance(data, dict):
            raise AdvcapError(f"{path} must hold a JSON object, not {type(data).__name__}")
        return data

    def training_state(self) -> dict:
        """The run's trainer_state.json ({} before training finished)."""
        return self._json(TRAINING_STATE) or {}

    def training_finished(self) -> bool:
        """Training finished: the final state says so and the hf/ export is there."""
        return bool(self.training_state().get("finished")) and (self.export_dir / "config.json").is_file()

    def provenance(self) -> Optional[dict]:
        return self._json(PROVENANCE)

    def parameters(self) -> Optional[dict]:
        return self._json(PARAMETERS)

    def evaluation(self) -> Optional[dict]:
        """The evaluation record (metrics.json), or None. A record without its parts is an error."""
        record = self._json(METRICS)
        if record is None:
            return None
        missing = [k for k in ("metrics", "settings", "images") if not isinstance(record.get(k), dict)]
        if missing:
            raise AdvcapError(
                f"{self.metrics_file} is not an advcap evaluation record (no {', '.join(missing)}): it was written by "
                "an older advcap or by hand; evaluate the run again (advcap eval)"
            )
        return record

    def predictions(self, record: Mapping[str, Any]) -> Optional[list[dict]]:
        """The captions of the evaluation `record` answers for (predictions.jsonl, one dict per image), or None
        when the file is missing, unreadable or not the one the record names (its sha256)."""
        try:
            data = self.predictions_file.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != record.get("predictions_sha256"):  # the bytes written, exactly
            return None
        try:
            lines = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        except ValueError:  # UnicodeDecodeError is one
            return None
        return lines if all(isinstance(line, dict) for line in lines) else None

    def evaluation_problem(self, cfg: Any) -> Optional[str]:
        """None if metrics.json answers to `cfg`'s eval settings and to the current model(s); else why not."""
        from advcap.config import config_to_dict, diff_configs

        try:
            record = self.evaluation()
        except AdvcapError as err:
            return str(err)
        if record is None:
            return "not evaluated yet"
        wanted = config_to_dict(cfg)["eval"]
        if record["settings"] != wanted:
            diffs = diff_configs({"eval": record["settings"]}, {"eval": wanted}, ignore=())
            return f"new eval settings ({'; '.join(diffs)})"
        if record.get("model_sha256") != self.model_digest():
            return "the model changed since its evaluation"
        source = cfg.eval.transfer_from
        if source and "transfer-fgsm" in cfg.eval.conditions and record.get("transfer_model_sha256") != RunDir(source).model_digest():
            return f"the transfer source {source} changed since the evaluation"
        if record.get("partial") and not cfg.eval.allow_partial:
            return "its evaluation was partial"
        return None

    def model_digest(self) -> Optional[str]:
        """The digest of the final weights that training recorded (provenance), or None."""
        return (self.provenance() or {}).get("weights_sha256")

    # ------------------------------------------------------------ writing (atomic; callers hold the lock)

    def write_config(self, cfg: Any) -> None:
        from advcap.config import save_config

        save_config(cfg, self.config_file)

    def record_eval_settings(self, cfg: Any) -> bool:
        """After an evaluation with other eval settings than training's: write `cfg` (which differs from the
        stored config in `eval` only) as config.yaml, so it states what the metrics answer to. True if written."""
        if self.conflicts_with(cfg, ignore=("eval",)):
            raise ValueError(f"{self}: only eval settings may change after training")
        if self.config() == cfg:
            return False
        self.write_config(cfg)
        log.info("%s: config.yaml now holds the eval settings of its metrics", self)
        return True

    def write_json(self, name: str, data: dict) -> None:
        if name not in (PROVENANCE, PARAMETERS, TRAINING_STATE):
            raise ValueError(f"{name} is not a run-level JSON file")
        atomic.write_text(self.path / name, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")

    def write_evaluation(self, predictions: str, record: dict, coco_files: Optional[dict[str, str]] = None) -> None:
        """The COCO-format files (`coco/`, replaced whole: {path under coco/: text}), the predictions, then the
        record that answers for them (which names the predictions' sha256), last."""
        from advcap import faults

        if coco_files is not None:
            def fill(folder: Path) -> None:
                for name, text in coco_files.items():
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_text(text, encoding="utf-8")

            atomic.replace_dir(self.path / COCO_FILES, fill)
        atomic.write_text(self.predictions_file, predictions)
        faults.point("eval.after_predictions")
        record = {**record, "predictions_sha256": hashlib.sha256(predictions.encode("utf-8")).hexdigest()}
        atomic.write_text(self.metrics_file, json.dumps(record, indent=1) + "\n")

    def replace_dir(self, name: str, write: Any) -> Path:
        """Replace the subfolder `name` (e.g. the hf/ export) whole (advcap.atomic.replace_dir)."""
        return atomic.replace_dir(self.path / name, write)

    # ------------------------------------------------------------ the lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for writing (re-entrant within a process). Raises RunDirBusy naming the
        holder if another process holds it."""
        lock_file = self.path / LOCK
        self.path.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(lock_file)
        if key in _held:
            _held[key][1] += 1
            try:
                yield
            finally:
                _held[key][1] -= 1
            return
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(
                f"{self.path} is in use by another advcap process ({holder}): a run directory has one writer at a "
                "time. Wait for that process to end or cancel it; a holder that dies releases it by itself."
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if os.environ.get(LOCK_VARIABLE) != "none":
                raise AdvcapError(
                    f"cannot lock {lock_file}: the file system does not support flock ({os.strerror(err.errno)}). "
                    f"Put runs on a file system that does (NFS with a lock manager, Lustre mounted with -o flock), "
                    f"or set {LOCK_VARIABLE}=none and make sure yourself that one process writes each run"
                ) from None
            log.warning("%s: running without the run-directory lock (%s=none)", self.path, LOCK_VARIABLE)
            yield
            return
        _write_holder(fd)
        _held[key] = [fd, 1]
        try:
            yield
        finally:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                del _held[key]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the run directory for this job (all ranks call it): the main process takes the lock, and every
        rank agrees on the outcome, so a refused job stops on all ranks at once."""
        from advcap.distributed import agree

        with contextlib.ExitStack() as stack:
            agree(f"taking the run directory {self.path}", lambda: stack.enter_context(self.lock()), main_only=True)
            yield

    # ------------------------------------------------------------ checkpoints

    def checkpoint_dirs(self) -> list[Path]:
        """Committed checkpoint folders `stepNNNNNNNN`, oldest first (valid or not)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.iterdir() if _COMMITTED.fullmatch(p.name) and p.is_dir())

    def has_checkpoints(self) -> bool:
        """Any checkpoint, committed or interrupted in its commit (recover() turns the latter into one)."""
        if not self.checkpoints_dir.is_dir():
            return False
        return any(_COMMITTED.fullmatch(p.name.removeprefix(_PENDING).removeprefix(_REPLACED))
                   for p in self.checkpoints_dir.iterdir())

    def recover(self) -> list[str]:
        """Finish or undo checkpoint commits a kill interrupted, and remove stale temporaries (main process,
        under the lock, before training starts). Returns what was done, for the log."""
        done = [f"removed the temporary file {p.name}" for p in atomic.remove_stale_temporaries(self.path)]
        # Folders replaced whole (the export, the COCO files, checkpoints/best): a kill between the two renames.
        for folder in (self.export_dir, self.path / COCO_FILES, self.checkpoints_dir / BEST_CHECKPOINT):
            if atomic.recover_dir(folder):
                done.append(f"restored {folder.name}/ (its replacement was interrupted)")
        root = self.checkpoints_dir
        if not root.is_dir():
            return done
        for old in sorted(root.glob(f"{_REPLACED}step*")):
            final = root / old.name.removeprefix(_REPLACED)
            pending = root / f"{_PENDING}{final.name}"
            if final.is_dir():
                shutil.rmtree(old)
                done.append(f"removed {old.name} (replaced by a newer save of the same step)")
            elif pending.is_dir() and validate_checkpoint(pending) is None:
                pending.rename(final)
                shutil.rmtree(old)
                done.append(f"completed the interrupted re-save of {final.name}")
            else:
                old.rename(final)
                done.append(f"restored {final.name} (its re-save was interrupted)")
        for pending in sorted(root.glob(f"{_PENDING}step*")):
            final = root / pending.name.removeprefix(_PENDING)
            if not final.exists() and validate_checkpoint(pending) is None:
                pending.rename(final)
                done.append(f"completed the interrupted commit of {final.name}")
            else:
                shutil.rmtree(pending)
                done.append(f"removed the incomplete {pending.name}")
        if done:
            atomic.fsync_dir(root)
        return done

    def begin_checkpoint(self, step: int) -> Path:
        """A fresh, empty folder for the checkpoint of `step` (main process; every rank then writes into it)."""
        tmp = self.checkpoints_dir / f"{_PENDING}{checkpoint_name(step)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, tmp: Path, step: int, keep: int) -> Path:
        """Make the checkpoint written into `tmp` the committed `stepN` (main process, after every rank
        finished writing), then prune to the newest `keep` valid ones."""
        from advcap import faults

        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            atomic.fsync_file(path)
            files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        faults.point("checkpoint.files_written", step=step)
        manifest = {"format": 1, "step": step, "files": files, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic.write_text(tmp / CHECKPOINT_MANIFEST, json.dumps(manifest, indent=1) + "\n")
        for folder in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):
            atomic.fsync_dir(folder)
        faults.point("checkpoint.before_commit", step=step)
        final = self.checkpoints_dir / checkpoint_name(step)
        old = self.checkpoints_dir / f"{_REPLACED}{final.name}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            faults.point("checkpoint.replacing", step=step)
        tmp.rename(final)
        atomic.fsync_dir(self.checkpoints_dir)
        shutil.rmtree(old, ignore_errors=True)
        self._prune(keep)
        return final

    def _prune(self, keep: int) -> None:
        """Remove all but the newest `keep` committed checkpoints (and incomplete ones older than those). The
        newest was checked as it was committed, so a valid one always remains; the others are not hashed again
        (re-reading gigabytes at every save), only required to have their manifest."""
        valid = [p for p in reversed(self.checkpoint_dirs()) if (p / CHECKPOINT_MANIFEST).is_file()]
        if len(valid) <= keep:
            return
        oldest_kept = valid[keep - 1].name
        for path in self.checkpoint_dirs():
            if path.name < oldest_kept:
                shutil.rmtree(path, ignore_errors=True)

    def latest_valid_checkpoint(self) -> tuple[Optional[Path], list[PassedOver]]:
        """(the newest committed checkpoint that validates, the newer ones passed over with the reason)."""
        passed = []
        for path in reversed(self.checkpoint_dirs()):
            problem = validate_checkpoint(path)
            if problem is None:
                return path, passed
            passed.append(PassedOver(path, problem))
        return None, passed

    def valid_checkpoints(self) -> tuple[list[Path], list[PassedOver]]:
        """(every committed checkpoint that validates, oldest first; the others with the reason)."""
        valid, passed = [], []
        for path in self.checkpoint_dirs():
            problem = validate_checkpoint(path)
            (valid.append(path) if problem is None else passed.append(PassedOver(path, problem)))
        return valid, passed


def validate_checkpoint(path: Path) -> Optional[str]:
    """None if the checkpoint folder is complete and matches its manifest, else what is wrong."""
    manifest_path = Path(path) / CHECKPOINT_MANIFEST
    if not manifest_path.is_file():
        return f"no {CHECKPOINT_MANIFEST} (incomplete, or written by an older advcap)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        expected = {name: (int(f["bytes"]), str(f["sha256"])) for name, f in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{CHECKPOINT_MANIFEST} is unreadable ({err})"
    if TRAINING_STATE not in expected:
        return f"{CHECKPOINT_MANIFEST} lists no {TRAINING_STATE}"
    for name, (size, digest) in expected.items():
        file = Path(path) / name
        if ".." in Path(name).parts or not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, its manifest says {size} (truncated or changed)"
        if sha256_file(file) != digest:
            return f"{name} does not match its sha256 in {CHECKPOINT_MANIFEST} (damaged or changed)"
    return None


def _write_holder(fd: int) -> None:
    from advcap.distributed import slurm_job_id

    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": slurm_job_id(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    data = (json.dumps(holder) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        parts = [f"host {holder['host']}", f"pid {holder['pid']}"]
        if holder.get("slurm_job_id"):
            parts.append(f"SLURM job {holder['slurm_job_id']}")
        parts.append(f"since {holder['since']}")
        return ", ".join(parts)
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
