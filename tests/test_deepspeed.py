"""DeepSpeed ZeRO-1 and ZeRO-2 against DDP, on 2 real gloo ranks: `accelerate launch` with the shipped launcher configs.

For each freeze policy (freeze_gpt_xattn included), `mixed` training (FGSM inside the step, 2 micro-batches of
accumulation) under ZeRO-2 (the combined scheme, against DDP's reuse), `adversarial` training, and full training
under ZeRO-1 give the losses and weights of DDP; frozen parameters stay bit-identical; ZeRO-1 and ZeRO-2 runs stopped at a checkpoint and resumed end where
the uninterrupted ones do. The config checks (ZeRO-3 refused, the
DeepSpeed JSON's "auto" values filled from advcap's YAML, conflicts refused) run on a real DeepSpeedPlugin.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import metrics_of
import torch
from test_train import BIN, REPO, S, _free_port, _run, data, fresh_captioner, load_export, overrides, scalars  # noqa: F401

from advcap.config import load_config
from advcap.rundir import run_path, validate_checkpoint
from advcap.distributed import configure_deepspeed
from advcap.errors import AdvcapError
from advcap.checkpoint import load_checkpoint_weights
from advcap.freeze import parameter_group
from advcap.train import EXIT_STOPPED

pytestmark = pytest.mark.slow

POLICIES = {  # phase → which parameters train
    "adversarial": lambda name: True,  # FGSM images only: the attack pass runs alone, then one backward
    "adv_train": lambda name: True,
    "freeze_vit": lambda name: parameter_group(name) != "encoder",
    "freeze_gpt": lambda name: parameter_group(name) == "encoder",
    "freeze_gpt_xattn": lambda name: parameter_group(name) in ("encoder", "cross_attention"),
}
ENGINES = {"ddp": "ddp.yaml", "zero1": "zero1.yaml", "zero2": "zero2.yaml"}
# Every policy under DDP and ZeRO-2; ZeRO-1 (which partitions only the optimizer state) for full training.
TRAINED = [(engine, phase) for engine in ("ddp", "zero2") for phase in POLICIES] + [("zero1", "adv_train")]
STEPS = 4


def _overrides(data, out: Path, *extra: str) -> list[str]:
    # lr 1e-3 so that 4 steps move the weights well beyond float noise; global batch 16 = 2 ranks × 4 × 2 accumulation.
    return overrides(data, out, f"train.steps={STEPS}", "train.lr=1e-3", "train.global_batch_size=16",
                     "train.max_batch_size_per_rank=4", "train.checkpoint_every_steps=2", *extra)


def _launch(engine: str, phase: str, cfg_overrides: list[str], *flags: str):
    launch = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "configs" / "accelerate" / ENGINES[engine]),
              "--num_processes", "2", "--main_process_port", str(_free_port())]
    return _run([*launch, str(REPO / "launch" / "train.py"), "--config", phase, *cfg_overrides, *flags], timeout=240)


ABLATION_OUTPUT: dict[str, str] = {}  # engine → what rank 0 printed


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every (engine, phase) of TRAINED trained once; the run dirs. Each engine's phases run as one
    `advcap ablation` under `accelerate launch` (what slurm/ablation.sh runs with that launcher config): one
    engine after the other in the same processes, then evaluated there."""
    root = tmp_path_factory.mktemp("engines")
    for engine in ENGINES:
        phases = [phase for e, phase in TRAINED if e == engine]
        cfg_overrides = [o for o in _overrides(data, root) if not o.startswith("run.out=")]
        launch = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "configs" / "accelerate" / ENGINES[engine]),
                  "--num_processes", "2", "--main_process_port", str(_free_port())]
        proc = _run([*launch, "-m", "advcap.cli", "ablation", "--phases", *phases, "--seeds", "0", "--out",
                     str(root / engine), *cfg_overrides, "eval.splits=[test]", "eval.conditions=[clean,fgsm]", "eval.coco_metrics=false", "eval.audit=false"], timeout=400)
        assert proc.returncode == 0, f"{engine}:\n{proc.stderr[-4000:]}"
        ABLATION_OUTPUT[engine] = proc.stdout
    return {(engine, phase): root / engine / phase / "seed0" for engine, phase in TRAINED}


def _losses(out: Path) -> dict[str, list[float]]:
    # The gradient norm (before clipping) is sensitive to the gradient's scale, which Adam's updates are not.
    tags = ("train/clean_loss", "train/adversarial_loss", "train/grad_norm")
    series = scalars(out)
    return {tag: [value for _, value in series[tag]] for tag in tags}


