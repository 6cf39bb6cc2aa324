"""The attack audit (advcap.audit) on a real tiny captioner: an honest model passes every check, the same
model behind a wrapper that zeroes its input gradient (gradient masking) is flagged.

The captioner learns plain-colour images captioned with one long sentence that names the colour ("there is
a red square in this picture"), so BLEU-4 is high when the colour is right and drops when an attack
changes it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from advcap.audit import audit_conditions, caption_audit_batch, checks
from advcap.conditions import BatchCaptioner, Condition, Generation, PGDSettings
from advcap.config import load_config
from advcap.data.loader import EvalStream
from advcap.data.manifest import load_manifest
from advcap.evaluate import split_metrics
from advcap.inference import load_model
from advcap.rundir import run_path

S = 32
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (220, 220, 30)}
EPSILON = 0.05


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from advcap.data.shardwriter import convert
    from advcap.tokenizer import train_captions, train_tokenizer
    from advcap.train import train

    root = tmp_path_factory.mktemp("audit")
    rng = random.Random(0)
    (root / "images").mkdir()
    entries = []
    for i in range(160):
        colour = list(COLOURS)[i % len(COLOURS)]
        rgb = tuple(min(255, max(0, c + rng.randrange(-25, 26))) for c in COLOURS[colour])
        Image.new("RGB", (S, S), rgb).save(root / "images" / f"{i:03d}.png")
        entries.append({"filename": f"{i:03d}.png", "imgid": i, "split": "test" if i % 5 == 4 else "train",
                        "sentences": [{"raw": f"there is a {colour} square in this picture"}]})
    (root / "captions.json").write_text(json.dumps({"images": entries}))
    convert("karpathy", root / "captions.json", root / "images", root / "shards", shard_size=32, resize=0)
    train_tokenizer(train_captions(load_manifest(root / "shards")), root / "tok", vocab_size=300)
    cfg = load_config(None, [
        "model.preset=tiny", f"data.image_size={S}", "data.workers=0", "model.dropout=0.0", "train.steps=80",
        "train.global_batch_size=16", "train.warmup_steps=1", "train.lr=1e-2", "train.val_every_steps=0",
        f"data.shards={root / 'shards'}", f"data.tokenizer={root / 'tok'}", f"run.out={root / 'runs'}",
        f"attack.epsilon={EPSILON}",
    ])
    train(cfg)
    return run_path(cfg)


class ZeroInputGradient(torch.nn.Module):
    """The captioner with its input gradient zeroed: every gradient attack sees a flat loss (gradient masking)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, pixels, labels, per_image: bool = False):
        return self.inner(pixels.detach() + 0 * pixels, labels, per_image=per_image)

    def generate(self, pixels, **kwargs):
        return self.inner.generate(pixels, **kwargs)


def audit_record(run: Path, mask: bool) -> dict:
    """The evaluation record's parts the checks read, computed with the evaluation's own functions."""
    captioner, tokenizer = load_model(run)
    if mask:
        captioner = ZeroInputGradient(captioner)
    cfg = load_config(run / "config.yaml")
    stream = EvalStream(load_manifest(cfg.data.shards), "test", tokenizer, S, cfg.data.max_caption_tokens, 32)
    bc = BatchCaptioner(captioner, tokenizer, Generation(16), PGDSettings(steps=5, restarts=2))
    conditions = [Condition("clean", "clean"), Condition("fgsm", "fgsm", EPSILON), Condition("pgd", "pgd", EPSILON)]
    audit = audit_conditions(EPSILON, 5, 2)
    records, audit_records = [], []
    for batch in stream:
        pixels, labels = batch["pixels"], batch["labels"]
        captions, _ = bc(pixels, labels, batch["references"], conditions, int(batch["batch_index"]))
        audited = caption_audit_batch(bc, pixels, labels, audit, int(batch["batch_index"]))
        for i, references in enumerate(batch["references"]):
            records.append({"references": references, "captions": {n: c[i] for n, c in captions.items()}})
            audit_records.append({"references": references, "captions": {n: c[i] for n, c in audited.items()}})
    metrics = split_metrics(records, [c.name for c in conditions])
    assert metrics["clean"]["images"] == 32
    audit_bleu = {name: s["bleu4"] for name, s in split_metrics(audit_records, list(audit)).items()}
    return {"metrics": {"test": metrics}, "audit": {"bleu4": audit_bleu}}


