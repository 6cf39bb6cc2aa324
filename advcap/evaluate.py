"""Evaluation: captions of clean and attacked images → BLEU-1…4 per split and condition (`advcap eval`).

Conditions (`eval.conditions`; parsed by `advcap.config.parse_condition`):

    clean           the images as they are
    fgsm            FGSM at `attack.epsilon` against the evaluated model, ascending the loss of the image's
                    first reference caption
    fgsm@<ε>        the same at ε (an ε sweep)
    pgd             white-box L∞ PGD at `attack.epsilon` (`eval.pgd_steps` × `eval.pgd_step_size`, no random
                    start, so it is deterministic); the target is the first reference, or with
                    `eval.pgd_target: clean_caption` the model's own clean caption (an attacker without labels)
    transfer-fgsm   FGSM at `attack.epsilon` crafted on another run's model (`eval.transfer_from`), fed to this one
    blind           all-zero images: the score of a captioner that does not look, the floor to read others against

Attacks run on the model in eval() mode and ascend the summed token cross-entropy (any positive scale
of the loss gives the same sign, hence the same FGSM/PGD images). Captions are generated in batches
(greedy unless `eval.num_beams` > 1, at most `eval.max_new_tokens`, with the key-value cache).

Distribution: every rank reads its own batches of the split (`EvalStream` deals global batches
round-robin, and an image lands in the same batch whatever the world size) and runs generation and
attacks on the bare captioner, without collectives. The per-image results are gathered once per split
and ordered by (global batch, position), so the metrics are the same with any number of ranks.

Outputs in the run directory (main process, under the run's lock, each file atomic): `predictions.jsonl`
(one line per image and split: image_id, split, references, captions per condition), then `metrics.json`,
the one record of the evaluation: `"metrics"` `{split: {condition: {"bleu1".."bleu4", "images"}}}` together
with the `"settings"` (eval.*) they answer to, the `"images"` evaluated and expected per split, whether
the evaluation was `"partial"`, the digests of the evaluated model(s) and of the predictions file; then
`eval/<split>/<condition>/bleu<n>` scalars in the run's TensorBoard at the run's final step. Each
evaluation replaces the previous files; a stopped or failed one writes nothing.

A split whose shards cannot all be read is an error (naming the shortfall), unless `eval.allow_partial`
says otherwise; the record then says `"partial": true` and the report flags it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from advcap.bleu import corpus_bleu_scores
from advcap.config import EVAL_SPLITS, Config, EvalConfig, config_to_dict, load_config, parse_condition
from advcap.errors import AdvcapError
from advcap.rundir import RunDir, checkpoint_step
from advcap.stopping import StopRequest, Stopped

if TYPE_CHECKING:
    import torch

    from advcap.model import Captioner

log = logging.getLogger(__name__)

SELECTIONS = ("final", "best-val")
RECORD_FORMAT = 2  # metrics.json: one record of metrics and the settings they answer to


@dataclass(frozen=True)
class Condition:
    """One image condition: its name as configured (`fgsm@0.1`), its kind and its ε in [0,1] pixel units."""

    name: str
    kind: str  # clean | fgsm | pgd | blind | transfer-fgsm
    epsilon: Optional[float] = None  # None for clean and blind


@dataclass(frozen=True)
class Generation:
    """How captions are generated."""

    max_new_tokens: int
    num_beams: int = 1


# ---------------------------------------------------------------- loading runs and models


def load_run_config(
    run: str | os.PathLike[str], overrides: Sequence[str] = (), settings: Optional[EvalConfig] = None
) -> Config:
    """The resolved config of a finished run (config.yaml, a finished trainer_state.json, the hf/ export).

    `overrides` (dotted, as on the command line) may change `eval.*` settings only: the model is trained.
    `settings` (an `EvalConfig`), instead of overrides, replaces the whole `eval` section.
    """
    rundir = RunDir(run)
    trained = [o for o in overrides if not o.startswith("eval.")]
    if trained:
        raise AdvcapError(
            f"override {trained[0]!r} is not allowed when evaluating a trained run; only eval.* settings "
            "(e.g. eval.pgd_steps=20 eval.transfer_from=runs/demo/baseline/seed0)"
        )
    if not rundir.exists():
        raise AdvcapError(f"{rundir} is not a run directory (no config.yaml)")
    if not rundir.training_finished():
        raise AdvcapError(
            f"{rundir} is not a finished run (no finished trainer_state.json and hf/ export): "
            "finish training first (advcap train ... --resume latest)"
        )
    if settings is not None and overrides:
        raise AdvcapError("give either eval settings or eval.* overrides, not both")
    cfg = load_config(rundir.config_file, overrides)
    return dataclasses.replace(cfg, eval=settings) if settings is not None else cfg


def hf_dir(model: str | os.PathLike[str]) -> Path:
    """The `hf/` export of a run directory, or `model` itself when it is an export."""
    path = Path(model)
    if (RunDir(path).export_dir / "config.json").is_file():
        return RunDir(path).export_dir
    if (path / "config.json").is_file():
        return path
    raise AdvcapError(f"{path} is neither a finished run (no hf/ export) nor an exported captioner (no config.json)")


def load_model(model: str | os.PathLike[str], device: Any = "cpu") -> tuple[Captioner, Any]:
    """(captioner, tokenizer) from a run directory's `hf/` export or an export directory.

    The captioner is in eval() mode with every parameter frozen (attacks need only ∂loss/∂pixels);
    its image size is the exported ViT's, its normalisation the exported image processor's.
    """
    from advcap.config import ModelConfig
    from advcap.model import build_captioner
    from advcap.tokenizer import load_tokenizer

    export = hf_dir(model)
    tokenizer = load_tokenizer(export)
    try:
        image_size = int(json.loads((export / "config.json").read_text())["encoder"]["image_size"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise AdvcapError(f"{export}/config.json is not a VisionEncoderDecoder config ({err!r})") from None
    captioner = build_captioner(ModelConfig(preset="custom", init_from=str(export)), image_size, tokenizer)
    captioner.eval().requires_grad_(False)
    return captioner.to(device), tokenizer


# ---------------------------------------------------------------- conditions and labels


def resolve_conditions(names: Sequence[str], cfg: Config) -> list[Condition]:
    """Parse condition names; ε defaults to `attack.epsilon`. Raises AdvcapError for unknown or repeated ones."""
    if not names:
        raise AdvcapError("no eval condition given")
    conditions = []
    for name in names:
        kind, epsilon = parse_condition(name)
        if kind in ("fgsm", "pgd", "transfer-fgsm") and epsilon is None:
            epsilon = cfg.attack.epsilon
        if name in [c.name for c in conditions]:
            raise AdvcapError(f"eval condition {name!r} is given twice")
        conditions.append(Condition(name, kind, epsilon))
    return conditions


def caption_labels(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Generated ids (B,T) with the start token in column 0 → labels (B,T-1) for `Captioner.forward`:
    the tokens after the start token up to and including the first EOS, -100 after it."""
    labels = ids[:, 1:].clone()
    is_eos = labels == eos_id
    after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    labels[after_first_eos] = -100
    return labels


