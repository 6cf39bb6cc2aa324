"""End-to-end training (advcap.train) on tiny shards written by the test: every shipped phase, the run directory's
files, bit-identical resume, re-runs, NaN steps, TensorBoard events read back, and real launches: 2 gloo ranks
under `accelerate launch`, `advcap train --stop-at-step`, SIGUSR1 then `--resume latest`."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import caption, http_server, make_karpathy
from safetensors.torch import load_file

from advcap.config import load_config, shipped_configs
from advcap.rundir import run_path
from advcap.data.manifest import load_manifest
from advcap.errors import AdvcapError
from advcap.freeze import parameter_group
from advcap.model import Captioner, build_captioner
from advcap.tokenizer import load_tokenizer, train_tokenizer
from advcap.train import EXIT_STOPPED, FINISHED, STOPPED, train, weights_digest

S = 32
PHASES = ["baseline", "adversarial", "adv_train", "freeze_vit", "freeze_gpt", "freeze_gpt_xattn"]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's console scripts: advcap, accelerate


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """Tiny shards (36 train samples in 5 shards: 4 batches of 8 per epoch) and a tokenizer directory."""
    from advcap.data.shardwriter import convert

    root = tmp_path_factory.mktemp("train-data")
    annotations, images = make_karpathy(root / "src", 60)
    convert("karpathy", annotations, images, root / "shards", shard_size=8)
    rng = random.Random(0)
    train_tokenizer([caption(rng) for _ in range(300)], root / "tokenizer", 300)
    return SimpleNamespace(shards=root / "shards", tokenizer=root / "tokenizer")


def overrides(data, out: Path, *extra: str) -> list[str]:
    return [
        "model.preset=tiny", f"data.image_size={S}", "data.workers=0", "train.steps=4", "train.global_batch_size=8",
        "train.warmup_steps=1", "train.log_every_steps=1", f"run.out={out}", f"data.shards={data.shards}",
        f"data.tokenizer={data.tokenizer}", *extra,
    ]


def config(name: str, data, out: Path, *extra: str):
    return load_config(name, overrides(data, out, *extra))


def exported_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "hf" / "model.safetensors"))


def load_export(out: Path):
    """The run's hf/ export through VisionEncoderDecoderModel.from_pretrained."""
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(str(out / "hf"))
    # The run's ViT has no pooler (unused, and unused parameters break DDP), but the exported config cannot say
    # so: from_pretrained adds a freshly initialised one. Drop it to compare with what was trained.
    model.encoder.pooler = None
    return model


def fresh_captioner(cfg) -> Captioner:
    """The initialisation train() starts from: set_seed(seed), then build_captioner."""
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    return build_captioner(cfg.model, cfg.data.image_size, load_tokenizer(cfg.data.tokenizer))


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------- every shipped phase


def test_the_phases_tested_here_are_the_shipped_ones():
    assert sorted(PHASES) == sorted(n for n in shipped_configs() if n != "base")


# Which parameters each phase trains, by the VisionEncoderDecoderModel's own names.
TRAINED = {
    "baseline": lambda name: True,
    "adversarial": lambda name: True,
    "adv_train": lambda name: True,
    "freeze_vit": lambda name: parameter_group(name) != "encoder",
    "freeze_gpt": lambda name: parameter_group(name) == "encoder",
    "freeze_gpt_xattn": lambda name: parameter_group(name) in ("encoder", "cross_attention"),
}


