"""A NaN loss on one rank at one step, under every engine advcap drives: DDP, DeepSpeed ZeRO-1 and ZeRO-2,
in fp32 and bf16, on 2 real gloo ranks. advcap decides to skip (a reduced flag), not the engine's own
overflow check: the weights AND the optimizer state after the skipped step are bit-identical to those
before it, training goes on, the skip is counted in provenance and TensorBoard, and the engines still
agree with each other afterwards (no stale gradient survives a skip)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faulttools import REPO, data, engine, launch, tiny  # noqa: F401 — data is a fixture

from advcap.checkpoint import safe_torch_load
from advcap.config import load_config
from advcap.rundir import run_path

pytestmark = pytest.mark.slow

CASES = [("ddp", "fp32"), ("zero1", "fp32"), ("zero2", "fp32"), ("ddp", "bf16"), ("zero2", "bf16")]
NAN_STEP = 3


def overrides(data, out: Path, precision: str) -> list[str]:
    # Global batch 16 = 2 ranks × 4 × 2 accumulation: the NaN enters one micro-batch of one rank.
    return tiny(data, f"run.out={out}", f"train.precision={precision}", "train.steps=4", "train.global_batch_size=16",
                "train.max_batch_size_per_rank=4", "train.checkpoint_every_steps=1", "train.keep_checkpoints=10")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Each (engine, precision) trained with a NaN loss on rank 1 at step 3."""
    root = tmp_path_factory.mktemp("nonfinite")
    dirs = {}
    for name, precision in CASES:
        cfg_overrides = overrides(data, root / f"{name}-{precision}", precision)
        proc = launch(engine(name), str(REPO / "launch" / "train.py"), "--config", "adv_train", *cfg_overrides,
                      faults=f"train.loss=nan@rank=1@step={NAN_STEP}")
        assert proc.returncode == 0, f"{name} {precision}:\n{proc.stderr[-4000:]}"
        assert f"step {NAN_STEP}: non-finite loss or gradient norm on some rank: step skipped on all ranks" in proc.stderr
        dirs[name, precision] = run_path(load_config("adv_train", cfg_overrides))
    return dirs


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step{step:08d}" / "model.safetensors"))


def optimizer_states(run: Path, step: int) -> list:
    """Everything the optimizer holds at `step`: DDP's state dict, or every rank's ZeRO partition (fp32 master
    weights and Adam moments)."""
    folder = run / "checkpoints" / f"step{step:08d}"
    if (folder / "optimizer.pt").is_file():
        return [safe_torch_load(folder / "optimizer.pt")["state"]]
    states = []
    for partition in sorted((folder / "zero").glob("*optim_states.pt")):
        sd = safe_torch_load(partition)["optimizer_state_dict"]
        states.append([sd["single_partition_of_fp32_groups"], sd["base_optimizer_state"]])
    assert len(states) == 2
    return states


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("case", CASES, ids=[f"{e}-{p}" for e, p in CASES])
def test_the_skipped_step_leaves_weights_and_optimizer_state_untouched(runs, case):
    run = runs[case]
    before, after, next_step = (weights(run, s) for s in (NAN_STEP - 1, NAN_STEP, NAN_STEP + 1))
    assert same(before, after), "the skipped step changed the weights"
    assert same(optimizer_states(run, NAN_STEP - 1), optimizer_states(run, NAN_STEP)), "it changed the optimizer"
    assert not same(after, next_step), "training did not go on after the skip"
    assert all(torch.isfinite(t.float()).all() for t in next_step.values())
    assert json.loads((run / "provenance.json").read_text())["nonfinite_steps"] == 1
    if case[1] == "bf16":
        assert {t.dtype for t in after.values()} == ({torch.bfloat16} if case[0] != "ddp" else {torch.float32})


def test_engines_agree_after_a_skip(runs):
    """A stale gradient left in an engine after the skip would change the next steps: the fp32 engines end
    with the same weights (as far as float reductions allow)."""
    reference = weights(runs["ddp", "fp32"], 4)
    for name in ("zero1", "zero2"):
        other = weights(runs[name, "fp32"], 4)
        for key, tensor in reference.items():
            torch.testing.assert_close(other[key], tensor, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


def test_the_skip_is_counted_in_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["zero2", "fp32"] / "tensorboard"))
    acc.Reload()
    counted = {e.step: e.value for e in acc.Scalars("train/nonfinite_steps")}
    assert counted == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0}