def reference_labels(tokenizer: Any, captions: Sequence[str], max_tokens: int) -> torch.Tensor:
    """Captions → labels (B,L) as the loader makes them (tokens + EOS, at most `max_tokens`, -100 padding)."""
    import torch

    from advcap.data.loader import Tokenize

    tokenize = Tokenize(tokenizer, max_tokens)
    rows = [tokenize(c) for c in captions]
    labels = torch.full((len(rows), max(len(r) for r in rows)), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row)
    return labels


# ---------------------------------------------------------------- captioning one batch


@dataclass
class _Source:
    """A model that crafts transfer attacks: its captioner and tokenizer."""

    captioner: Captioner
    tokenizer: Any


@dataclass
class BatchCaptioner:
    """Captions a batch of images under each condition (no collectives: one rank's work)."""

    captioner: Captioner
    tokenizer: Any
    generation: Generation
    pgd_steps: int = 10
    pgd_step_size: float = 0.0125
    pgd_target: str = "reference"
    max_caption_tokens: int = 32
    transfer: Optional[_Source] = None

    def generate(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) in [0,1] → generated ids (B,T), start token first."""
        return self.captioner.generate(
            pixels, max_new_tokens=self.generation.max_new_tokens, num_beams=self.generation.num_beams, use_cache=True
        )

    def __call__(
        self, pixels: torch.Tensor, labels: torch.Tensor, references: Sequence[Sequence[str]], conditions: Sequence[Condition]
    ) -> dict[str, list[str]]:
        """Captions per condition name for images (B,3,S,S) in [0,1] whose first references are `labels` (B,L)."""
        from advcap.attacks import fgsm, pgd
        from advcap.model import decode_captions

        clean_ids = None

        def clean() -> torch.Tensor:
            nonlocal clean_ids
            if clean_ids is None:
                clean_ids = self.generate(pixels)
            return clean_ids

        def loss_of(model: Captioner, target: torch.Tensor):
            return lambda images: model(images, target)

        captions = {}
        for condition in conditions:
            kind, eps = condition.kind, condition.epsilon
            if kind == "clean":
                ids = clean()
            elif kind == "blind":
                ids = self.generate(pixels.new_zeros(pixels.shape))
            elif kind == "fgsm":
                ids = self.generate(fgsm(loss_of(self.captioner, labels), pixels, eps))
            elif kind == "pgd":
                target = labels if self.pgd_target == "reference" else caption_labels(clean(), self.tokenizer.eos_token_id)
                images = pgd(loss_of(self.captioner, target), pixels, eps, self.pgd_step_size, self.pgd_steps, random_start=False)
                ids = self.generate(images)
            elif kind == "transfer-fgsm":
                source = self.transfer
                target = reference_labels(source.tokenizer, [r[0] for r in references], self.max_caption_tokens)
                ids = self.generate(fgsm(loss_of(source.captioner, target.to(pixels.device)), pixels, eps))
            else:  # parse_condition admits nothing else
                raise AssertionError(kind)
            captions[condition.name] = decode_captions(self.tokenizer, ids)
        return captions


# ---------------------------------------------------------------- evaluating splits


def _caption_split(
    batch_captioner: BatchCaptioner, cfg: Config, manifest: Any, split: str, conditions: Sequence[Condition],
    accelerator: Any, stop: StopRequest,
) -> list[dict]:
    """This rank's per-image records of one split: its batches of `EvalStream`, captioned under every condition.

    Raises Stopped before the next batch once a stop is requested. The ranks need not agree on the batch:
    the first to exit ends the job (the launcher stops the others), and nothing partial was written.
    """
    from tqdm.auto import tqdm

    from advcap.data.loader import EvalStream, make_loader

    stream = EvalStream(
        manifest, split, batch_captioner.tokenizer, cfg.data.image_size, cfg.data.max_caption_tokens,
        cfg.eval.batch_size, accelerator.process_index, accelerator.num_processes,
        limit=cfg.eval.train_subset_images if split == "train" else None,
    )
    records = []
    device = accelerator.device
    batches = tqdm(
        make_loader(stream, cfg.data.workers), total=len(stream.batch_indices()), unit="batch",
        desc=f"eval {split}", disable=not accelerator.is_main_process,
    )
    for batch in batches:
        if stop.requested:
            raise Stopped(f"evaluation stopped on request during the {split} split; nothing of it was written",
                          progress=False)
        captions = batch_captioner(batch["pixels"].to(device), batch["labels"].to(device), batch["references"], conditions)
        for position, (image_id, references) in enumerate(zip(batch["image_ids"], batch["references"])):
            records.append({
                "image_id": image_id,
                "split": split,
                "references": list(references),
                "captions": {name: texts[position] for name, texts in captions.items()},
                "batch_index": int(batch["batch_index"]),
                "position": position,
            })
    return records


def _gather(accelerator: Any, records: list[dict], expected: int, split: str, allow_partial: bool) -> list[dict]:
    """Every rank's records, on every rank, in the split's global order (batch, position in batch).

    Every rank sees the same gathered list, so they all take the same decision on a shortfall: an error
    unless `allow_partial` (then a warning; the record says partial).
    """
    from accelerate.utils import gather_object

    gathered = sorted(gather_object(records), key=lambda r: (r["batch_index"], r["position"]))
    ids = [r["image_id"] for r in gathered]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"eval {split}: some images were captioned twice (ranks overlap)")
    if not gathered:
        raise AdvcapError(f"eval {split}: no image could be read")
    if len(ids) != expected:
        shortfall = (f"eval {split}: {len(ids)} of the {expected} images the manifest lists could be read "
                     "(missing or corrupt shards or samples; see the warnings above, and `advcap verify`)")
        if not allow_partial:
            raise AdvcapError(shortfall + ": nothing written. Repair the shards, or set eval.allow_partial=true "
                              "to score the images that could be read (the report then flags the run)")
        log.warning("%s: scoring those only (eval.allow_partial)", shortfall)
    return gathered


def split_metrics(records: Sequence[dict], conditions: Sequence[str]) -> dict[str, dict[str, float]]:
    """{condition: {"bleu1".."bleu4", "images"}} of one split's records (each with references and captions)."""
    references = [r["references"] for r in records]
    metrics = {}
    for name in conditions:
        scores = corpus_bleu_scores([r["captions"][name] for r in records], references)
        metrics[name] = {**scores, "images": len(records)}
    return metrics


