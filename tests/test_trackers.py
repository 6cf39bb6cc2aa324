"""Experiment trackers through Accelerate (advcap.tracking): a real tiny run, stopped and resumed, then evaluated,
with log.trackers=[tensorboard, mlflow]; TensorBoard's event files and MLflow's file store are read back and must
hold the same scalars (steps and values), the hyperparameters, the attack images and the evaluation metrics.
An unknown tracker name and an uninstalled tracker are clear errors before any work."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_tiny_shards

from advcap.config import TRACKERS, load_config
from advcap.errors import AdvcapError
from advcap.evaluate import evaluate
from advcap.rundir import run_path
from advcap.tracking import MLFLOW_FILE_STORE_VARIABLE, MLFLOW_URI_VARIABLE
from advcap.train import FINISHED, STOPPED, train

S = 32
STEPS = 4
TRAIN_TAGS = ("train/clean_loss", "train/adversarial_loss", "train/lr", "train/grad_norm", "train/samples_per_s",
              "attack/epsilon", "attack/zero_input_grad_fraction", "train/nonfinite_steps", "data/bad_shard_reads",
              "data/bad_samples")
EVAL_CONDITIONS = ("clean", "fgsm@0.3")  # '@' is not allowed in MLflow's names: there it is fgsm_0.3


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model.preset=tiny", f"data.image_size={S}", "data.workers=0", f"train.steps={STEPS}",
        "train.global_batch_size=8", "train.warmup_steps=1", "train.log_every_steps=1",
        "train.image_log_every_steps=2", f"run.out={out}", f"data.shards={data / 'shards'}",
        f"data.tokenizer={data / 'tok'}", "eval.splits=[test]", f"eval.conditions=[{','.join(EVAL_CONDITIONS)}]",
        "eval.coco_metrics=false", "eval.audit=false", *extra,
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("trackers-data"))


@pytest.fixture(scope="module")
def tracked(data, tmp_path_factory) -> SimpleNamespace:
    """adv_train with both trackers: 2 steps, a stop, a resume to 4 steps, then an evaluation; run from an empty
    working directory, which must stay empty."""
    out = tmp_path_factory.mktemp("trackers-runs")
    cwd = tmp_path_factory.mktemp("trackers-cwd")
    cfg = load_config("adv_train", overrides(data, out, "log.trackers=[tensorboard,mlflow]"))
    saved = {name: os.environ.pop(name, None) for name in (MLFLOW_URI_VARIABLE, MLFLOW_FILE_STORE_VARIABLE)}
    before = Path.cwd()
    os.chdir(cwd)
    try:
        assert train(cfg, stop_at_step=2) == STOPPED
        assert train(cfg, resume="latest") == FINISHED
        evaluate(run_path(cfg))
        environ_after = {name: os.environ.get(name) for name in saved}
    finally:
        os.chdir(before)
        for name, value in saved.items():
            if value is not None:
                os.environ[name] = value
    return SimpleNamespace(cfg=cfg, run=run_path(cfg), cwd=cwd, environ_after=environ_after)


def tensorboard(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_scalars(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def mlflow_runs(tracked):
    """(client, [training runs, oldest first], evaluation run) of the run directory's MLflow file store."""
    from mlflow import MlflowClient

    before = os.environ.get(MLFLOW_FILE_STORE_VARIABLE)
    os.environ[MLFLOW_FILE_STORE_VARIABLE] = "true"  # a reader of MLflow 3's file store must opt in too
    try:
        client = MlflowClient(f"file:{tracked.run / 'mlflow'}")
        (experiment,) = [e for e in client.search_experiments() if e.name == "advcap-demo"]
        runs = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)
        names = [r.info.run_name for r in runs]
        assert names == ["adv_train-seed0", "adv_train-seed0", "adv_train-seed0-eval"]
        yield client, runs[:2], runs[2]
    finally:
        if before is None:
            os.environ.pop(MLFLOW_FILE_STORE_VARIABLE, None)
        else:
            os.environ[MLFLOW_FILE_STORE_VARIABLE] = before


def test_both_trackers_hold_the_same_training_scalars(tracked, mlflow_runs):
    client, training, _ = mlflow_runs
    tb = tb_scalars(tensorboard(tracked.run))
    for tag in TRAIN_TAGS:
        assert [step for step, _ in tb[tag]] == list(range(1, STEPS + 1)), tag  # the resume neither repeats nor skips
        # The first start logged steps 1-2, the resumed one 3-4: each start is an MLflow run of its own.
        per_run = [[(m.step, m.value) for m in client.get_metric_history(r.info.run_id, tag)] for r in training]
        assert [[s for s, _ in h] for h in per_run] == [[1, 2], [3, 4]], tag
        mlflow_values = [v for _, v in sorted(per_run[0] + per_run[1])]
        assert mlflow_values == pytest.approx([v for _, v in tb[tag]], rel=1e-6, abs=1e-12), tag  # TB holds float32
    assert all(status == "FINISHED" for status in (r.info.status for r in training))