def test_an_honest_model_passes_the_audit(model):
    record = audit_record(model, mask=False)
    found = checks([record], EPSILON)
    assert len(found) == 4 and all(c["ok"] for c in found), (found, record)
    bleu = record["audit"]["bleu4"]
    assert bleu["clean"] > bleu["blind"] + 0.2, record  # the model looks, so the checks have something to measure


def test_a_model_that_masks_its_gradient_is_flagged(model):
    record = audit_record(model, mask=True)
    found = {c["check"]: c for c in checks([record], EPSILON)}
    large = found["a large ε (0.5) drives BLEU toward blind"]
    assert large["ok"] is False and "above" in large["detail"]


# ---------------------------------------------------------------- the noise allowance of paired comparisons

SHAPES_COLOURS = (["red", "blue", "green", "yellow", "purple"], ["circle", "square", "star", "diamond"])


def scenes_and_references(n: int = 50):
    colours, shapes = SHAPES_COLOURS
    rng = random.Random(1)
    scenes = [(rng.choice(colours), rng.choice(shapes), rng.choice(colours), rng.choice(shapes)) for _ in range(n)]
    references = [[f"a {a} {b} left of a {c} {d}", f"two shapes: a {a} {b} and a {c} {d}",
                   f"a picture of a {c} {d} and a {a} {b}"] for a, b, c, d in scenes]
    return scenes, references


def captions_wrong_on(scenes, wrong: set[int]) -> list[str]:
    """Each scene described; on the images in `wrong` with its first colour and its second shape wrong."""
    colours, shapes = SHAPES_COLOURS
    out = []
    for i, (a, b, c, d) in enumerate(scenes):
        if i in wrong:
            a, d = colours[(colours.index(a) + 1) % len(colours)], shapes[(shapes.index(d) + 1) % len(shapes)]
        out.append(f"a {a} {b} left of a {c} {d}")
    return out


def pgd_record(scenes, references, wrong: dict[str, set[int]], with_captions: bool = True) -> dict:
    from advcap.metrics import corpus_bleu_scores

    captions = {name: captions_wrong_on(scenes, images) for name, images in wrong.items()}
    audit = {"bleu4": {name: corpus_bleu_scores(c, references)["bleu4"] for name, c in captions.items()}}
    if with_captions:
        audit.update(references=references, captions=captions)
    return {"metrics": {}, "audit": audit}


def test_a_difference_within_the_noise_of_the_audited_images_is_not_flagged():
    """Twice the steps scoring 0.03 above the configured PGD, when the two attacks fool different images (as
    attacks from different trajectories do), is sampling noise on 50 images: passed, with the allowance named.
    The same numbers from an older record without the audit's captions are judged by the fixed tolerance."""
    from advcap.audit import TOLERANCE

    scenes, references = scenes_and_references()
    pick = random.Random(5)
    wrong = {"pgd": set(pick.sample(range(50), 25)), "pgd-2x-steps": set(pick.sample(range(50), 22)),
             "pgd-1-start": set(pick.sample(range(50), 20))}
    record = pgd_record(scenes, references, wrong)
    bleu = record["audit"]["bleu4"]
    assert bleu["pgd-2x-steps"] > bleu["pgd"] + 3 * TOLERANCE  # beyond the fixed tolerance
    (found,) = checks([record], EPSILON)
    assert found["ok"] is True and "(within the noise, ±" in found["detail"], found
    (old,) = checks([pgd_record(scenes, references, wrong, with_captions=False)], EPSILON)
    assert old["ok"] is False and f"(beyond the noise, ±{TOLERANCE:.3f})" in old["detail"], old