def _expected_images(manifest: Any, cfg: Config, split: str) -> int:
    total = manifest.samples(split)
    return min(total, cfg.eval.train_subset_images) if split == "train" else total


def _select_best_val(
    batch_captioner: BatchCaptioner, rundir: RunDir, cfg: Config, manifest: Any, accelerator: Any, stop: StopRequest
) -> dict:
    """Load the kept checkpoint with the best clean val BLEU-4 (ties: the later one) into the captioner.

    Only checkpoints that validate against their manifest are candidates; the others are named and passed over.
    Returns {"weights": "checkpoints/stepNNNNNNNN", "step": N, "val_bleu4": {checkpoint name: BLEU-4}}.
    """
    from advcap.checkpoint import load_checkpoint_weights

    candidates, passed = rundir.valid_checkpoints()
    for skipped in passed:
        log.warning("best-val: passing over %s", skipped)
    if not candidates:
        raise AdvcapError(f"--select best-val: {rundir.checkpoints_dir} holds no valid checkpoint")
    clean = [Condition("clean", "clean")]
    expected = _expected_images(manifest, cfg, "val")
    scores = {}
    for checkpoint in candidates:
        load_checkpoint_weights(batch_captioner.captioner, checkpoint)
        local = _caption_split(batch_captioner, cfg, manifest, "val", clean, accelerator, stop)
        records = _gather(accelerator, local, expected, "val", cfg.eval.allow_partial)
        scores[checkpoint.name] = split_metrics(records, ["clean"])["clean"]["bleu4"]
        log.info("best-val: %s clean val BLEU-4 %.4f", checkpoint.name, scores[checkpoint.name])
    best = max(candidates, key=lambda c: (scores[c.name], c.name))
    load_checkpoint_weights(batch_captioner.captioner, best)
    log.info("best-val: evaluating %s", best)
    return {"weights": f"checkpoints/{best.name}", "step": checkpoint_step(best), "val_bleu4": scores}


