"""`advcap demo`: the whole study in miniature, offline, on the CPU.

generate the demo set → shards → verify → tokenizer → pretrain the stand-ins for ImageNet ViT and
GPT-2 → the five phases × three seeds (train with validation, then evaluate clean / FGSM / PGD / targeted /
transfer / blind, the COCO caption metrics and the attack audit) → report.
Every stage is skipped when its output already exists, so an interrupted demo resumes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from advcap.config import PAPER_PHASES

log = logging.getLogger(__name__)

DEMO_SEEDS = (0, 1, 2)

# The miniature's settings, shared by every phase (a paired design): small images and models, a few
# hundred steps. The ViT stand-in's pretraining is one-time work every run shares: trained longer, it gives
# runs features they learn to read within 250 steps (after 400 the baseline looked less and FGSM cost it
# less). lr 3e-3 suits the small captioner (at 1e-3 it was still learning when the run ended). ε = 0.1 in [0,1]
# pixel units: at the paper's 0.05 the tiny baseline loses too little for the comparison to show (see the
# README for the measured sweep).
DEMO_SETTINGS = {
    "images": 1500,
    "image_size": 48,
    "vit_pretrain_steps": 1000,
    "gpt2_pretrain_steps": 300,
    "train_steps": 250,
    "global_batch_size": 32,
    "lr": 3e-3,
    "epsilon": 0.1,
}


def demo_overrides(data: Path, pretrained: Path, settings: dict) -> list[str]:
    return [
        "model.preset=custom",
        f"model.encoder={pretrained / 'vit'}",
        f"model.decoder={pretrained / 'gpt2'}",
        f"data.shards={data / 'shards'}",
        f"data.tokenizer={data / 'tokenizer'}",
        f"data.image_size={settings['image_size']}",
        "data.workers=0",  # each run has one core (runs go in parallel): decoding 48 px images inline is cheap
        "data.shuffle_buffer=500",
        "data.cache_mb=64",  # the demo's train shards (10 MB, 7 epochs in a run) are read and decoded once
        f"train.steps={settings['train_steps']}",
        f"train.global_batch_size={settings['global_batch_size']}",
        f"train.lr={settings['lr']}",
        f"train.warmup_steps={max(1, settings['train_steps'] // 10)}",
        "train.log_every_steps=25",
        f"train.image_log_every_steps={settings['train_steps']}",
        f"train.checkpoint_every_steps={settings['train_steps']}",
        "train.keep_checkpoints=1",
        f"attack.epsilon={settings['epsilon']}",
        # The test split only: the train subset's figures (how far attacked scores fall on images a run trained
        # on) cost a fifth of every run's evaluation and are one `advcap eval <run> --splits train` away.
        "eval.splits=[test]",
        "eval.batch_size=50",
        "eval.max_new_tokens=20",
        "eval.conditions=[clean,fgsm,pgd,targeted,blind,fgsm@0.05,fgsm@0.2,transfer-fgsm]",
        # PGD by the usual rule (step 2.5·ε / steps), two random starts: 5 steps are enough at 48 px.
        "eval.pgd_steps=5",
        "eval.audit_images=50",
        # Validation while training: the fixed val subset, twice per run; checkpoints/best by PGD BLEU-4.
        f"train.val_every_steps={max(1, settings['train_steps'] // 2)}",
        "train.val_images=50",
    ]


def prepare_data(out: Path, settings: dict, seed: int = 0) -> tuple[Path, Path]:
    """Demo set, shards, verification, tokenizer and the two pretrained stand-ins (each once)."""
    from advcap.data.manifest import load_manifest
    from advcap.data.shardwriter import convert
    from advcap.data.synth import generate
    from advcap.data.verify import verify
    from advcap.errors import AdvcapError
    from advcap.tokenizer import train_captions, train_tokenizer

    data, pretrained = out / "data", out / "pretrained"
    synth = data / "synth"
    if not (synth / "captions.json").is_file():
        generate(synth, n_images=settings["images"], seed=seed, size=64)
    shards = data / "shards"
    convert("karpathy", synth / "captions.json", synth / "images", shards, resize=0, shard_size=250)
    if not verify(shards):
        raise AdvcapError(f"the demo shards in {shards} failed verification")
    if not (data / "tokenizer" / "tokenizer.json").is_file():
        train_tokenizer(train_captions(load_manifest(shards)), data / "tokenizer", vocab_size=400)
    jobs = []
    if not (pretrained / "vit" / "config.json").is_file():
        jobs.append((_pretrain_vit, (synth, pretrained / "vit", settings["image_size"], settings["vit_pretrain_steps"], seed)))
    if not (pretrained / "gpt2" / "config.json").is_file():
        jobs.append((_pretrain_gpt2, (data, pretrained / "gpt2", settings["gpt2_pretrain_steps"], seed)))
    _run_side_by_side(jobs)
    return data, pretrained


def _pretrain_vit(synth: Path, out: Path, image_size: int, steps: int, seed: int) -> None:
    from advcap.pretrain import pretrain_vit

    pretrain_vit(synth, out, image_size, steps, seed=seed)


def _pretrain_gpt2(data: Path, out: Path, steps: int, seed: int) -> None:
    from advcap.data.manifest import load_manifest
    from advcap.pretrain import pretrain_gpt2
    from advcap.tokenizer import load_tokenizer, train_captions

    captions = train_captions(load_manifest(data / "shards"))
    pretrain_gpt2(captions, load_tokenizer(data / "tokenizer"), out, steps, seed=seed)


def _run_side_by_side(jobs: list) -> None:
    """Run `(function, args)` jobs, each in its own spawned process with one torch thread when there are two
    cores or more (the two stand-ins are independent; each is too small to use two threads well), else here,
    one after the other. One thread also when a resumed demo has one job left: a stand-in's weights depend on
    its thread count, and must not depend on whether the demo was interrupted. A job's exception is raised
    here."""
    import logging as logging_
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from advcap.ablation import init_worker
    from advcap.errors import AdvcapError

    if not jobs:
        return
    if (os.cpu_count() or 1) < 2:
        for function, args in jobs:
            function(*args)
        return
    level = logging_.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(len(jobs), multiprocessing.get_context("spawn"), init_worker, (1, level)) as pool:
        for future in [pool.submit(function, *args) for function, args in jobs]:
            try:
                future.result()
            except BrokenProcessPool:
                raise AdvcapError("a process pretraining a stand-in died (killed, or out of memory); run the demo "
                                  "again: what was finished is kept") from None


def run_demo(out: str | Path, phases: Sequence[str] = PAPER_PHASES, seeds: Sequence[int] = DEMO_SEEDS,
             settings: dict | None = None, extra_overrides: Sequence[str] = ()) -> Any:
    """Run the miniature study into `out`; returns the report (see `advcap.report`)."""
    from advcap.ablation import ablation
    from advcap.errors import AdvcapError
    from advcap.report import write_report

    settings = {**DEMO_SETTINGS, **(settings or {})}
    out = Path(out)
    started = time.perf_counter()
    data, pretrained = prepare_data(out, settings)
    log.info("demo data and pretrained stand-ins ready after %.0f s", time.perf_counter() - started)
    runs = out / "runs"
    # One run per core, each single-threaded: measured 1.4× the throughput of one run on two threads here
    # (adv_train, 100 steps: two parallel 1-thread runs 33 s each vs one 2-thread run 23 s).
    parallel = max(1, min(os.cpu_count() or 1, len(phases) * len(seeds)))
    results = ablation(phases, seeds, runs, [*demo_overrides(data, pretrained, settings), *extra_overrides], parallel=parallel)
    report = write_report(runs, out / "report", phases, seeds)
    log.info("demo finished in %.0f s; report in %s", time.perf_counter() - started, out / "report")
    failed = [r for r in results if not r.ok]
    if failed:
        raise AdvcapError(f"{len(failed)} demo run(s) failed: " + ", ".join(f"{r.phase}/seed{r.seed}" for r in failed))
    return report