@pytest.mark.parametrize("phase", PHASES)
def test_each_phase_trains_and_writes_its_run_directory(data, tmp_path, phase):
    cfg = config(phase, data, tmp_path)
    assert train(cfg) == FINISHED
    out = run_path(cfg)
    assert out == tmp_path / "demo" / phase / "seed0"

    assert load_config(out / "config.yaml") == cfg
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["finished"] and state["nonfinite_steps"] == 0
    assert (out / "checkpoints" / "step00000004" / "trainer_state.json").is_file()

    loaded = load_export(out)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["world_size"] == 1 and prov["global_batch_size"] == 8 and prov["per_rank_batch_size"] == 8
    assert "git_commit" in prov
    assert prov["packages"]["torch"] == torch.__version__ and prov["packages"]["transformers"]
    assert prov["shard_manifest_sha256"] == load_manifest(data.shards).sha256()
    assert prov["wall_time_s"] > 0 and prov["train_samples_per_s"] > 0
    # The digest is that of the exported weights.
    assert prov["weights_sha256"] == weights_digest(Captioner(loaded, S))

    # Frozen parameters are bit-identical to the initialisation, trained ones moved.
    initial = fresh_captioner(cfg).model.state_dict()
    final = loaded.state_dict()
    trained_names, frozen_names = [], []
    for name, param in loaded.named_parameters():
        (trained_names if TRAINED[phase](name) else frozen_names).append(name)
        if TRAINED[phase](name):
            assert not torch.equal(final[name], initial[name]), f"{phase}: trainable {name} did not change"
        else:
            assert torch.equal(final[name], initial[name]), f"{phase}: frozen {name} changed"
    assert trained_names
    assert bool(frozen_names) == phase.startswith("freeze")
    # parameters.json counts what was trained.
    counts = json.loads((out / "parameters.json").read_text())
    numel = dict(loaded.named_parameters())
    assert counts["total"]["trainable"] == sum(numel[n].numel() for n in trained_names)
    assert counts["total"]["frozen"] == sum(numel[n].numel() for n in frozen_names)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stopped_and_resumed_run_ends_bit_identical(data, tmp_path, workers):
    # mixed mode with dropout 0.1: the dropout RNG must be restored too. 4 batches per epoch: the stop at
    # step 3 is mid-epoch and the run crosses an epoch boundary.
    extra = ("train.steps=6", f"data.workers={workers}", "model.dropout=0.1", "train.seed=1")
    straight = config("adv_train", data, tmp_path / "a", *extra)
    assert straight.train.mode == "mixed"
    assert train(straight) == FINISHED

    stopped = config("adv_train", data, tmp_path / "b", *extra)
    assert train(stopped, stop_at_step=3) == STOPPED
    out = run_path(stopped)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step00000003"]
    assert not (out / "hf").exists()
    assert train(stopped, resume="latest") == FINISHED

    a, b = exported_state(run_path(straight)), exported_state(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state_a = json.loads((run_path(straight) / "trainer_state.json").read_text())
    state_b = json.loads((out / "trainer_state.json").read_text())
    assert state_a == state_b
    assert json.loads((out / "provenance.json").read_text())["resumed_at_step"] == 3


def test_shards_over_http_train_and_resume_as_local_ones_do(data, tmp_path):
    # The same shards served by a real HTTP server: the data order, the stop and the resume are those of
    # the local run, so the final weights are equal.
    extra = ("train.steps=6", "model.dropout=0.1", "train.seed=1")
    straight = config("adv_train", data, tmp_path / "a", *extra)
    assert train(straight) == FINISHED
    with http_server(data.shards.parent) as base:
        remote = config("adv_train", data, tmp_path / "b", *extra, f"data.shards={base}/shards/")
        assert train(remote, stop_at_step=3) == STOPPED
        assert train(remote, resume="latest") == FINISHED
    a, b = exported_state(run_path(straight)), exported_state(run_path(remote))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    provenance = json.loads((run_path(remote) / "provenance.json").read_text())
    assert provenance["shard_manifest_sha256"] == load_manifest(data.shards).sha256()


# ---------------------------------------------------------------- re-runs


def test_rerunning_a_finished_run_does_nothing(data, tmp_path, monkeypatch):
    cfg = config("baseline", data, tmp_path, "train.steps=2")
    assert train(cfg) == FINISHED
    out = run_path(cfg)
    files = lambda: {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = files()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr("advcap.train.train_micro_step", must_not_run)
    assert train(cfg) == FINISHED
    assert files() == before  # (the lock file records each holder)

    # Other eval settings: the same trained run (nothing retrained). config.yaml keeps the settings its metrics
    # answer to: only an evaluation with the new ones changes it, once its metrics are written.
    assert train(config("baseline", data, tmp_path, "train.steps=2", "eval.pgd_steps=3")) == FINISHED
    assert files() == before


def test_a_run_directory_with_another_config_is_an_error(data, tmp_path):
    cfg = config("baseline", data, tmp_path, "train.steps=2")
    assert train(cfg) == FINISHED
    other = config("baseline", data, tmp_path, "train.steps=2", "train.lr=1e-3")
    assert run_path(other) == run_path(cfg)
    with pytest.raises(AdvcapError, match=r"train\.lr"):
        train(other)


def test_checkpoints_without_resume_are_an_error(data, tmp_path):
    cfg = config("baseline", data, tmp_path)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    assert train(cfg, stop_at_step=2) == STOPPED
    # The stop handlers are the run's only: the caller gets its own back.
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    with pytest.raises(AdvcapError, match="--resume latest"):
        train(cfg)
    assert train(cfg, resume="latest") == FINISHED


def test_resume_latest_without_a_checkpoint_is_an_error(data, tmp_path):
    with pytest.raises(AdvcapError, match="no checkpoint"):
        train(config("baseline", data, tmp_path), resume="latest")


# ---------------------------------------------------------------- non-finite losses


class NanOnSteps:
    """Makes the captioner's loss NaN on chosen optimizer steps (one micro-batch per step here) and records
    the weights before every step."""

    def __init__(self, monkeypatch, nan_steps):
        import advcap.train

        self.nan_steps, self.step, self.weights = set(nan_steps), -1, []
        real_step, real_forward = advcap.train.train_micro_step, Captioner.forward

        def step(model, attack_model, *args, **kwargs):
            self.step += 1
            self.weights.append({n: p.detach().clone() for n, p in attack_model.named_parameters()})
            return real_step(model, attack_model, *args, **kwargs)

        def forward(captioner, pixels, labels):
            loss = real_forward(captioner, pixels, labels)
            return loss * float("nan") if self.step in self.nan_steps else loss

        monkeypatch.setattr(advcap.train, "train_micro_step", step)
        monkeypatch.setattr(Captioner, "forward", forward)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_step_is_skipped_and_counted(data, tmp_path, monkeypatch):
    nan = NanOnSteps(monkeypatch, nan_steps=[2])  # the third step; lr > 0 from the second on
    cfg = config("adv_train", data, tmp_path, "train.steps=5")
    assert train(cfg) == FINISHED
    w = nan.weights  # w[k]: before step k
    assert len(w) == 5
    assert not same(w[1], w[2])  # a normal step moves the weights
    assert same(w[2], w[3])  # the NaN step left them alone
    assert not same(w[3], w[4])  # and training went on
    out = run_path(cfg)
    final = exported_state(out)
    assert all(torch.isfinite(t).all() for t in final.values())
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 1 and state["nonfinite_in_a_row"] == 0 and state["step"] == 5
    nonfinite = scalars(out)["train/nonfinite_steps"]
    assert nonfinite == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0), (5, 1.0)]