def evaluate(
    run: str | os.PathLike[str],
    select: str = "final",
    conditions: Optional[Sequence[str]] = None,
    splits: Optional[Sequence[str]] = None,
    accelerator: Any = None,
    overrides: Sequence[str] = (),
    stop: Optional[StopRequest] = None,
    settings: Optional[EvalConfig] = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluate a finished run: captions on clean and attacked images, BLEU-1…4 per split and condition.

    Args:
        run: the run directory (config.yaml, trainer_state.json, hf/, checkpoints/).
        select: "final" evaluates the hf/ export (the last step); "best-val" the kept checkpoint with the
            best clean BLEU-4 on the val split.
        conditions: condition names (see the module docstring); default `eval.conditions` of the run.
        splits: any of train | val | test; default `eval.splits`. The train split is limited to its
            first `eval.train_subset_images` images.
        accelerator: an `accelerate.Accelerator`; default a new one (CPU when there is no CUDA).
        overrides: dotted `eval.*` overrides of the run's config (e.g. "eval.pgd_target=clean_caption").
        stop: checked before every batch; default the stop file of $ADVCAP_STOP_FILE (see advcap.stopping).
        settings: an `EvalConfig` used instead of the run's `eval` section (the ablation's, when only
            evaluation settings changed since training); not together with `overrides`.
    Returns:
        {split: {condition: {"bleu1", "bleu2", "bleu3", "bleu4", "images"}}}, the same on every rank;
        the main process also writes predictions.jsonl, the metrics.json record and TensorBoard scalars.
    Raises:
        AdvcapError: an unfinished run, unknown selection/split/condition, transfer-fgsm without
            `eval.transfer_from`, missing shards, images that could not be read (unless eval.allow_partial),
            the run directory held by another process.
        Stopped: a stop was requested; no output was written.
    """
    from advcap.data.manifest import load_manifest

    rundir = RunDir(run)
    stop = stop or StopRequest()
    cfg = load_run_config(rundir.path, overrides, settings)
    if select not in SELECTIONS:
        raise AdvcapError(f"--select {select!r} is not allowed; expected one of {' | '.join(SELECTIONS)}")
    # The eval settings these metrics answer to (recorded; the ablation re-evaluates a run when they change).
    settings_used = config_to_dict(cfg)["eval"]
    settings_used.update({"conditions": list(conditions)} if conditions else {})
    settings_used.update({"splits": list(splits)} if splits else {})
    conds = resolve_conditions(list(conditions or cfg.eval.conditions), cfg)
    splits = _check_splits(list(splits or cfg.eval.splits))
    needs_transfer = any(c.kind == "transfer-fgsm" for c in conds)
    if needs_transfer and not cfg.eval.transfer_from:
        raise AdvcapError(
            f"condition transfer-fgsm needs eval.transfer_from (the run whose model crafts the images), "
            f"but neither {rundir.config_file} nor the overrides set one"
        )
    manifest = load_manifest(cfg.data.shards)
    if accelerator is None:
        from advcap.distributed import make_accelerator

        # The run's precision: after training in the same process, Accelerate's state must not change.
        accelerator = make_accelerator(cfg.train.precision, cfg.dist.timeout_s)
    from advcap.distributed import Heartbeat, collectives_guarded

    heartbeat = Heartbeat(accelerator.process_index, accelerator.num_processes)
    hint = "Nothing of this evaluation was written: run it again."
    try:
        with rundir.held(), collectives_guarded(heartbeat, f"the evaluation of {rundir}", cfg.dist.timeout_s, hint):
            return _evaluate(rundir, cfg, select, conds, splits, settings_used, needs_transfer, manifest, accelerator,
                             stop, overrides, heartbeat)
    finally:
        heartbeat.close()


def _evaluate(rundir: RunDir, cfg: Config, select: str, conds: list[Condition], splits: list[str], settings_used: dict,
              needs_transfer: bool, manifest: Any, accelerator: Any, stop: StopRequest, overrides: Sequence[str],
              heartbeat: Any) -> dict:
    """The evaluation proper, with the run directory held (see evaluate)."""
    from accelerate.utils import gather_object

    from advcap.distributed import agree

    started = time.perf_counter()
    batch_captioner = _batch_captioner(rundir.path, cfg, needs_transfer, accelerator.device)
    final_step = int(rundir.training_state().get("step", 0))
    evaluated: dict[str, Any] = {"select": select, "weights": "hf", "step": final_step}
    if select == "best-val":
        evaluated.update(_select_best_val(batch_captioner, rundir, cfg, manifest, accelerator, stop))

    metrics, records, images, per_rank = {}, [], {}, {}
    names = [c.name for c in conds]
    for split in splits:
        log.info("evaluating %s on %s: %s", rundir, split, ", ".join(names))
        heartbeat.beat(f"evaluating {split}")
        local = _caption_split(batch_captioner, cfg, manifest, split, conds, accelerator, stop)
        heartbeat.beat(f"gathering {split}")
        per_rank[split] = gather_object([len(local)])
        expected = _expected_images(manifest, cfg, split)
        split_records = _gather(accelerator, local, expected, split, cfg.eval.allow_partial)
        metrics[split] = split_metrics(split_records, names)
        images[split] = {"evaluated": len(split_records), "expected": expected}
        records += split_records

    record = {
        "format": RECORD_FORMAT,
        "metrics": metrics,
        "settings": settings_used,
        "images": images,
        "partial": any(v["evaluated"] != v["expected"] for v in images.values()),
        **evaluated,
        "model_sha256": rundir.model_digest(),
        "transfer_from": cfg.eval.transfer_from if needs_transfer else None,
        "transfer_model_sha256": RunDir(cfg.eval.transfer_from).model_digest() if needs_transfer else None,
        "conditions": {c.name: {"kind": c.kind, "epsilon": c.epsilon} for c in conds},
        "generation": {"max_new_tokens": cfg.eval.max_new_tokens, "num_beams": cfg.eval.num_beams},
        "overrides": list(overrides),
        "world_size": accelerator.num_processes,
        "images_per_rank": per_rank,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    def write() -> None:
        write_outputs(rundir, records, record)
        _log_tensorboard(rundir, metrics, final_step)

    agree(f"writing the evaluation of {rundir}", write, main_only=True)
    return metrics


def _batch_captioner(run: Path, cfg: Config, needs_transfer: bool, device: Any) -> BatchCaptioner:
    """The run's exported model (and the transfer source's, if needed) with the run's eval settings."""
    captioner, tokenizer = load_model(run, device)
    transfer = None
    if needs_transfer:
        source, source_tokenizer = load_model(cfg.eval.transfer_from, device)
        if source.image_size != captioner.image_size:
            raise AdvcapError(
                f"eval.transfer_from={cfg.eval.transfer_from} takes {source.image_size} px images, "
                f"this run {captioner.image_size} px"
            )
        transfer = _Source(source, source_tokenizer)
    return BatchCaptioner(
        captioner, tokenizer, Generation(cfg.eval.max_new_tokens, cfg.eval.num_beams),
        pgd_steps=cfg.eval.pgd_steps, pgd_step_size=cfg.eval.pgd_step_size, pgd_target=cfg.eval.pgd_target,
        max_caption_tokens=cfg.data.max_caption_tokens, transfer=transfer,
    )


