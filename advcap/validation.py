"""Validation while training: a fixed val subset scored every `train.val_every_steps`, the best checkpoint
kept by one of its figures, and the catastrophic-overfitting guard.

The subset is the first `train.val_images` images of the val split in manifest order (`EvalStream`): the same
for every phase and seed, split over the ranks without overlap. On it, per condition (clean, FGSM at the
training ε, PGD-k with a random start), the figures are the mean per-token loss of the first reference
(`<condition>_loss`) and the paper's BLEU-4 of greedy captions (`<condition>_bleu4`). Every rank ends with
the same figures (the records are gathered everywhere), so every rank takes the same decisions without a
further collective.

Validation must not change training: it runs under `torch.random.fork_rng` (dropout's RNG is left as it was),
its random starts draw from their own generator seeded by the val batch, and the model is put back in train
mode. A run with validation therefore trains to exactly the weights of a run without it.

The guard. FGSM training can fail abruptly ("catastrophic overfitting", Wong et al. 2020): the model learns to
defeat the single-step attack while multi-step PGD still breaks it, so FGSM's damage shrinks towards nothing
while PGD's stays. The alarm is that signature, measured on the val losses: FGSM raises the loss by less than
`train.overfit_fgsm_share` of what PGD raises it, while PGD raises it by at least `train.overfit_min_gap` nats
per token (below that, no attack does much and the ratio is noise), at `train.overfit_patience` validations in
a row. Only runs that train on FGSM (adversarial, mixed) are guarded: a clean model's FGSM is often much weaker
than PGD without anything having gone wrong.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from advcap.config import Config
from advcap.errors import AdvcapError
from advcap.rundir import BEST_CHECKPOINT

log = logging.getLogger(__name__)

CONDITIONS = ("clean", "fgsm", "pgd")
BEST_RECORD = "best.json"


@dataclass(frozen=True)
class OverfitSignature:
    """One validation's reading of the catastrophic-overfitting signature."""

    step: int
    fgsm_gap: float  # val loss under FGSM minus clean, nats per token
    pgd_gap: float
    in_a_row: int = 1  # validations in a row that showed it, this one included

    def describe(self) -> str:
        share = self.fgsm_gap / self.pgd_gap
        return (f"step {self.step}: possible catastrophic overfitting ({self.in_a_row} validations in a row): on the "
                f"val subset FGSM raises the loss by {self.fgsm_gap:.3f} nats/token, {share:.0%} of PGD's "
                f"{self.pgd_gap:.3f} (robustness to the training attack that PGD does not confirm)")

    def as_dict(self) -> dict:
        return {"step": self.step, "fgsm_gap": round(self.fgsm_gap, 6), "pgd_gap": round(self.pgd_gap, 6),
                "in_a_row": self.in_a_row, "message": self.describe()}


def overfit_signature(figures: dict[str, float], step: int, fgsm_share: float, min_gap: float) -> Optional[OverfitSignature]:
    """The signature in one validation's figures, or None."""
    fgsm_gap = figures["fgsm_loss"] - figures["clean_loss"]
    pgd_gap = figures["pgd_loss"] - figures["clean_loss"]
    if pgd_gap >= min_gap and fgsm_gap < fgsm_share * pgd_gap:
        return OverfitSignature(step, fgsm_gap, pgd_gap)
    return None


def better(metric: str, value: float, best: Optional[float]) -> bool:
    """Whether `value` of `metric` beats `best` (losses are minimised, BLEU maximised; ties keep the earlier)."""
    if best is None:
        return True
    return value < best if metric.endswith("_loss") else value > best