def test_nan_on_every_step_stops_the_run_after_max_nonfinite_steps(data, tmp_path, monkeypatch):
    nan = NanOnSteps(monkeypatch, nan_steps=range(100))
    cfg = config("adv_train", data, tmp_path, "train.steps=6", "train.max_nonfinite_steps=2")
    with pytest.raises(AdvcapError, match="2 non-finite") as err:
        train(cfg)
    assert nan.step == 1  # two steps ran
    checkpoint = run_path(cfg) / "checkpoints" / "step00000002"
    assert str(checkpoint) in str(err.value)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 2 and state["step"] == 2
    assert same(nan.weights[0], nan.weights[1])


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_events_read_back(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = config("adv_train", data, tmp_path, "train.image_log_every_steps=2")
    assert train(cfg) == FINISHED
    out = run_path(cfg)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()

    values = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags["scalars"]}
    for tag in ("train/clean_loss", "train/adversarial_loss", "train/lr", "train/grad_norm", "train/samples_per_s",
                "attack/epsilon", "attack/zero_input_grad_fraction"):
        assert sorted(values[tag]) == [1, 2, 3, 4], tag
    assert all(v == pytest.approx(0.05) for v in values["attack/epsilon"].values())
    assert all(0.0 <= v <= 1.0 for v in values["attack/zero_input_grad_fraction"].values())
    assert all(v > 0 for v in values["train/grad_norm"].values())
    assert all(4.0 < v < 8.0 for v in values["train/clean_loss"].values())  # ≈ ln(300): mean token CE in nats
    # warmup 1 step then cosine to 0 over 4 steps: the lr after each step.
    lr = cfg.train.lr
    expected_lr = {1: lr, 2: lr * 0.75, 3: lr * 0.25, 4: 0.0}
    assert values["train/lr"] == pytest.approx(expected_lr, rel=1e-6, abs=1e-12)  # float32 in the event file

    (image_tag,) = tags["images"]
    assert image_tag.startswith("attack/")
    images = acc.Images(image_tag)
    assert [e.step for e in images] == [2, 4]
    assert (images[0].height, images[0].width) == (4 * S, 3 * S)  # 4 rows of clean | adversarial | difference

    (text_tag,) = [t for t in tags["tensors"] if t.startswith("attack/")]
    texts = acc.Tensors(text_tag)
    assert [e.step for e in texts] == [2, 4]
    table = texts[0].tensor_proto.string_val[0].decode()
    assert "| reference | clean | adversarial |" in table and table.count("\n") >= 3

    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info.hparams
    assert hparams["train.mode"].string_value == "mixed"
    assert hparams["attack.epsilon"].number_value == pytest.approx(0.05)
    assert hparams["world_size"].number_value == 1


