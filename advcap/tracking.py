"""Experiment trackers through Accelerate (`log.trackers`): scalars, hyperparameters, attack images, captions
and evaluation metrics go to every tracker the config names, from the main process only.

Every tracker is one of Accelerate's (`Accelerator(log_with=...)`, `init_trackers`, its tracker objects), so
whatever Accelerate supports, advcap can name. What goes where:

- **Scalars** (train/*, attack/*, data/*, val/*, eval/<split>/<condition>/<metric>) go to every tracker at the
  optimizer step they describe (evaluation: the run's final step). MLflow does not allow some characters in
  metric names: there they become "_" (`eval/test/fgsm@0.03/bleu4` → `eval/test/fgsm_0.03/bleu4`).
- **Hyperparameters**: the flattened config (`train.lr`, ...) plus the world size and batch split. TensorBoard
  gets them as an hparams session in the run's own event files (Accelerate's `store_init_configuration` would
  write them into a new sub-run per start, apart from the scalars); the other trackers through Accelerate's
  `store_init_configuration` (MLflow: run parameters).
- **The attack grid and the caption table**: TensorBoard (image and text summaries) and MLflow (artifacts
  `attack/stepNNNNNNNN.png`, `attack/captions_stepNNNNNNNN.md`); other trackers get none.

Files stay in the run directory (advcap.rundir owns the names): TensorBoard in `tensorboard/`; MLflow in a file
store `mlflow/` unless MLFLOW_TRACKING_URI is set; W&B's `wandb/`, DVCLive's `dvclive/` and Aim's `.aim/` there too.
Each start of training (a resume too) and each evaluation is a new MLflow run; TensorBoard's steps go on.
"""

from __future__ import annotations

import logging
import os
import re
from enum import Enum
from typing import Any, Optional, Sequence

from advcap.config import Config, config_to_dict
from advcap.errors import AdvcapError
from advcap.rundir import RunDir

log = logging.getLogger(__name__)

IMAGE_TAG = "attack/clean|adversarial|difference"
CAPTIONS_TAG = "attack/captions"
# pip packages of Accelerate's trackers (where the name differs from the tracker's or a lighter one does).
PACKAGES = {"mlflow": "mlflow-skinny (or mlflow)", "comet_ml": "comet-ml"}
# MLflow reads its tracking URI from this variable; a user's value wins over the run directory's file store.
MLFLOW_URI_VARIABLE = "MLFLOW_TRACKING_URI"
# MLflow 3 refuses its file store unless this is "true" (the store is in maintenance mode, and works).
MLFLOW_FILE_STORE_VARIABLE = "MLFLOW_ALLOW_FILE_STORE"
_MLFLOW_NAME = re.compile(r"[^/\w.\- ]")  # what MLflow's metric names may not contain


def check_trackers(names: Sequence[str]) -> None:
    """Raise AdvcapError naming every tracker that this Accelerate does not know or whose package is missing.

    Accelerate itself drops an uninstalled tracker with a debug message; a run that asked for it must say so
    before any work.
    """
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = {t.value for t in LoggerType} - {"all"}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdvcapError(f"log.trackers: {', '.join(map(repr, unknown))} not known to Accelerate; expected some of "
                          f"{' | '.join(sorted(known))}")
    available = {t.value for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        packages = " ".join(PACKAGES.get(n, n) for n in missing)
        what = "its package is" if len(missing) == 1 else "their packages are"
        raise AdvcapError(f"log.trackers names {', '.join(missing)}, but {what} not installed: "
                          f"pip install {packages} (or remove it from log.trackers)")


def log_with(names: Sequence[str], rundir: RunDir) -> list:
    """The `log_with` of the Accelerator of a run: tracker names, and TensorBoard's tracker itself, since it
    writes `<logging dir>/<project name>` and its folder is the run directory's `tensorboard/`."""
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker(rundir.tensorboard_dir.name, rundir.tensorboard_dir.parent) if n == "tensorboard"
            else n for n in names]


def hyperparameters(cfg: Config, extra: Optional[dict] = None) -> dict[str, Any]:
    """The flattened config (`train.lr`: 5e-05; lists as text) and `extra`, without None values."""
    values = {**_flat(config_to_dict(cfg)), **(extra or {})}
    return {k: v for k, v in values.items() if v is not None}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if v is None or isinstance(v, (int, float, str, bool)) else str(v)
    return out