def _check_splits(splits: list[str]) -> list[str]:
    for i, split in enumerate(splits):
        if split not in EVAL_SPLITS:
            raise AdvcapError(f"eval split {split!r} is not allowed; expected one of {' | '.join(EVAL_SPLITS)}")
        if split in splits[:i]:
            raise AdvcapError(f"eval split {split!r} is given twice")
    if not splits:
        raise AdvcapError("no eval split given")
    return splits


# ---------------------------------------------------------------- outputs


def write_outputs(rundir: RunDir, records: Sequence[dict], record: dict) -> None:
    """predictions.jsonl, then metrics.json (the record, written last), each replaced atomically."""
    keys = ("image_id", "split", "references", "captions")
    lines = "".join(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n" for r in records)
    rundir.write_evaluation(lines, record)
    log.info("wrote %s and %s", rundir.predictions_file, rundir.metrics_file)


def _log_tensorboard(rundir: RunDir, metrics: dict, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(rundir.tensorboard_dir))
    try:
        for split, by_condition in metrics.items():
            for condition, values in by_condition.items():
                for n in range(1, 5):
                    writer.add_scalar(f"eval/{split}/{condition}/bleu{n}", values[f"bleu{n}"], step)
    finally:
        writer.close()


# ---------------------------------------------------------------- single images: caption and attack figure


def load_image(path: str | os.PathLike[str], image_size: int) -> torch.Tensor:
    """An image file → (1,3,S,S) float pixels in [0,1], preprocessed as the loader does (RGB, bilinear S×S)."""
    import torch

    from advcap.data.images import BadImage, to_square_pixels

    try:
        pixels = to_square_pixels(Path(path).read_bytes(), image_size)
    except (OSError, BadImage) as err:
        raise AdvcapError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0).float().div(255.0)