def test_a_difference_beyond_the_noise_is_flagged_and_more_runs_narrow_the_allowance():
    """Twice the steps fooling 5 images where the configured PGD fools 25 (a weak configured attack), and the
    restarts worse than one start: both flagged even with the allowance. The allowance of a phase's mean
    over three such runs is about the single run's divided by √3."""
    from advcap.audit import PairedNoise

    scenes, references = scenes_and_references()
    fooled = set(random.Random(5).sample(range(50), 25))
    record = pgd_record(scenes, references, {"pgd": fooled, "pgd-2x-steps": set(sorted(fooled)[:5]),
                                             "pgd-1-start": fooled | set(range(40))})
    (found,) = checks([record], EPSILON)
    assert found["ok"] is False and found["detail"].count("(beyond the noise, ±") == 2, found
    one, three = (PairedNoise([record["audit"]] * runs).allowance("pgd-2x-steps", "pgd") for runs in (1, 3))
    assert three == pytest.approx(one / 3 ** 0.5, rel=0.1)  # each run its own resamples
    assert PairedNoise([record["audit"]]).allowance("pgd-2x-steps", "pgd") == one  # seeded: the same every time


def test_pgd_against_fgsm_and_transfer_use_the_evaluations_captions_for_their_allowance():
    """Checks 1 and 5 compare the evaluation's own conditions: their noise comes from predictions.jsonl's
    captions. PGD 0.03 above FGSM on attacks that fool different images passes with them and is flagged
    without them (the fixed tolerance); a transfer attack far stronger than white-box FGSM is flagged."""
    from advcap.metrics import corpus_bleu_scores

    scenes, references = scenes_and_references()
    pick = random.Random(7)
    wrong = {"fgsm": set(pick.sample(range(50), 25)), "pgd": set(pick.sample(range(50), 22)),
             "transfer-fgsm": set(range(45))}
    captions = {name: captions_wrong_on(scenes, images) for name, images in wrong.items()}
    bleu = {name: corpus_bleu_scores(c, references)["bleu4"] for name, c in captions.items()}
    assert bleu["pgd"] > bleu["fgsm"] + 0.02 and bleu["transfer-fgsm"] < bleu["fgsm"] - 0.1
    record = {"metrics": {"test": {name: {"bleu4": value} for name, value in bleu.items()}}}
    lines = [{"split": "test", "references": references[i], "captions": {n: c[i] for n, c in captions.items()}}
             for i in range(50)]
    found = {c["check"]: c for c in checks([record], EPSILON, [lines])}
    pgd, transfer = found["PGD at least as strong as FGSM"], found["transfer no stronger than white-box FGSM"]
    assert pgd["ok"] is True and "(within the noise, ±" in pgd["detail"], pgd
    assert transfer["ok"] is False and "(beyond the noise, ±" in transfer["detail"], transfer
    for without in (None, [None]):  # no predictions, or a run whose predictions.jsonl could not be used
        assert {c["check"]: c["ok"] for c in checks([record], EPSILON, without)}["PGD at least as strong as FGSM"] is False


def test_a_malformed_audit_record_falls_back_to_the_fixed_tolerance():
    """A hand-edited metrics.json whose audit captions or references are not what an evaluation writes: the
    checks still run, on the fixed tolerance, without an exception."""
    from advcap.audit import TOLERANCE, PairedNoise

    scenes, references = scenes_and_references(10)
    record = pgd_record(scenes, references, {"pgd": {1, 2}, "pgd-2x-steps": {3}, "pgd-1-start": {4, 5}})
    for broken in ([[]] * 10, ["a red circle"] * 10, [[3]] * 10, references[:5]):
        audit = {**record["audit"], "references": broken}
        assert PairedNoise([audit]).allowance("pgd-2x-steps", "pgd") == TOLERANCE
        assert checks([{**record, "audit": audit}], EPSILON)
    no_captions = {**record["audit"], "captions": {"pgd": [None] * 10}}
    assert PairedNoise([no_captions]).allowance("pgd-2x-steps", "pgd") == TOLERANCE