class Trackers:
    """The trackers of one training start or one evaluation, on the Accelerator made with `log_with`.

    `start` opens them, `close` finishes them (idempotent; callers close in a `finally`). Every method is a
    no-op off the main process and before `start`.
    """

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.started = False
        self._environ: dict[str, Optional[str]] = {}  # variables set here, with their values before

    def start(self, rundir: RunDir, cfg: Config, run_name: str, extra: Optional[dict] = None,
              tensorboard_hparams: bool = True) -> None:
        """Open a run of each tracker named `run_name` (the experiment: `advcap-<run.dataset>`) and log the
        hyperparameters; TensorBoard's only with `tensorboard_hparams` (training, not evaluation)."""
        if not self.accelerator.is_main_process or not self.accelerator.log_with:
            return
        # log_with holds LoggerType members and tracker objects (TensorBoard's).
        names = {t.value if isinstance(t, Enum) else t.name for t in self.accelerator.log_with}
        if "mlflow" in names and MLFLOW_URI_VARIABLE not in os.environ:
            # MLflowTracker takes no URI: MLflow reads it from the environment, set while the trackers are open.
            self._set_env(MLFLOW_URI_VARIABLE, f"file:{rundir.mlflow_dir.resolve()}")
            self._set_env(MLFLOW_FILE_STORE_VARIABLE, "true")
        init_kwargs = {
            "mlflow": {"run_name": run_name},
            "wandb": {"dir": str(rundir.path), "name": run_name},
            "dvclive": {"dir": str(rundir.dvclive_dir)},
        }
        self.started = True
        self.accelerator.init_trackers(f"advcap-{cfg.run.dataset}", init_kwargs=init_kwargs)
        values = hyperparameters(cfg, extra)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                if tensorboard_hparams:
                    _tensorboard_hparams(tracker.writer, values)
            else:
                tracker.store_init_configuration(values)

    def scalars(self, step: int, values: dict[str, Optional[float]]) -> None:
        """Log the scalars that are not None at optimizer step `step` to every tracker."""
        if not self.started:
            return
        values = {k: v for k, v in values.items() if v is not None}
        # Accelerator.log hands all trackers one dict; MLflow's names need their own spelling, so each tracker
        # is called as Accelerator.log would call it.
        for tracker in self.accelerator.trackers:
            tracker.log(_mlflow_names(values) if tracker.name == "mlflow" else values, step=step)

    def attack_examples(self, step: int, clean: Any, adv: Any, epsilon: float,
                        captions: list[tuple[str, str, str]]) -> None:
        """The clean | adversarial | difference grid and a table of (reference, clean caption, adversarial
        caption), to TensorBoard and MLflow."""
        if not self.started:
            return
        from advcap.attack_images import attack_grid

        grid = attack_grid(clean, adv, epsilon)  # (3, H, W) in [0,1]
        rows = "\n".join(f"| {r} | {c} | {a} |" for r, c, a in captions)
        table = "| reference | clean | adversarial |\n|---|---|---|\n" + rows if captions else None
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(IMAGE_TAG, grid, step)
                if table:
                    tracker.writer.add_text(CAPTIONS_TAG, table, step)
                tracker.writer.flush()
            elif tracker.name == "mlflow":
                import mlflow

                pixels = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
                mlflow.log_image(pixels, artifact_file=f"attack/step{step:08d}.png")
                if table:
                    mlflow.log_text(table, f"attack/captions_step{step:08d}.md")

    def close(self) -> None:
        """Finish every tracker and restore the environment. Not Accelerator.end_training: that also destroys
        the process group, which the ranks still use (the ablation trains and evaluates run after run)."""
        if self.started:
            for tracker in self.accelerator.trackers:
                try:
                    tracker.finish()
                except Exception as err:  # noqa: BLE001 — closing runs in a finally: never hide the run's own error
                    log.warning("could not finish the %s tracker: %s", tracker.name, err)
        self.accelerator.trackers.clear()
        self.started = False
        for name, before in self._environ.items():
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before
        self._environ.clear()

    def _set_env(self, name: str, value: str) -> None:
        self._environ.setdefault(name, os.environ.get(name))
        os.environ[name] = value


def _mlflow_names(values: dict[str, Any]) -> dict[str, Any]:
    return {_MLFLOW_NAME.sub("_", k): v for k, v in values.items()}


def _tensorboard_hparams(writer: Any, values: dict[str, Any]) -> None:
    """An hparams session in the run's own event files, tied to train/clean_loss (the HPARAMS tab)."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(values, {"train/clean_loss": float("nan")}):
        writer.file_writer.add_summary(summary)
    writer.flush()