def _inference_model(model: str | os.PathLike[str]) -> tuple[Captioner, Any, Generation, float]:
    """(captioner, tokenizer, generation settings, default ε) for a run dir (its config) or a bare export."""
    from advcap.config import AttackConfig
    from advcap.model import DEFAULT_MAX_NEW_TOKENS

    captioner, tokenizer = load_model(model)
    rundir = RunDir(model)
    if rundir.export_dir.is_dir() and rundir.exists():
        cfg = rundir.config()
        return captioner, tokenizer, Generation(cfg.eval.max_new_tokens, cfg.eval.num_beams), cfg.attack.epsilon
    return captioner, tokenizer, Generation(DEFAULT_MAX_NEW_TOKENS), AttackConfig().epsilon


def caption_image(image: str | os.PathLike[str], model: str | os.PathLike[str]) -> str:
    """Caption one image file with a run's (or an export's) captioner, with the run's generation settings."""
    from advcap.model import decode_captions

    captioner, tokenizer, generation, _ = _inference_model(model)
    pixels = load_image(image, captioner.image_size)
    return decode_captions(tokenizer, BatchCaptioner(captioner, tokenizer, generation).generate(pixels))[0]


def attack_image(
    image: str | os.PathLike[str], model: str | os.PathLike[str], out: str | os.PathLike[str], epsilon: Optional[float] = None
) -> tuple[str, str]:
    """FGSM on one image, targeting the model's own clean caption; writes the figure `out`.

    The figure is original | adversarial | amplified difference (grey = unchanged), with the clean and the
    adversarial caption under the first two. ε defaults to the run's `attack.epsilon`.
    Returns (clean caption, adversarial caption).
    """
    from advcap.attacks import fgsm
    from advcap.model import decode_captions

    captioner, tokenizer, generation, default_epsilon = _inference_model(model)
    epsilon = default_epsilon if epsilon is None else epsilon
    if not 0 <= epsilon <= 1:
        raise AdvcapError(f"--epsilon {epsilon} is not allowed; expected a number in [0, 1] (pixel units)")
    pixels = load_image(image, captioner.image_size)
    batch_captioner = BatchCaptioner(captioner, tokenizer, generation)
    clean_ids = batch_captioner.generate(pixels)
    target = caption_labels(clean_ids, tokenizer.eos_token_id)
    adversarial = fgsm(lambda x: captioner(x, target), pixels, epsilon)
    clean_caption = decode_captions(tokenizer, clean_ids)[0]
    adv_caption = decode_captions(tokenizer, batch_captioner.generate(adversarial))[0]
    save_attack_figure(out, pixels[0], adversarial[0], epsilon, clean_caption, adv_caption)
    return clean_caption, adv_caption