def test_both_trackers_hold_the_hyperparameters(tracked, mlflow_runs):
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, training, _ = mlflow_runs
    content = tensorboard(tracked.run).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    tb = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert tb["train.mode"].string_value == "mixed" and tb["attack.epsilon"].number_value == pytest.approx(0.05)
    assert tb["world_size"].number_value == 1 and tb["log.trackers"].string_value == "['tensorboard', 'mlflow']"
    for run in training:
        params = run.data.params
        assert params["train.mode"] == "mixed" and float(params["attack.epsilon"]) == pytest.approx(0.05)
        assert params["world_size"] == "1" and params["log.trackers"] == "['tensorboard', 'mlflow']"
        assert params["train.steps"] == str(STEPS) and params["run.phase"] == "adv_train"
        assert "data.tokenizer" in params  # and a None (model.encoder) is left out rather than logged as text
        assert "model.encoder" not in params and "model.encoder" not in tb


def test_both_trackers_hold_the_evaluation_metrics(tracked, mlflow_runs):
    client, _, evaluation = mlflow_runs
    metrics = json.loads((tracked.run / "metrics.json").read_text())["metrics"]["test"]
    acc = tensorboard(tracked.run)
    for condition in EVAL_CONDITIONS:
        for n in range(1, 5):
            expected = metrics[condition][f"bleu{n}"]
            (event,) = acc.Scalars(f"eval/test/{condition}/bleu{n}")
            assert (event.step, event.value) == (STEPS, pytest.approx(expected, abs=1e-6))
            name = f"eval/test/{condition.replace('@', '_')}/bleu{n}"
            (metric,) = client.get_metric_history(evaluation.info.run_id, name)
            assert (metric.step, metric.value) == (STEPS, pytest.approx(expected, abs=1e-12))
    # The evaluation's MLflow run carries the run's config.
    assert evaluation.data.params["train.mode"] == "mixed" and evaluation.data.params["eval.splits"] == "['test']"


def test_attack_images_and_captions_reach_both_trackers(tracked, mlflow_runs):
    from PIL import Image

    acc = tensorboard(tracked.run)
    images = acc.Images("attack/clean|adversarial|difference")
    assert [e.step for e in images] == [2, 4] and (images[0].height, images[0].width) == (4 * S, 3 * S)
    assert [e.step for e in acc.Tensors("attack/captions/text_summary")] == [2, 4]

    client, training, _ = mlflow_runs
    for run, step in zip(training, (2, 4)):
        files = sorted(a.path for a in client.list_artifacts(run.info.run_id, "attack"))
        assert files == [f"attack/captions_step{step:08d}.md", f"attack/step{step:08d}.png"]
        local = Path(client.download_artifacts(run.info.run_id, f"attack/step{step:08d}.png"))
        assert Image.open(local).size == (3 * S, 4 * S)
        table = Path(client.download_artifacts(run.info.run_id, f"attack/captions_step{step:08d}.md")).read_text()
        assert table.startswith("| reference | clean | adversarial |") and table.count("\n") >= 3


def test_tracker_files_stay_in_the_run_directory(tracked):
    assert list(tracked.cwd.iterdir()) == []  # no mlruns/, mlflow.db, wandb/ ... in the working directory
    assert (tracked.run / "tensorboard").is_dir() and (tracked.run / "mlflow").is_dir()
    assert {p.name for p in (tracked.run / "tensorboard").iterdir() if p.is_dir()} == set()  # no sub-runs
    # The run directory's file store is chosen while the trackers are open, and the environment restored after.
    assert tracked.environ_after == {MLFLOW_URI_VARIABLE: None, MLFLOW_FILE_STORE_VARIABLE: None}


def test_the_tracker_names_are_accelerates():
    from accelerate.utils import LoggerType

    assert sorted(TRACKERS) == sorted(t.value for t in LoggerType if t.value != "all")


def test_an_unknown_tracker_is_named(data, tmp_path):
    with pytest.raises(AdvcapError, match=r"log.trackers\[1\]: 'tensorbord' is not allowed; expected one of "
                                          r"tensorboard \| wandb \| mlflow"):
        load_config("baseline", overrides(data, tmp_path, "log.trackers=[mlflow,tensorbord]"))


def test_an_uninstalled_tracker_is_named_before_any_work(data, tmp_path):
    missing = next(n for n in ("aim", "clearml", "comet_ml", "dvclive") if importlib.util.find_spec(n) is None)
    cfg = load_config("baseline", overrides(data, tmp_path, f"log.trackers=[tensorboard,{missing}]"))
    with pytest.raises(AdvcapError, match=f"log.trackers names {missing}, but its package is not installed: "
                                          f"pip install {missing.replace('_', '-')}"):
        train(cfg)
    assert not (tmp_path / "demo").exists()  # no run directory: nothing was started
