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