# ---------------------------------------------------------------- real launches


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_accelerate_launch_with_two_processes(data, tmp_path):
    cfg_overrides = overrides(data, tmp_path, "train.steps=3", "train.val_every_steps=3", "train.keep_best=pgd_loss",
                              "eval.batch_size=4")
    launch = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
    ]
    proc = _run([*launch, str(REPO / "launch" / "train.py"), "--config", "adv_train", *cfg_overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_path(load_config("adv_train", cfg_overrides))
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["world_size"] == 2 and prov["distributed_type"] == "MULTI_CPU" and prov["zero_stage"] is None
    assert prov["per_rank_batch_size"] == 4 and prov["launcher"] == "accelerate"
    # train() gathers every rank's weight digest and raises if they differ: exit 0 + the digest = ranks agree.
    assert prov["weights_sha256"] == weights_digest(Captioner(load_export(out), S))
    # Validation split over the two ranks (3 val batches of 4) scores what one process scores on the final weights.
    from accelerate import Accelerator

    from advcap.data.manifest import load_manifest
    from advcap.tokenizer import load_tokenizer
    from advcap.validation import Validator

    best = json.loads((out / "checkpoints" / "best" / "best.json").read_text())
    assert best["step"] == 3 and prov["validation"]["images"] == 12
    cfg = load_config("adv_train", cfg_overrides)
    alone = Validator(cfg, load_manifest(cfg.data.shards), load_tokenizer(cfg.data.tokenizer), Accelerator(cpu=True),
                      Captioner(load_export(out), S))()
    assert alone.keys() == best["figures"].keys()
    assert all(alone[k] == pytest.approx(best["figures"][k], abs=1e-5) for k in alone)


@pytest.mark.slow
def test_cli_stop_at_step_exits_75(data, tmp_path):
    cfg_overrides = overrides(data, tmp_path)
    proc = _run([str(BIN / "advcap"), "train", "--config", "baseline", "--stop-at-step", "2", *cfg_overrides])
    assert proc.returncode == EXIT_STOPPED == 75, proc.stderr[-3000:]
    out = run_path(load_config("baseline", cfg_overrides))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step00000002"]
    assert not (out / "provenance.json").exists()


@pytest.mark.slow
def test_sigusr1_checkpoints_and_stops_then_resume_finishes(data, tmp_path):
    cfg_overrides = overrides(data, tmp_path, "train.steps=80")
    cmd = [str(BIN / "advcap"), "train", "--config", "baseline", *cfg_overrides]
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 90
            while "step 1/80" not in log_path.read_text():  # the handlers are installed by then
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no first log line"
                time.sleep(0.1)
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=60) == EXIT_STOPPED, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    out = run_path(load_config("baseline", cfg_overrides))
    (checkpoint,) = (out / "checkpoints").iterdir()
    stopped_at = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < 80 and checkpoint.name == f"step{stopped_at:08d}"
    assert "received SIGUSR1" in log_path.read_text()

    proc = _run([*cmd, "--resume", "latest"], timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["finished"] and state["step"] == 80
    assert (out / "checkpoints" / "step00000080").is_dir()
    assert json.loads((out / "provenance.json").read_text())["resumed_at_step"] == stopped_at


@pytest.mark.slow
def test_a_stop_file_stops_at_a_checkpoint_and_resume_auto_continues(data, tmp_path):
    """What the SLURM scripts do on USR1: create $ADVCAP_STOP_FILE; the requeued job runs with --resume auto."""
    cfg_overrides = overrides(data, tmp_path, "train.steps=80")
    stop_file = tmp_path / "stop"
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(BIN / "advcap"), "train", "--config", "baseline", "--resume", "auto", *cfg_overrides],
                                cwd=REPO, env={**_env(), "ADVCAP_STOP_FILE": str(stop_file)}, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 90
            while "step 1/80" not in log_path.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
            stop_file.touch()
            assert proc.wait(timeout=60) == EXIT_STOPPED, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert (tmp_path / "stop.outcome").read_text() == "progress\n"  # for the SLURM scripts: requeue
    out = run_path(load_config("baseline", cfg_overrides))
    (checkpoint,) = (out / "checkpoints").iterdir()
    stopped_at = int(checkpoint.name[4:])
    stop_file.unlink()
    assert train(load_config("baseline", cfg_overrides), resume="auto") == FINISHED
    assert json.loads((out / "provenance.json").read_text())["resumed_at_step"] == stopped_at


def test_a_stop_before_the_first_step_is_no_progress(data, tmp_path, monkeypatch, capsys):
    """A stop request already there when training starts (a time limit not longer than the stop signal's
    lead): nothing to checkpoint, exit 76 and a no-progress outcome, so the SLURM scripts do not requeue it."""
    from advcap.cli import main
    from advcap.stopping import EXIT_NO_PROGRESS

    cfg = config("baseline", data, tmp_path)
    stop_file = tmp_path / "stop"
    stop_file.touch()
    monkeypatch.setenv("ADVCAP_STOP_FILE", str(stop_file))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "baseline", "--resume", "auto", *overrides(data, tmp_path)])
    assert exit_info.value.code == EXIT_NO_PROGRESS
    assert "the time limit is probably not longer than the stop signal's lead" in capsys.readouterr().err
    assert (tmp_path / "stop.outcome").read_text() == "no-progress\n"
    assert not (run_path(cfg) / "checkpoints").exists()
    stop_file.unlink()
    assert train(cfg, resume="auto") == FINISHED


def test_train_check_validates_config_and_shards(data, tmp_path, capsys):
    from advcap.cli import main

    main(["train", "--config", "freeze_vit", "--check", *overrides(data, tmp_path)])
    assert f"run dir {tmp_path / 'demo' / 'freeze_vit' / 'seed0'}" in capsys.readouterr().out
    assert not (tmp_path / "demo").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "freeze_vit", "--check", *overrides(data, tmp_path), f"data.shards={tmp_path / 'none'}"])
    assert exit_info.value.code == 2
    assert "no manifest.json in" in capsys.readouterr().err
