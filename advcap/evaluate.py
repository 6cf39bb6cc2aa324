"""Evaluation: captions of clean and attacked images (`advcap.conditions`) → the paper's BLEU and the COCO
caption metrics (`advcap.metrics`) per split and condition, an attack audit (`advcap.audit`), one record.

Distribution: every rank reads its own batches of the split (`EvalStream` deals global batches
round-robin, and an image lands in the same batch whatever the world size) and runs generation and
attacks on the bare captioner, without collectives. The per-image results are gathered once per split
and ordered by (global batch, position), so the metrics are the same with any number of ranks.

Outputs in the run directory (main process, under the run's lock, each file atomic): the captions in the
COCO results format, `coco/<split>/<condition>.json` (`[{"image_id", "caption"}]`), with the references as
a COCO caption annotation file, `coco/<split>/references.json`, so any COCO caption tool scores them as
they are; `predictions.jsonl` (one line per image and split: image_id, split, references, captions per
condition, targets of the targeted attack); then `metrics.json`, the one record of the evaluation:
`"metrics"` `{split: {condition: {"bleu1".."bleu4", "images", "coco_bleu1".."coco_bleu4", "meteor",
"rouge_l", "cider"[, "spice"][, "target_success", "target_bleu4", "target_images"]}}}` together with the
`"settings"` (eval.*) they answer to, which tokenizer each number uses (`"metric_notes"`), the `"images"`
evaluated and expected per split, whether the evaluation was `"partial"`, the `"audit"`, and the digests of
the evaluated model(s) and of the predictions file; then the scalars, at the run's final step, to the run's
`log.trackers` (advcap.tracking: TensorBoard's `eval/<split>/<condition>/<metric>`, a new MLflow run, ...). Each
evaluation replaces the previous files; a stopped or failed one writes nothing.

A split whose shards cannot all be read is an error (naming the shortfall), unless `eval.allow_partial`
says otherwise; the record then says `"partial": true` and the report flags it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from advcap.conditions import BatchCaptioner, Condition, Generation, PGDSettings, Source, resolve_conditions
from advcap.config import EVAL_SPLITS, Config, DataConfig, EvalConfig, config_to_dict, epsilon_text, load_config
from advcap.data.location import runs_commands
from advcap.errors import AdvcapError
from advcap.inference import load_model
from advcap.metrics import COCO_TOKENS, PAPER_TOKENS, corpus_bleu_scores, tokenize
from advcap.rundir import RunDir, checkpoint_step
from advcap.stopping import StopRequest, Stopped
from advcap.tracking import check_trackers, log_with

log = logging.getLogger(__name__)

SELECTIONS = ("final", "best-val")
RECORD_FORMAT = 3  # metrics.json: one record of metrics (paper's and COCO's) and the settings they answer to


# ---------------------------------------------------------------- loading runs


def load_run_config(
    run: str | os.PathLike[str], overrides: Sequence[str] = (), settings: Optional[EvalConfig] = None,
    data: Optional[DataConfig] = None,
) -> Config:
    """The resolved config of a finished run (config.yaml, a finished trainer_state.json, the hf/ export).

    `overrides` (dotted, as on the command line) may change `eval.*` settings and where the data is read
    from (`data.shards`, `data.samples.*`, `data.fetch_retries`) only: the model is trained.
    `settings` (an `EvalConfig`), instead of overrides, replaces the whole `eval` section; `data`, the
    caller's own data section (the ablation runner's), replaces the run's.

    A `pipe:` shard source is a shell command: one read from a run directory's config.yaml (which may come
    from anyone) is refused unless restated in `overrides` or `data`, so evaluating a run runs no command
    the user did not give.
    """
    rundir = RunDir(run)
    trained = [o for o in overrides if not o.startswith(("eval.", *DATA_LOCATION_KEYS))]
    if trained:
        raise AdvcapError(
            f"override {trained[0]!r} is not allowed when evaluating a trained run; only eval.* settings "
            "(e.g. eval.pgd_steps=20 eval.transfer_from=runs/demo/baseline/seed0) and where the shards are "
            "(data.shards, data.samples.*, data.fetch_retries)"
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
    if data is not None:
        cfg = dataclasses.replace(cfg, data=data)
    elif runs_commands(cfg.data.shards) and not any(o.startswith("data.shards=") for o in overrides):
        raise AdvcapError(
            f"{rundir.config_file}: data.shards runs a shell command ({cfg.data.shards!r}); advcap does not run "
            f"commands read from a run directory: restate it, e.g. advcap eval {run} 'data.shards=…'"
        )
    return dataclasses.replace(cfg, eval=settings) if settings is not None else cfg


DATA_LOCATION_KEYS = ("data.shards=", "data.samples.", "data.fetch_retries=")


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
        transfer = Source(source, source_tokenizer)
    return BatchCaptioner(
        captioner, tokenizer, Generation(cfg.eval.max_new_tokens, cfg.eval.num_beams), PGDSettings.of(cfg),
        target_caption=cfg.eval.target_caption, max_caption_tokens=cfg.data.max_caption_tokens, transfer=transfer,
    )


# ---------------------------------------------------------------- evaluating splits

CaptionBatch = Callable[[Any, Any, Sequence[Sequence[str]], int], tuple[dict, dict]]


def _caption_split(caption_batch: CaptionBatch, tokenizer: Any, cfg: Config, manifest: Any, split: str,
                   accelerator: Any, stop: StopRequest, limit: Optional[int] = None) -> list[dict]:
    """This rank's per-image records of one split: its batches of `EvalStream`, captioned by `caption_batch`
    (pixels, labels, references, global batch index) → (captions per condition, targets per condition).

    Raises Stopped before the next batch once a stop is requested. The ranks need not agree on the batch:
    the first to exit ends the job (the launcher stops the others), and nothing partial was written.
    """
    from tqdm.auto import tqdm

    from advcap.data.loader import EvalStream, make_loader

    if limit is None and split == "train":
        limit = cfg.eval.train_subset_images
    stream = EvalStream(
        manifest, split, tokenizer, cfg.data.image_size, cfg.data.max_caption_tokens,
        cfg.eval.batch_size, accelerator.process_index, accelerator.num_processes, limit=limit,
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
        index = int(batch["batch_index"])
        captions, targets = caption_batch(batch["pixels"].to(device), batch["labels"].to(device), batch["references"],
                                          index)
        for position, (image_id, references) in enumerate(zip(batch["image_ids"], batch["references"])):
            record = {
                "image_id": image_id,
                "split": split,
                "references": list(references),
                # (the audit's condition lists cover only the images it audits: the batch's first ones)
                "captions": {name: texts[position] for name, texts in captions.items() if position < len(texts)},
                "batch_index": index,
                "position": position,
            }
            if targets:
                record["targets"] = {name: texts[position] for name, texts in targets.items()}
            records.append(record)
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


def split_metrics(records: Sequence[dict], conditions: Sequence[str], coco: bool = False) -> dict[str, dict]:
    """{condition: {"bleu1".."bleu4", "images"[, COCO metrics][, targeted figures]}} of one split's records.

    The paper's BLEU (nltk, [a-z0-9]+ tokens) always; the COCO caption metrics (PTB tokenizer) with `coco`.
    A targeted condition also scores its captions against its targets: `target_success` (the share of
    images whose caption is the target, word for word) and `target_bleu4`, over the `target_images` whose
    target is not one of their own references.
    """
    references = [r["references"] for r in records]
    metrics = {}
    for name in conditions:
        captions = [r["captions"][name] for r in records]
        metrics[name] = {**corpus_bleu_scores(captions, references), "images": len(records)}
        targets = [r.get("targets", {}).get(name) for r in records]
        if any(t is not None for t in targets):
            metrics[name].update(_target_scores(captions, targets, references))
    if coco:
        from advcap.metrics import coco_scores

        for name, scores in coco_scores({n: [r["captions"][n] for r in records] for n in conditions},
                                        references).items():
            metrics[name].update(scores)
    return metrics


def _target_scores(captions: Sequence[str], targets: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    usable = [(c, t) for c, t, refs in zip(captions, targets, references)
              if t is not None and tokenize(t) not in [tokenize(r) for r in refs]]
    if not usable:
        return {"target_success": None, "target_bleu4": None, "target_images": 0}
    hits = sum(tokenize(c) == tokenize(t) for c, t in usable)
    return {
        "target_success": hits / len(usable),
        "target_bleu4": corpus_bleu_scores([c for c, _ in usable], [[t] for _, t in usable])["bleu4"],
        "target_images": len(usable),
    }


def _expected_images(manifest: Any, cfg: Config, split: str) -> int:
    total = manifest.samples(split)
    return min(total, cfg.eval.train_subset_images) if split == "train" else total


def _select_best_val(
    batch_captioner: BatchCaptioner, rundir: RunDir, cfg: Config, manifest: Any, accelerator: Any, stop: StopRequest
) -> dict:
    """Load the best-validated weights into the captioner: checkpoints/best when the run validated while
    training (`train.keep_best`); otherwise the kept checkpoint with the best clean val BLEU-4 (ties: the later).

    Only checkpoints that validate against their manifest are candidates; the others are named and passed over.
    Returns {"weights": "checkpoints/…", "step": N, and "best" (best.json's metric, value, figures) or
    "val_bleu4" ({checkpoint name: BLEU-4})}.
    """
    from advcap.checkpoint import load_checkpoint_weights
    from advcap.validation import BestCheckpoint

    kept = BestCheckpoint(rundir, cfg.train.keep_best)
    if kept.record() is not None:
        record = kept.load_into(batch_captioner.captioner)
        log.info("best-val: evaluating %s (step %s, best %s %.4g while training)", kept.path, record["step"],
                 record["metric"], record["value"])
        return {"weights": f"checkpoints/{kept.path.name}", "step": int(record["step"]),
                "best": {k: record[k] for k in ("metric", "value", "figures")}}
    candidates, passed = rundir.valid_checkpoints()
    for skipped in passed:
        log.warning("best-val: passing over %s", skipped)
    if not candidates:
        raise AdvcapError(f"--select best-val: {rundir.checkpoints_dir} holds no valid checkpoint")
    clean = [Condition("clean", "clean")]
    expected = _expected_images(manifest, cfg, "val")
    caption_batch = lambda p, l, r, i: batch_captioner(p, l, r, clean, i)  # noqa: E731
    scores = {}
    for checkpoint in candidates:
        load_checkpoint_weights(batch_captioner.captioner, checkpoint)
        local = _caption_split(caption_batch, batch_captioner.tokenizer, cfg, manifest, "val", accelerator, stop)
        records = _gather(accelerator, local, expected, "val", cfg.eval.allow_partial)
        scores[checkpoint.name] = split_metrics(records, ["clean"])["clean"]["bleu4"]
        log.info("best-val: %s clean val BLEU-4 %.4f", checkpoint.name, scores[checkpoint.name])
    best = max(candidates, key=lambda c: (scores[c.name], c.name))
    load_checkpoint_weights(batch_captioner.captioner, best)
    log.info("best-val: evaluating %s", best)
    return {"weights": f"checkpoints/{best.name}", "step": checkpoint_step(best), "val_bleu4": scores}


def _audit_conditions(cfg: Config) -> dict[str, dict]:
    """The attack audit's conditions (advcap.audit), none when `eval.audit` is off."""
    from advcap.audit import audit_conditions

    return audit_conditions(cfg.attack.epsilon, cfg.eval.pgd_steps, cfg.eval.pgd_restarts) if cfg.eval.audit else {}


AUDIT = "audit:"  # prefix of the audit's captions in a record while its split is captioned


def _with_audit(caption_batch: CaptionBatch, bc: BatchCaptioner, conds: Sequence[Condition], audit: dict[str, dict],
                limit: int, batch_size: int) -> CaptionBatch:
    """`caption_batch` that also captions the first `limit` images of the split under the attack audit's
    conditions (`audit`, advcap.audit), under names prefixed AUDIT; a condition the evaluation has too is
    its captions, not a second attack (advcap.audit.shared_with_evaluation)."""
    from advcap.audit import caption_audit_batch, shared_with_evaluation

    shared = shared_with_evaluation(audit, conds, bc.pgd)

    def caption(pixels: Any, labels: Any, references: Sequence[Sequence[str]], index: int) -> tuple[dict, dict]:
        captions, targets = caption_batch(pixels, labels, references, index)
        audited = max(0, min(len(references), limit - index * batch_size))
        if audited:
            known = {name: captions[source][:audited] for name, source in shared.items()}
            found = caption_audit_batch(bc, pixels[:audited], labels[:audited], audit, index, known)
            captions = {**captions, **{AUDIT + name: texts for name, texts in found.items()}}
        return captions, targets

    return caption


def _take_audit(records: Sequence[dict], split: str, audit: dict[str, dict]) -> dict:
    """The audit's record from the records of its split, whose audit captions are moved out of them."""
    audited = []
    for record in records:
        found = {name: record["captions"].pop(AUDIT + name) for name in audit if AUDIT + name in record["captions"]}
        if found:
            audited.append({"references": record["references"], "captions": found})
    if not audited:
        raise AdvcapError(f"eval {split}: none of the images of the attack audit could be read")
    scores = split_metrics(audited, list(audit))
    # The captions themselves too: the report's checks weigh a difference between two conditions against how
    # much it varies over these images (advcap.audit).
    return {"split": split, "images": len(audited), "conditions": audit,
            "bleu4": {name: s["bleu4"] for name, s in scores.items()},
            "references": [r["references"] for r in audited],
            "captions": {name: [r["captions"][name] for r in audited] for name in audit}}


def evaluate(
    run: str | os.PathLike[str],
    select: str = "final",
    conditions: Optional[Sequence[str]] = None,
    splits: Optional[Sequence[str]] = None,
    accelerator: Any = None,
    overrides: Sequence[str] = (),
    stop: Optional[StopRequest] = None,
    settings: Optional[EvalConfig] = None,
    data: Optional[DataConfig] = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluate a finished run: captions on clean and attacked images, the paper's BLEU and the COCO caption
    metrics per split and condition, and the attack audit.

    Args:
        run: the run directory (config.yaml, trainer_state.json, hf/, checkpoints/).
        select: "final" evaluates the hf/ export (the last step); "best-val" checkpoints/best (the best
            validation while training, `train.keep_best`), or without it the kept checkpoint with the best clean
            val BLEU-4.
        conditions: condition names (see advcap.conditions); default `eval.conditions` of the run.
        splits: any of train | val | test; default `eval.splits`. The train split is limited to its
            first `eval.train_subset_images` images.
        accelerator: an `accelerate.Accelerator`; default a new one (CPU when there is no CUDA) that logs to the
            run's `log.trackers`. A given one logs to the trackers it was made with (`log_with`).
        overrides: dotted `eval.*` overrides of the run's config (e.g. "eval.pgd_target=clean_caption").
        stop: checked before every batch; default the stop file of $ADVCAP_STOP_FILE (see advcap.stopping).
        settings: an `EvalConfig` used instead of the run's `eval` section (the ablation's, when only
            evaluation settings changed since training); not together with `overrides`.
        data: a `DataConfig` used instead of the run's `data` section (the ablation's own; see load_run_config).
    Returns:
        {split: {condition: {...}}} (see the module docstring), the same on every rank; the main process also
        writes the COCO-format files, predictions.jsonl, the metrics.json record and the trackers' scalars.
    Raises:
        AdvcapError: an unfinished run, unknown selection/split/condition, transfer-fgsm without
            `eval.transfer_from`, missing shards, images that could not be read (unless eval.allow_partial),
            the COCO metrics without Java (unless eval.coco_metrics is off), the run directory held by
            another process.
        Stopped: a stop was requested; no output was written.
    """
    from advcap.data.manifest import data_manifest

    rundir = RunDir(run)
    stop = stop or StopRequest()
    cfg = load_run_config(rundir.path, overrides, settings, data)
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
    if cfg.eval.coco_metrics:
        from advcap.metrics import check_coco_ready

        check_coco_ready()  # before any work: a missing Java is said at once
    check_trackers(cfg.log.trackers)
    manifest = data_manifest(cfg.data)
    if accelerator is None:
        from advcap.distributed import make_accelerator

        # The run's precision: after training in the same process, Accelerate's state must not change.
        accelerator = make_accelerator(cfg.train.precision, cfg.dist.timeout_s, log_with(cfg.log.trackers, rundir),
                                       rundir.path)
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
    from advcap.metrics import coco_references, coco_results, spice_unavailable

    started = time.perf_counter()
    bc = _batch_captioner(rundir.path, cfg, needs_transfer, accelerator.device)
    final_step = int(rundir.training_state().get("step", 0))
    evaluated: dict[str, Any] = {"select": select, "weights": "hf", "step": final_step}
    if select == "best-val":
        evaluated.update(_select_best_val(bc, rundir, cfg, manifest, accelerator, stop))

    metrics, records, images, per_rank, files = {}, [], {}, {}, {}
    names = [c.name for c in conds]
    caption_batch = lambda p, l, r, i: bc(p, l, r, conds, i)  # noqa: E731
    audit, audit_conditions = None, _audit_conditions(cfg)
    for split in splits:
        log.info("evaluating %s on %s: %s", rundir, split, ", ".join(names))
        expected = _expected_images(manifest, cfg, split)
        captioner = caption_batch
        if audit_conditions and split == splits[0]:
            log.info("with the attack audit on its first %d images", min(cfg.eval.audit_images, expected))
            captioner = _with_audit(caption_batch, bc, conds, audit_conditions, min(cfg.eval.audit_images, expected),
                                    cfg.eval.batch_size)
        heartbeat.beat(f"evaluating {split}")
        local = _caption_split(captioner, bc.tokenizer, cfg, manifest, split, accelerator, stop)
        heartbeat.beat(f"gathering {split}")
        per_rank[split] = gather_object([len(local)])
        split_records = _gather(accelerator, local, expected, split, cfg.eval.allow_partial)
        if captioner is not caption_batch:
            audit = _take_audit(split_records, split, audit_conditions)
        # Scored once, on the main process (the COCO metrics start Java), and the same figures on every rank.
        metrics[split] = agree(f"scoring {split}", lambda: split_metrics(split_records, names, cfg.eval.coco_metrics),
                               main_only=True)
        images[split] = {"evaluated": len(split_records), "expected": expected}
        records += split_records
        ids = [r["image_id"] for r in split_records]
        files[f"{split}/references.json"] = json.dumps(coco_references(ids, [r["references"] for r in split_records]))
        for name in names:
            files[f"{split}/{name}.json"] = json.dumps(coco_results(ids, [r["captions"][name] for r in split_records]))

    notes = {"bleu1..bleu4": PAPER_TOKENS}
    if cfg.eval.coco_metrics:
        notes["coco_bleu1..coco_bleu4, meteor, rouge_l, cider, spice"] = COCO_TOKENS
        notes["spice"] = spice_unavailable() or "scored"
    record = {
        "format": RECORD_FORMAT,
        "metrics": metrics,
        "settings": settings_used,
        "metric_notes": notes,
        "images": images,
        "partial": any(v["evaluated"] != v["expected"] for v in images.values()),
        **evaluated,
        "model_sha256": rundir.model_digest(),
        "transfer_from": cfg.eval.transfer_from if needs_transfer else None,
        "transfer_model_sha256": RunDir(cfg.eval.transfer_from).model_digest() if needs_transfer else None,
        "epsilon": {"pixels": cfg.attack.epsilon, "per_255": cfg.attack.epsilon * 255,
                    "paper_minus1_1": 2 * cfg.attack.epsilon, "text": epsilon_text(cfg.attack.epsilon)},
        "conditions": {c.name: {"kind": c.kind, "epsilon": c.epsilon} for c in conds},
        "pgd": {"steps": bc.pgd.steps, "step_size": bc.pgd.step(cfg.attack.epsilon), "restarts": bc.pgd.restarts,
                "random_start": bc.pgd.random_start, "target": bc.pgd.target,
                "restart_kept": "per image, the restart with the highest attack loss"},
        "audit": audit,
        "generation": {"max_new_tokens": cfg.eval.max_new_tokens, "num_beams": cfg.eval.num_beams},
        "overrides": list(overrides),
        "world_size": accelerator.num_processes,
        "images_per_rank": per_rank,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    def write() -> None:
        write_outputs(rundir, records, record, files)
        _log_metrics(accelerator, rundir, cfg, metrics, final_step)
        if select == "final":  # the card describes the export, which is the final weights
            _update_model_card(rundir, cfg, record)

    agree(f"writing the evaluation of {rundir}", write, main_only=True)
    return metrics


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


def write_outputs(rundir: RunDir, records: Sequence[dict], record: dict, files: dict[str, str]) -> None:
    """The COCO-format files and predictions.jsonl, then metrics.json (the record, written last)."""
    keys = ("image_id", "split", "references", "captions", "targets")
    lines = "".join(json.dumps({k: r[k] for k in keys if k in r}, ensure_ascii=False) + "\n" for r in records)
    rundir.write_evaluation(lines, record, files)
    log.info("wrote %s and %s", rundir.predictions_file, rundir.metrics_file)


def _update_model_card(rundir: RunDir, cfg: Config, record: dict) -> None:
    from advcap import atomic
    from advcap.modelcard import CARD, model_card

    if rundir.export_dir.is_dir():
        atomic.write_text(rundir.export_dir / CARD, model_card(cfg, rundir.provenance(), record))


def _log_metrics(accelerator: Any, rundir: RunDir, cfg: Config, metrics: dict, step: int) -> None:
    """The headline figures as scalars `eval/<split>/<condition>/<metric>` at the run's final step, to the run's
    trackers (with the run's config as hyperparameters where the tracker opens a run of its own)."""
    from advcap.tracking import Trackers

    values = {f"eval/{split}/{condition}/{key}": m[key]
              for split, by_condition in metrics.items() for condition, m in by_condition.items()
              for key in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "meteor", "target_success")
              if isinstance(m.get(key), (int, float))}
    trackers = Trackers(accelerator)
    try:
        # TensorBoard's hparams session is training's: the evaluation adds scalars to the same event folder.
        trackers.start(rundir, cfg, f"{cfg.run.phase}-seed{cfg.train.seed}-eval", tensorboard_hparams=False)
        trackers.scalars(step, values)
    finally:
        trackers.close()


# ---------------------------------------------------------------- as text


def format_metrics(metrics: dict) -> str:
    """A plain-text table of `{split: {condition: {...}}}`: the paper's BLEU, then CIDEr and METEOR if scored."""
    coco = any("cider" in m for by_condition in metrics.values() for m in by_condition.values())
    head = f"{'split':<6} {'condition':<16} {'BLEU-1':>7} {'BLEU-2':>7} {'BLEU-3':>7} {'BLEU-4':>7}"
    rows = [head + (f" {'CIDEr':>7} {'METEOR':>7}" if coco else "") + f" {'images':>7}"]
    for split, by_condition in metrics.items():
        for condition, m in by_condition.items():
            scores = " ".join(f"{m[f'bleu{n}']:7.4f}" for n in range(1, 5))
            if coco:
                scores += f" {100 * m['cider']:7.2f} {m['meteor']:7.4f}" if "cider" in m else " " * 16
            rows.append(f"{split:<6} {condition:<16} {scores} {m['images']:>7d}")
    return "\n".join(rows)
