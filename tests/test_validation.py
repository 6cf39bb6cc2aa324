"""Validation while training (advcap.validation): figures logged to TensorBoard, checkpoints/best kept by the
configured figure and used by `--select best-val`, training left exactly as it would be without it, and the
catastrophic-overfitting guard firing on a reproduced collapse and staying silent on a normal run.

The data is a texture task the tiny preset learns in a few hundred steps: stripes (horizontal, vertical) or a
checkerboard of random period, phase, amplitude and tint, five captions naming the pattern. At ε = 0.2 the
attacks can erase a faint pattern, so robustness has a price. Fine-tuned with FGSM from a clean model (mixed
mode, no random start, lr 1e-2), the tiny model shows the collapse the literature describes: FGSM's damage on
the val subset falls to almost nothing while PGD's stays (seen for seeds 0, 1 and 2 alike; from scratch the
model as often learns to ignore the image instead, which no attack hurts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from advcap.cli import main
from advcap.config import load_config
from advcap.errors import AdvcapError
from advcap.rundir import run_path
from advcap.train import FINISHED, STOPPED, train

S = 32
PATTERNS = ("horizontal", "vertical", "checked")
TEMPLATES = ("a {} pattern", "{} lines", "an image with {} stripes", "the {} pattern", "{} texture")


def make_texture_set(root: Path, n_images: int = 384) -> tuple[Path, Path]:
    """A Karpathy-split file over PNG textures: every 8th image is test, the one before it val."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:S, 0:S]
    entries = []
    for i in range(n_images):
        kind = PATTERNS[i % 3]
        period = rng.integers(3, 7)
        phase, amplitude = rng.integers(0, period), rng.uniform(0.15, 0.35)
        rows, cols = (yy + phase) // (period / 2), (xx + phase) // (period / 2)
        pattern = {"horizontal": rows % 2, "vertical": cols % 2, "checked": (rows + cols) % 2}[kind]
        tint = rng.uniform(0.3, 0.7, 3)
        pixels = np.clip(tint[None, None, :] + amplitude * (2 * pattern[..., None] - 1), 0, 1)
        name = f"img_{i:04d}.png"
        Image.fromarray((pixels * 255).astype(np.uint8)).save(root / "images" / name)
        split = "test" if i % 8 == 7 else "val" if i % 8 == 6 else "train"
        entries.append({"filename": name, "imgid": i, "split": split,
                        "sentences": [{"raw": t.format(kind)} for t in TEMPLATES]})
    (root / "captions.json").write_text(json.dumps({"images": entries}))
    return root / "captions.json", root / "images"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from advcap.data.manifest import load_manifest
    from advcap.data.shardwriter import convert
    from advcap.tokenizer import train_captions, train_tokenizer

    root = tmp_path_factory.mktemp("textures")
    annotations, images = make_texture_set(root / "src")
    convert("karpathy", annotations, images, root / "shards", shard_size=16, resize=0)
    train_tokenizer(train_captions(load_manifest(root / "shards")), root / "tok", vocab_size=300)
    return root


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model.preset=tiny", f"data.image_size={S}", "data.workers=0", "model.dropout=0.0", "train.warmup_steps=1",
        "train.global_batch_size=16", "train.lr=1e-2", "train.mode=mixed", "train.checkpoint_every_steps=1000",
        "train.val_every_steps=10", "train.val_images=48", "eval.batch_size=48", "eval.max_new_tokens=8",
        "eval.splits=[test]", "eval.conditions=[clean,fgsm]", "eval.coco_metrics=false", "eval.audit=false",
        f"data.shards={data / 'shards'}", f"data.tokenizer={data / 'tok'}", f"run.out={out}", *extra,
    ]


@pytest.fixture(scope="module")
def clean_model(data, tmp_path_factory) -> Path:
    """The hf/ export of 200 clean steps: the starting point of the FGSM runs below."""
    cfg = load_config(None, overrides(data, tmp_path_factory.mktemp("clean"), "train.mode=clean", "train.steps=200",
                                      "train.val_every_steps=0"))
    assert train(cfg) == FINISHED
    return run_path(cfg) / "hf"


def from_clean(clean_model: Path) -> list[str]:
    return ["model.preset=custom", f"model.init_from={clean_model}"]


def val_scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"] if tag.startswith("val/")}


def test_the_guard_rolls_back_when_fgsm_training_collapses(data, clean_model, tmp_path):
    """ε = 0.2, FGSM without random start: the collapse comes; the guard ends training at the second
    validation in a row that shows it and finishes with checkpoints/best (by PGD val loss)."""
    cfg = load_config(None, overrides(data, tmp_path, *from_clean(clean_model), "attack.epsilon=0.2",
                                      "train.steps=200", "train.keep_best=pgd_loss", "train.overfit_guard=rollback"))
    assert train(cfg) == FINISHED
    run = run_path(cfg)
    provenance = json.loads((run / "provenance.json").read_text())
    stopped = provenance["stopped_early"]
    assert stopped["action"] == "rollback" and stopped["step"] < 200 and provenance["steps_trained"] == stopped["step"]
    alarm = provenance["overfit_alarms"][-1]
    assert alarm["step"] == stopped["step"] and alarm["in_a_row"] == 2
    assert alarm["pgd_gap"] >= 0.1 and alarm["fgsm_gap"] < 0.2 * alarm["pgd_gap"]

    logged = val_scalars(run)
    steps = sorted(logged["val/pgd_loss"])
    assert steps == list(range(10, stopped["step"] + 1, 10))
    # What was logged is what the guard read, and the signature held at the two last validations only in a row.
    signature = logged["val/overfit_signature"]
    assert [signature[s] for s in steps[-2:]] == [1.0, 1.0] and (len(steps) < 3 or signature[steps[-3]] == 0.0)
    fgsm_gap = logged["val/fgsm_loss"][stopped["step"]] - logged["val/clean_loss"][stopped["step"]]
    assert fgsm_gap == pytest.approx(alarm["fgsm_gap"], abs=1e-5)

    best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    pgd = logged["val/pgd_loss"]
    assert best["metric"] == "pgd_loss" and best["step"] == min(steps, key=lambda s: (pgd[s], s))
    kept = load_file(str(run / "checkpoints" / "best" / "model.safetensors"))
    # Finished with the best weights: the export, loaded back into the captioner, holds them.
    from advcap.inference import load_model

    exported = load_model(run)[0].state_dict()
    assert all(torch.equal(kept[name], exported[name]) for name in kept)
    assert json.loads((run / "trainer_state.json").read_text())["finished"]
    assert train(cfg) == FINISHED  # a finished early stop stays finished