class Validator:
    """Scores the fixed val subset with the training model (one rank's share, gathered everywhere)."""

    def __init__(self, cfg: Config, manifest: Any, tokenizer: Any, accelerator: Any, captioner: Any):
        self.cfg, self.manifest, self.tokenizer = cfg, manifest, tokenizer
        self.accelerator, self.captioner = accelerator, captioner
        self.images = min(cfg.train.val_images, manifest.samples("val"))

    @classmethod
    def for_run(cls, cfg: Config, manifest: Any, tokenizer: Any, accelerator: Any, captioner: Any) -> Optional["Validator"]:
        """A validator if this run validates at all (some multiple of val_every_steps within its steps)."""
        every = cfg.train.val_every_steps
        if every == 0 or every > cfg.train.steps:
            return None
        if not any(shard.split == "val" and shard.samples for shard in manifest.shards):
            raise AdvcapError(f"train.val_every_steps={every} needs a val split, and {cfg.data.shards} has none: "
                              "set train.val_every_steps=0 to train without validation")
        from advcap.data.manifest import require_complete_shards

        require_complete_shards(manifest, ["val"])  # now, not at the first validation hundreds of steps in
        return cls(cfg, manifest, tokenizer, accelerator, captioner)

    def due(self, step: int) -> bool:
        return step % self.cfg.train.val_every_steps == 0

    def __call__(self) -> dict[str, float]:
        """{"<condition>_loss", "<condition>_bleu4" for clean, fgsm, pgd; "images"}: the same on every rank."""
        from accelerate.utils import gather_object

        from advcap.metrics import corpus_bleu_scores

        was_training = self.captioner.training
        device = self.accelerator.device
        self.captioner.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                local = self._score_local()
        finally:
            self.captioner.train(was_training)
        records = sorted(gather_object(local), key=lambda r: r["order"])
        if len(records) != self.images:
            raise AdvcapError(f"validation: {len(records)} of the {self.images} val images could be read "
                              "(missing or corrupt shards; see the warnings above, and `advcap verify`)")
        tokens = sum(r["tokens"] for r in records)
        figures: dict[str, float] = {"images": float(len(records))}
        for name in CONDITIONS:
            figures[f"{name}_loss"] = sum(r["loss"][name] for r in records) / tokens
            figures[f"{name}_bleu4"] = corpus_bleu_scores([r["captions"][name] for r in records],
                                                          [r["references"] for r in records])["bleu4"]
        return figures

    def _score_local(self) -> list[dict]:
        from advcap.attacks import fgsm, pgd
        from advcap.conditions import PGDSettings, generator_for
        from advcap.data.loader import EvalStream, make_loader
        from advcap.model import decode_captions

        cfg, model, device = self.cfg, self.captioner, self.accelerator.device
        eps, steps = cfg.attack.epsilon, cfg.train.val_pgd_steps
        step_size = PGDSettings(steps=steps, restarts=1).step(eps)
        stream = EvalStream(self.manifest, "val", self.tokenizer, cfg.data.image_size, cfg.data.max_caption_tokens,
                            cfg.eval.batch_size, self.accelerator.process_index, self.accelerator.num_processes,
                            limit=self.images)
        records = []
        for batch in make_loader(stream, 0):
            pixels, labels = batch["pixels"].to(device), batch["labels"].to(device)
            loss = lambda x: model(x, labels)  # noqa: E731
            index = int(batch["batch_index"])
            images = {
                "clean": pixels,
                "fgsm": fgsm(loss, pixels, eps),
                "pgd": pgd(loss, pixels, eps, step_size, steps, random_start=True,
                           generator=generator_for(device, "validation", index)),
            }
            captions, losses = {}, {}
            with torch.no_grad():
                for name, x in images.items():
                    losses[name] = model(x, labels, per_image=True).tolist()
                    ids = model.generate(x, max_new_tokens=cfg.eval.max_new_tokens, num_beams=1, use_cache=True)
                    captions[name] = decode_captions(self.tokenizer, ids)
            tokens = (labels != -100).sum(1).tolist()
            for position, references in enumerate(batch["references"]):
                records.append({
                    "order": (index, position), "references": list(references), "tokens": tokens[position],
                    "loss": {name: losses[name][position] for name in CONDITIONS},
                    "captions": {name: captions[name][position] for name in CONDITIONS},
                })
        return records


class BestCheckpoint:
    """checkpoints/best: the weights of the validation with the best `train.keep_best` figure, with a
    best.json naming the step and the figures. Written whole (atomic replace) by the main process."""

    def __init__(self, rundir: Any, metric: str):
        self.rundir, self.metric = rundir, metric

    @property
    def path(self) -> Path:
        return self.rundir.checkpoints_dir / BEST_CHECKPOINT

    def record(self) -> Optional[dict]:
        try:
            return json.loads((self.path / BEST_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, model: torch.nn.Module, step: int, figures: dict[str, float]) -> None:
        from advcap import atomic
        from advcap.checkpoint import MODEL_FILE, save_weights

        def write(folder: Path) -> None:
            from advcap.rundir import sha256_file

            save_weights(model, folder / MODEL_FILE)
            record = {"step": step, "metric": self.metric, "value": figures[self.metric], "figures": figures,
                      "model_sha256": sha256_file(folder / MODEL_FILE)}
            (folder / BEST_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

        self.rundir.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        atomic.replace_dir(self.path, write)

    def load_into(self, captioner: torch.nn.Module) -> dict:
        """Load the kept weights into `captioner` after checking them against best.json; returns the record."""
        from advcap.checkpoint import MODEL_FILE, load_checkpoint_weights
        from advcap.rundir import sha256_file

        record = self.record()
        if record is None:
            raise AdvcapError(f"{self.path / BEST_RECORD} is missing or unreadable")
        weights = self.path / MODEL_FILE
        if not weights.is_file() or sha256_file(weights) != record.get("model_sha256"):
            raise AdvcapError(f"{weights} does not match its sha256 in {BEST_RECORD} (damaged or changed)")
        load_checkpoint_weights(captioner, self.path)
        return record

    def drop_if_ahead_of(self, step: int) -> None:
        """On resume from `step`: a best saved after it belongs to steps about to be trained again (and will
        be saved again if it is still the best); keeping it would mix the two."""
        import shutil

        record = self.record()
        if self.path.exists() and (record is None or int(record.get("step", -1)) > step):
            log.warning("%s: dropping checkpoints/best of step %s, past the resumed step %d",
                        self.rundir, None if record is None else record.get("step"), step)
            gone = self.path.with_name(f".{BEST_CHECKPOINT}.old-prev")  # where replace_dir clears leftovers
            shutil.rmtree(gone, ignore_errors=True)
            self.path.rename(gone)
            shutil.rmtree(gone, ignore_errors=True)