@pytest.mark.parametrize("engine, phase", [(e, p) for e, p in TRAINED if e != "ddp"])
def test_zero_trains_like_ddp(runs, engine, phase):
    ddp, zero = runs["ddp", phase], runs[engine, phase]
    prov = json.loads((zero / "provenance.json").read_text())
    assert (prov["distributed_type"], prov["zero_stage"], prov["world_size"]) == ("DEEPSPEED", int(engine[-1]), 2)
    assert (prov["per_rank_batch_size"], prov["grad_accum_steps"]) == (4, 2)
    ddp_prov = json.loads((ddp / "provenance.json").read_text())
    assert ddp_prov["distributed_type"] == "MULTI_CPU"
    # ZeRO-2 reduces on every backward: its `mixed` step runs the combined scheme, the others reuse.
    assert (ddp_prov["mixed_scheme"], prov["mixed_scheme"]) == ("reuse", "combined" if engine == "zero2" else "reuse")

    ddp_losses, zero_losses = _losses(ddp), _losses(zero)
    for tag, values in ddp_losses.items():
        assert len(values) == STEPS
        assert zero_losses[tag] == pytest.approx(values, rel=1e-5), tag
    # The weights moved (lr 1e-3) and moved the same way under both engines.
    ddp_model, zero_model = load_export(ddp), load_export(zero)
    zero_params = dict(zero_model.named_parameters())
    moved = 0
    for name, param in ddp_model.named_parameters():
        torch.testing.assert_close(zero_params[name], param, rtol=1e-4, atol=1e-6, msg=name)
        moved += int(not torch.equal(param, fresh_params(runs, phase)[name]))
    assert moved > 0


_FRESH: dict[str, dict[str, torch.Tensor]] = {}


def fresh_params(runs, phase: str) -> dict[str, torch.Tensor]:
    """The initial weights of the phase's runs (train() seeds, then builds)."""
    if phase not in _FRESH:
        cfg = load_config(runs["zero2", phase] / "config.yaml")
        _FRESH[phase] = {n: p.detach().clone() for n, p in fresh_captioner(cfg).model.named_parameters()}
    return _FRESH[phase]


@pytest.mark.parametrize("phase", list(POLICIES))
def test_frozen_parameters_stay_bit_identical_under_zero2(runs, phase):
    trains = POLICIES[phase]
    fresh = fresh_params(runs, phase)
    frozen = trained = 0
    for name, param in load_export(runs["zero2", phase]).named_parameters():
        if trains(name):
            trained += int(not torch.equal(param, fresh[name]))
        else:
            assert torch.equal(param, fresh[name]), f"frozen {name} changed under ZeRO-2"
            frozen += 1
    freezes = phase.startswith("freeze")
    assert trained > 0 and (frozen > 0) == freezes
    counts = json.loads((runs["zero2", phase] / "parameters.json").read_text())
    assert (counts["total"]["frozen"] > 0) == freezes