def test_a_normal_adversarial_run_validates_silently_and_best_val_uses_its_best(data, clean_model, tmp_path):
    """ε = 0.05, the same fine-tuning otherwise: no alarm; val figures at every validation; checkpoints/best
    is the validation with the best PGD BLEU-4 (the default figure); `advcap eval --select best-val` uses it."""
    cfg = load_config(None, overrides(data, tmp_path, *from_clean(clean_model), "attack.epsilon=0.05",
                                      "train.steps=150", "train.val_every_steps=30", "train.overfit_guard=stop"))
    assert train(cfg) == FINISHED
    run = run_path(cfg)
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["overfit_alarms"] == [] and provenance["stopped_early"] is None
    assert provenance["steps_trained"] == 150
    validation = provenance["validation"]
    assert validation["images"] == 48 and 0 < validation["share_of_wall_time"] < 1
    logged = val_scalars(run)
    for tag in ("clean", "fgsm", "pgd"):
        assert sorted(logged[f"val/{tag}_loss"]) == sorted(logged[f"val/{tag}_bleu4"]) == [30, 60, 90, 120, 150]
    bleu = logged["val/pgd_bleu4"]
    best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    assert best["step"] == max(bleu, key=lambda s: (bleu[s], -s)) and best["value"] == pytest.approx(bleu[best["step"]])

    main(["eval", str(run), "--select", "best-val"])
    record = json.loads((run / "metrics.json").read_text())
    assert record["weights"] == "checkpoints/best" and record["step"] == best["step"]


def test_validation_leaves_training_exactly_as_without_it_and_resumes_exactly(data, tmp_path):
    """The same run with validation every 3 steps, without, and stopped at step 7 then resumed: equal weights
    and (with validation) the same checkpoints/best."""
    base = ["attack.epsilon=0.05", "train.steps=12", "train.checkpoint_every_steps=4", "train.keep_best=pgd_loss"]
    plain = load_config(None, overrides(data, tmp_path / "plain", *base, "train.val_every_steps=0"))
    validated = load_config(None, overrides(data, tmp_path / "validated", *base, "train.val_every_steps=3"))
    resumed = load_config(None, overrides(data, tmp_path / "resumed", *base, "train.val_every_steps=3"))
    for cfg in (plain, validated):
        assert train(cfg) == FINISHED
    assert train(resumed, stop_at_step=7) == STOPPED
    assert train(resumed, resume="latest") == FINISHED
    weights = [load_file(str(run_path(c) / "hf" / "model.safetensors")) for c in (plain, validated, resumed)]
    for other in weights[1:]:
        assert all(torch.equal(weights[0][name], other[name]) for name in weights[0])
    assert not (run_path(plain) / "checkpoints" / "best").exists()
    bests = [json.loads((run_path(c) / "checkpoints" / "best" / "best.json").read_text()) for c in (validated, resumed)]
    assert bests[0] == bests[1]


def test_validation_needs_a_val_split_and_rollback_needs_a_best(data, tmp_path):
    from advcap.data.shardwriter import convert

    entries = json.loads((data / "src" / "captions.json").read_text())["images"][:24]
    for entry in entries:
        entry["split"] = "train" if entry["split"] == "val" else entry["split"]
    (tmp_path / "captions.json").write_text(json.dumps({"images": entries}))
    convert("karpathy", tmp_path / "captions.json", data / "src" / "images", tmp_path / "shards", shard_size=16, resize=0)
    cfg = load_config(None, [*overrides(data, tmp_path / "runs", "train.steps=10"), f"data.shards={tmp_path / 'shards'}"])
    with pytest.raises(AdvcapError, match="train.val_every_steps=10 needs a val split.*train.val_every_steps=0"):
        train(cfg)
    # A val shard missing is named at the start, not at the first validation.
    import shutil

    shards = shutil.copytree(data / "shards", tmp_path / "damaged")
    manifest = json.loads((shards / "manifest.json").read_text())
    val_shard = next(s for s in manifest["shards"] if s["split"] == "val")["name"]
    (shards / val_shard).unlink()
    damaged = load_config(None, [*overrides(data, tmp_path / "runs2", "train.steps=10"), f"data.shards={shards}"])
    with pytest.raises(AdvcapError, match=f"{val_shard}.*missing"):
        train(damaged)
    assert not (run_path(damaged) / "checkpoints").exists()
    with pytest.raises(AdvcapError, match="train.overfit_guard"):
        load_config(None, overrides(data, tmp_path, "train.overfit_guard=rollback", "train.keep_best=none"))