FIGURE_INCHES = (9.0, 3.9)  # three square panels side by side, captions below
FIGURE_DPI = 100


def save_attack_figure(
    out: str | os.PathLike[str], clean: torch.Tensor, adversarial: torch.Tensor, epsilon: float,
    clean_caption: str, adv_caption: str,
) -> Path:
    """Write a PNG (900×390 px): clean | adversarial | amplified difference, captions under the panels.

    Args:
        clean, adversarial: (3,S,S) pixels in [0,1].
    """
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from advcap.tblog import amplified_difference

    panels = [clean, adversarial, amplified_difference(clean, adversarial, epsilon)]
    titles = ["original", f"adversarial (FGSM, ε={epsilon:g})", "difference (amplified, grey = 0)"]
    texts = [f"clean: {clean_caption}", f"adversarial: {adv_caption}", f"|x' - x| ≤ {epsilon:g} in [0,1] pixel units"]
    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    width, height = FIGURE_INCHES
    side = 0.9 * width / 3  # inches per panel
    for i, (panel, title, text) in enumerate(zip(panels, titles, texts)):
        ax = figure.add_axes([(i + 0.05) / 3, 1 - (0.35 + side) / height, side / width, side / height])
        ax.imshow(panel.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
        ax.text(0.5, -0.04, textwrap.fill(text, 42), transform=ax.transAxes, ha="center", va="top", fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(out), dpi=FIGURE_DPI)
    return out


# ---------------------------------------------------------------- command line


def add_cli(subparsers: Any) -> None:
    """Register `advcap eval`, `advcap caption` and `advcap attack`."""
    p = subparsers.add_parser(
        "eval",
        help="caption clean and attacked images of a finished run, BLEU-1..4 into metrics.json",
        description="The same entry point `accelerate launch launch/eval.py RUN_DIR` runs; ranks split the images.",
    )
    p.add_argument("run", help="a finished run directory (runs/<dataset>/<phase>/seed<k>)")
    p.add_argument("--select", choices=SELECTIONS, default="final",
                   help="final: the hf/ export; best-val: the kept checkpoint with the best clean val BLEU-4")
    p.add_argument("--conditions", nargs="+", default=None, metavar="CONDITION",
                   help="clean fgsm pgd blind transfer-fgsm fgsm@<epsilon> (default: the run's eval.conditions)")
    p.add_argument("--splits", nargs="+", default=None, metavar="SPLIT",
                   help=f"{' '.join(EVAL_SPLITS)} (default: the run's eval.splits)")
    p.add_argument("overrides", nargs="*",
                   help="eval.* overrides of the run's config, e.g. eval.pgd_steps=20 eval.pgd_target=clean_caption")
    p.set_defaults(func=_cmd_eval)

    p = subparsers.add_parser("caption", help="print the caption a trained model gives an image")
    p.add_argument("image", help="an image file (any format Pillow reads)")
    p.add_argument("--model", required=True, help="a finished run directory or an hf/ export directory")
    p.set_defaults(func=_cmd_caption)

    p = subparsers.add_parser(
        "attack", help="FGSM one image: figure of original | adversarial | amplified difference with both captions"
    )
    p.add_argument("image", help="an image file (any format Pillow reads)")
    p.add_argument("--model", required=True, help="a finished run directory or an hf/ export directory")
    p.add_argument("--out", required=True, help="output figure (PNG)")
    p.add_argument("--epsilon", type=float, default=None,
                   help="L∞ radius in [0,1] pixel units (default: the run's attack.epsilon)")
    p.set_defaults(func=_cmd_attack)


def _cmd_eval(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    # `--conditions a b eval.x=1` would hand the override to --conditions: anything with "=" is an override.
    overrides = list(args.overrides)
    conditions, splits = args.conditions, args.splits
    if conditions:
        overrides += [c for c in conditions if "=" in c]
        conditions = [c for c in conditions if "=" not in c]
    if splits:
        overrides += [c for c in splits if "=" in c]
        splits = [c for c in splits if "=" not in c]
    metrics = evaluate(args.run, select=args.select, conditions=conditions, splits=splits, overrides=overrides)
    if PartialState().is_main_process:
        print(format_metrics(metrics))


def format_metrics(metrics: dict) -> str:
    """A plain-text table of `{split: {condition: {...}}}`."""
    rows = [f"{'split':<6} {'condition':<16} {'BLEU-1':>7} {'BLEU-2':>7} {'BLEU-3':>7} {'BLEU-4':>7} {'images':>7}"]
    for split, by_condition in metrics.items():
        for condition, m in by_condition.items():
            scores = " ".join(f"{m[f'bleu{n}']:7.4f}" for n in range(1, 5))
            rows.append(f"{split:<6} {condition:<16} {scores} {m['images']:>7d}")
    return "\n".join(rows)


def _cmd_caption(args: argparse.Namespace) -> None:
    print(caption_image(args.image, args.model))


def _cmd_attack(args: argparse.Namespace) -> None:
    clean, adversarial = attack_image(args.image, args.model, args.out, args.epsilon)
    print(f"clean:       {clean}\nadversarial: {adversarial}\nfigure:      {args.out}")