@pytest.mark.parametrize("engine", ["zero1", "zero2"])
def test_a_zero_checkpoint_resumes_to_the_uninterrupted_run(runs, data, tmp_path, engine):
    cfg_overrides = _overrides(data, tmp_path)
    stopped = _launch(engine, "adv_train", cfg_overrides, "--stop-at-step", "2")
    # torch's elastic launcher turns any non-zero rank exit into its own 1; the ranks' 75 shows in its report.
    assert stopped.returncode != 0 and f"exitcode: {EXIT_STOPPED}" in stopped.stderr, stopped.stderr[-4000:]
    out = run_path(load_config("adv_train", cfg_overrides))
    checkpoint = out / "checkpoints" / "step00000002"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "zero").is_dir()
    # Each rank's own files made it in before the checkpoint was committed, and the manifest lists them.
    assert {p.name for p in (checkpoint / "rng").iterdir()} == {"rank0.json", "rank1.json"}
    assert len(list((checkpoint / "zero").glob("*optim_states.pt"))) == 2  # one ZeRO partition per rank
    assert validate_checkpoint(checkpoint) is None
    listed = json.loads((checkpoint / "checkpoint.json").read_text())["files"]
    assert {"rng/rank1.json", "model.safetensors", "trainer_state.json"} <= set(listed)

    resumed = _launch(engine, "adv_train", cfg_overrides, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert json.loads((out / "provenance.json").read_text())["resumed_at_step"] == 2
    reference = json.loads((runs[engine, "adv_train"] / "provenance.json").read_text())["weights_sha256"]
    assert json.loads((out / "provenance.json").read_text())["weights_sha256"] == reference
    assert _losses(out)["train/clean_loss"][-2:] == _losses(runs[engine, "adv_train"])["train/clean_loss"][-2:]


@pytest.mark.parametrize("phase", ["adv_train", "freeze_vit"])
def test_a_zero2_checkpoint_loads_as_the_weights_of_its_step(runs, phase):
    """`advcap eval --select best-val` reads kept checkpoints: their model.safetensors, under DeepSpeed too."""
    zero, ddp = runs["zero2", phase], runs["ddp", phase]
    cfg = load_config(zero / "config.yaml")

    def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
        captioner = fresh_captioner(cfg)
        load_checkpoint_weights(captioner, run / "checkpoints" / f"step{step:08d}")
        return dict(captioner.model.named_parameters())

    final, exported = weights(zero, STEPS), dict(load_export(zero).named_parameters())
    assert final.keys() == exported.keys()
    for name, param in final.items():
        assert torch.equal(param, exported[name]), name
    middle, ddp_middle = weights(zero, STEPS // 2), weights(ddp, STEPS // 2)
    for name, param in middle.items():
        torch.testing.assert_close(param, ddp_middle[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(param, final[name]) for name, param in middle.items())


def test_a_checkpoint_without_weights_is_refused_by_name(tmp_path, runs):
    captioner = fresh_captioner(load_config(runs["zero2", "adv_train"] / "config.yaml"))
    with pytest.raises(AdvcapError, match="holds no weights .model.safetensors is missing"):
        load_checkpoint_weights(captioner, tmp_path)


# ---------------------------------------------------------------- the DeepSpeed config, from advcap's YAML


def _accelerator_with(tmp_path: Path, ds_config: dict) -> SimpleNamespace:
    """A real DeepSpeedPlugin built from a JSON file, as `accelerate launch` builds it, in the shape
    configure_deepspeed reads (accelerator.state.deepspeed_plugin)."""
    from accelerate.utils import DeepSpeedPlugin

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config))
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=str(path))))


def _shipped(stage: int) -> dict:
    return json.loads((REPO / "configs" / "accelerate" / f"zero{stage}.json").read_text())


@pytest.mark.parametrize("stage", [1, 2])
def test_the_shipped_deepspeed_json_is_filled_from_the_advcap_config(tmp_path, stage):
    accelerator = _accelerator_with(tmp_path, _shipped(stage))
    configure_deepspeed(accelerator, global_batch=64, per_rank=8, accum=4, clip=0.5)
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (64, 8)
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (4, 0.5)
    assert ds["zero_optimization"]["stage"] == stage


def test_zero3_is_refused(tmp_path):
    config = _shipped(2)
    config["zero_optimization"]["stage"] = 3
    with pytest.raises(AdvcapError, match="ZeRO stage 3 .* not supported"):
        configure_deepspeed(_accelerator_with(tmp_path, config), 64, 8, 4, 1.0)


def test_a_deepspeed_json_contradicting_the_advcap_config_is_refused(tmp_path):
    config = {**_shipped(2), "train_micro_batch_size_per_gpu": 16}
    with pytest.raises(AdvcapError, match=r"train_micro_batch_size_per_gpu is 16 .* advcap's config gives 8"):
        configure_deepspeed(_accelerator_with(tmp_path, config), 64, 8, 4, 1.0)
    # The same number is not a conflict.
    configure_deepspeed(_accelerator_with(tmp_path, {**_shipped(2), "train_micro_batch_size_per_gpu": 8}), 64, 8, 4, 1.0)


def test_the_ablation_trains_and_evaluates_under_zero2(runs):
    """What slurm/ablation.sh runs with LAUNCHER_CONFIG=configs/accelerate/zero2.yaml (the `runs` fixture): train
    under the DeepSpeed engine, then evaluate in the same processes, phase after phase."""
    for phase in POLICIES:
        run = runs["zero2", phase]
        assert json.loads((run / "provenance.json").read_text())["distributed_type"] == "DEEPSPEED"
        metrics = metrics_of(run)
        assert set(metrics["test"]) == {"clean", "fgsm"} and metrics["test"]["clean"]["images"] == 12
        assert len(re.findall(rf"^{phase} +seed 0 +done", ABLATION_OUTPUT["zero2"], re.M)) == 1  # rank 0 prints it
