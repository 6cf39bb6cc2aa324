"""Training: `train(cfg)` runs one phase × seed into its run directory.

The loop composes components that decide when to act: the data stream (position = micro-batches
consumed), the step (`advcap.step`), the checkpointer (`due(step)`), and the logger. Every rank runs
the same loop; the only collectives besides DDP's gradient all-reduce are two tiny reductions per
optimizer step: the global target-token count (loss normalisation) and a flags vector (a NaN/inf
loss anywhere, a stop request anywhere), so all ranks skip or stop at the same step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch

from advcap import provenance
from advcap.checkpoint import Checkpointer, TrainerState
from advcap.config import Config, diff_configs, grad_accum_steps, load_config, per_rank_batch_size, run_dir, save_config
from advcap.data.loader import TrainStream, make_loader
from advcap.data.manifest import load_manifest
from advcap.distributed import configure_deepspeed, make_accelerator, make_driver
from advcap.errors import AdvcapError
from advcap.freeze import apply_freeze, trainable_parameters
from advcap.model import build_captioner, decode_captions, export_hf, tokenizer_source
from advcap.step import StepSettings, train_micro_step
from advcap.stopping import EXIT_STOPPED, StopRequest  # noqa: F401 — EXIT_STOPPED: callers know it from here
from advcap.tblog import TrainLogger
from advcap.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

FINISHED, STOPPED = "finished", "stopped"
STATE_FILE = "trainer_state.json"


def resolve_tokenizer(cfg: Config):
    source = cfg.data.tokenizer or tokenizer_source(cfg.model)
    if source is None:
        raise AdvcapError(
            f"model.preset={cfg.model.preset} has a randomly initialised decoder with no tokenizer of its own: "
            "set data.tokenizer to a tokenizer directory (make one with `advcap tokenizer`)"
        )
    return load_tokenizer(source)


def prepare_run_dir(cfg: Config, out: Path, resume: str | None) -> str | None:
    """Check the run dir against the config. Returns FINISHED if this exact run is already done."""
    saved = out / "config.yaml"
    if saved.is_file():
        saved_cfg = load_config(saved)
        # `eval` settings do not touch the model: a run trained with other ones is the same run.
        diffs = diff_configs(saved_cfg, cfg, ignore=("eval",))
        if diffs:
            raise AdvcapError(f"{out} holds a run with a different config ({'; '.join(diffs)}); use another run.out")
        state_file = out / STATE_FILE
        if state_file.is_file() and json.loads(state_file.read_text()).get("finished"):
            record_eval_settings(cfg, out)  # (an unfinished run rewrites config.yaml when it starts)
            return FINISHED
    if resume is None and any((out / "checkpoints").glob("step*")):
        raise AdvcapError(f"{out} has checkpoints of an unfinished run: continue it with --resume latest")
    return None


def record_eval_settings(cfg: Config, out: Path) -> None:
    """Write `cfg` to a trained run's config.yaml if its eval settings changed (nothing else may differ,
    see prepare_run_dir): the file records what the run's metrics answer to. Main process only."""
    from advcap.cli import launch_rank

    saved = out / "config.yaml"
    if launch_rank() == 0 and load_config(saved) != cfg:
        save_config(cfg, saved)
        log.info("%s: trained already; its config.yaml now holds the new eval settings", out)


def _micro_batches(stream: TrainStream, workers: int, consumed: int):
    """Endless micro-batches from data position `consumed` (epochs follow one another)."""
    epoch, skip = divmod(consumed, stream.batches_per_epoch)
    while True:
        stream.set_position(epoch, skip)
        # A DataLoader iterator draws its base seed from the global torch RNG (dropout's). A resumed run
        # starts an iterator where an uninterrupted one does not, so that draw must not touch the global RNG.
        with torch.random.fork_rng(devices=[]):
            loader = iter(make_loader(stream, workers))
        yield from loader
        epoch, skip = epoch + 1, 0


def _optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    params = trainable_parameters(model)
    if not params:
        raise AdvcapError("the freeze policy leaves no trainable parameter")
    # No weight decay on biases and LayerNorm weights (1-d), as is usual for transformers.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def train(cfg: Config, resume: str | None = None, stop_at_step: int | None = None) -> str:
    """Train the run `cfg` describes. Returns FINISHED, or STOPPED after a stop request (resumable)."""
    # The stop handlers live only as long as the run: a caller that goes on (tests, a notebook, a driver that
    # evaluates next) must get SIGTERM's usual meaning back.
    previous = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    try:
        return _train(cfg, resume, stop_at_step)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(cfg: Config, resume: str | None, stop_at_step: int | None) -> str:
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_cosine_schedule_with_warmup

    accelerator = make_accelerator(cfg.train.precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        raise AdvcapError(f"the launcher started {launched} processes but Accelerate sees {world}: check the launch config")
    out = run_dir(cfg)
    if resume == "auto":  # what a requeued or resubmitted job wants: continue if there is anything to continue
        resume = "latest" if Checkpointer(out, 1, 1).latest() is not None else None
    if prepare_run_dir(cfg, out, resume) == FINISHED:
        log.info("%s is already finished with this config: nothing to do", out)
        return FINISHED
    accelerator.wait_for_everyone()
    per_rank, accum = per_rank_batch_size(cfg, world), grad_accum_steps(cfg, world)
    manifest = load_manifest(cfg.data.shards)
    tokenizer = resolve_tokenizer(cfg)

    set_seed(cfg.train.seed)  # the same initialisation on every rank
    captioner = build_captioner(cfg.model, cfg.data.image_size, tokenizer)
    counts = apply_freeze(captioner, cfg.freeze)
    optimizer = _optimizer(captioner, cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.train.warmup_steps, cfg.train.steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, cfg.train.global_batch_size, per_rank, accum, cfg.train.grad_clip_norm)
    model, optimizer = accelerator.prepare(captioner, optimizer)
    driver = make_driver(accelerator, model, optimizer, cfg.train.grad_clip_norm)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step
    attack_model = accelerator.unwrap_model(model)
    set_seed(cfg.train.seed, device_specific=True)  # dropout etc. differ per rank

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "parameters.json").write_text(json.dumps(counts, indent=1) + "\n")
    record = provenance.collect(
        accelerator,
        global_batch_size=cfg.train.global_batch_size,
        per_rank_batch_size=per_rank,
        grad_accum_steps=accum,
        shard_manifest_sha256=manifest.sha256(),
        parameters=counts,
    )
    checkpointer = Checkpointer(out, cfg.train.checkpoint_every_steps, cfg.train.keep_checkpoints)
    state = checkpointer.load(accelerator, resume) if resume else TrainerState()
    record["resumed_at_step"] = state.step
    logger = TrainLogger(out, accelerator.is_main_process)
    logger.hyperparameters(cfg, {"world_size": world, "per_rank_batch_size": per_rank, "grad_accum_steps": accum})

    stream = TrainStream(
        manifest, tokenizer, cfg.data.image_size, cfg.data.max_caption_tokens, per_rank, cfg.train.seed,
        rank, world, cfg.data.workers, cfg.data.shuffle_buffer,
    )
    batches = _micro_batches(stream, cfg.data.workers, state.micro_batches)
    settings = StepSettings(
        mode=cfg.train.mode,
        clean_weight=cfg.train.clean_weight,
        epsilon=cfg.attack.epsilon,
        random_start=cfg.attack.random_start,
        # The reuse scheme under DDP and DeepSpeed alike: the drivers' no_sync defers the clean backward's
        # reduction (DeepSpeed: not the accumulation boundary), so each micro-batch costs 2 forwards + 2 backwards.
        scheme="reuse",
    )
    stop = StopRequest()
    stop.install()
    device = accelerator.device
    generator = torch.Generator(device=device)
    window = _Window(device)
    started = time.perf_counter()
    model.train()
    log.info(
        "training %s: %d steps, global batch %d = %d ranks × %d × %d accumulation, mode %s, freeze %s",
        out, cfg.train.steps, cfg.train.global_batch_size, world, per_rank, accum, cfg.train.mode, cfg.freeze.modules,
    )
    while state.step < cfg.train.steps:
        micro = [next(batches) for _ in range(accum)]
        state.micro_batches += accum
        local_tokens = sum(int((b["labels"] != -100).sum()) for b in micro)
        global_tokens = accelerator.reduce(torch.tensor(float(local_tokens), device=device), "sum").item()
        loss_scale = world / global_tokens
        # Random-start FGSM draws from a generator re-seeded per (seed, rank, step): exact on resume.
        generator.manual_seed(hash((cfg.train.seed, rank, state.step)) & 0x7FFF_FFFF)
        results = []
        for i, batch in enumerate(micro):
            backward, no_sync = driver.micro_batch(last=i == accum - 1)
            results.append(
                train_micro_step(
                    model, attack_model, batch["pixels"].to(device), batch["labels"].to(device), settings,
                    loss_scale, backward, no_sync, sync=i == accum - 1, generator=generator,
                )
            )
        # One reduction, one host sync per step: [any non-finite loss here, stop requested here].
        losses = [t for r in results for t in (r.clean_loss_sum, r.adv_loss_sum) if t is not None]
        local_flags = torch.stack([
            (~torch.isfinite(torch.stack(losses))).any().float(),
            torch.tensor(float(stop.requested), device=device),
        ])
        nonfinite, stop_now = (accelerator.reduce(local_flags, "sum") > 0).tolist()
        applied, grad_norm = driver.step(skip=bool(nonfinite))
        if nonfinite:
            state.nonfinite_steps += 1
            state.nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss on some rank: step skipped on all ranks (%d in a row)", state.step, state.nonfinite_in_a_row)
        else:
            state.nonfinite_in_a_row = 0
        if applied:
            scheduler.step()
        state.step += 1
        window.add(results, micro, local_tokens, grad_norm)

        if state.step % cfg.train.log_every_steps == 0 or state.step == cfg.train.steps:
            _log_window(accelerator, logger, window, state, scheduler, cfg)
            window = _Window(device)
        if cfg.train.image_log_every_steps and state.step % cfg.train.image_log_every_steps == 0:
            _log_examples(accelerator, logger, attack_model, tokenizer, micro[-1], results[-1], state.step, cfg)
        if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            path = checkpointer.save(accelerator, state)
            raise AdvcapError(
                f"{state.nonfinite_in_a_row} non-finite (NaN/inf) losses in a row up to step {state.step}: "
                f"stopping (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); last state saved in {path}. "
                "Lower train.lr or check the data."
            )
        if stop_now or state.step == stop_at_step:
            checkpointer.save(accelerator, state)
            log.warning("stopped at step %d on request; continue with --resume latest", state.step)
            logger.close()
            return STOPPED
        if checkpointer.due(state.step):
            checkpointer.save(accelerator, state)

    if not checkpointer.due(state.step):
        checkpointer.save(accelerator, state)
    wall = time.perf_counter() - started
    record["weights_sha256"] = _check_ranks_agree(accelerator, attack_model)
    if accelerator.is_main_process:
        export_hf(attack_model, tokenizer, out / "hf")
        state.finished = True
        (out / STATE_FILE).write_text(json.dumps(asdict(state), indent=1) + "\n")
        steps_here = cfg.train.steps - (record.get("resumed_at_step") or 0)
        record.update(
            wall_time_s=round(wall, 2),
            train_samples_per_s=round(steps_here * cfg.train.global_batch_size / max(wall, 1e-9), 2),
        )
        provenance.write(out / "provenance.json", record)
    logger.close()
    accelerator.wait_for_everyone()
    log.info("finished %s in %.1f s", out, wall)
    return FINISHED


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_ranks_agree(accelerator, model: torch.nn.Module) -> str:
    """Data parallelism must leave every rank with the same weights; a divergence is a bug, not noise."""
    from accelerate.utils import gather_object

    digests = gather_object([weights_digest(model)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended training with different weights: {digests}")
    return digests[0]


class _Window:
    """Sums over the steps between two log lines (this rank's view; reduced when logged). Losses are
    kept as device tensors, so logging adds no host sync to the step."""

    def __init__(self, device):
        zero = torch.zeros((), device=device)
        self.clean, self.adv, self.zero = zero.clone(), zero.clone(), zero.clone()
        self.clean_n = self.adv_n = self.zero_n = self.tokens = self.steps = self.bad_shards = 0
        self.grad_norms: list[torch.Tensor] = []
        self.started = time.perf_counter()

    def add(self, results, micro, tokens: int, grad_norm) -> None:
        self.steps += 1
        self.tokens += tokens
        for r in results:
            if r.clean_loss_sum is not None:
                self.clean, self.clean_n = self.clean + r.clean_loss_sum, self.clean_n + 1
            if r.adv_loss_sum is not None:
                self.adv, self.adv_n = self.adv + r.adv_loss_sum, self.adv_n + 1
            if r.zero_grad_fraction is not None:
                self.zero, self.zero_n = self.zero + r.zero_grad_fraction, self.zero_n + 1
        self.bad_shards = max([self.bad_shards] + [int(b.get("bad_shards", 0)) for b in micro])
        if grad_norm is not None:
            self.grad_norms.append(torch.as_tensor(grad_norm).detach())


def _log_window(accelerator, logger: TrainLogger, w: _Window, state: TrainerState, scheduler, cfg: Config) -> None:
    device = accelerator.device
    counts = torch.tensor([w.tokens, w.zero_n, w.bad_shards], dtype=torch.float32, device=device)
    sums = torch.cat([torch.stack([w.clean, w.adv, w.zero]).float(), counts])
    clean, adv, zero, tokens, zero_n, bad = accelerator.reduce(sums, "sum").tolist()
    elapsed = time.perf_counter() - w.started
    grad_norm = float(torch.stack(w.grad_norms).float().mean()) if w.grad_norms else None
    values = {
        "train/clean_loss": clean / tokens if w.clean_n else None,  # None only for random-start adversarial
        "train/adversarial_loss": adv / tokens if w.adv_n else None,
        "train/lr": scheduler.get_last_lr()[0],
        "train/grad_norm": grad_norm,
        "train/samples_per_s": w.steps * cfg.train.global_batch_size / max(elapsed, 1e-9),
        "attack/epsilon": cfg.attack.epsilon,
        "attack/zero_input_grad_fraction": zero / zero_n if zero_n else None,
        "train/nonfinite_steps": state.nonfinite_steps,
        "data/bad_shard_reads": bad,
    }
    logger.scalars(state.step, values)
    if accelerator.is_main_process:
        shown = " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in values.items() if v is not None and "loss" in k)
        log.info("step %d/%d %s lr=%.3g %.1f samples/s", state.step, cfg.train.steps, shown, values["train/lr"], values["train/samples_per_s"])


def _log_examples(accelerator, logger, captioner, tokenizer, batch, result, step: int, cfg: Config) -> None:
    """Main process only, no collectives: a grid and caption table from the step's last micro-batch."""
    if not accelerator.is_main_process or result.adv_pixels is None:
        return
    clean = batch["pixels"][:4].to(accelerator.device)
    adv = result.adv_pixels[:4]
    was_training = captioner.training
    captioner.eval()
    with torch.no_grad():
        clean_caps = decode_captions(tokenizer, captioner.generate(clean, max_new_tokens=cfg.eval.max_new_tokens))
        adv_caps = decode_captions(tokenizer, captioner.generate(adv, max_new_tokens=cfg.eval.max_new_tokens))
    captioner.train(was_training)
    references = tokenizer.batch_decode(batch["input_ids"][:4], skip_special_tokens=True)
    logger.attack_examples(step, clean, adv, cfg.attack.epsilon, list(zip(references, clean_caps, adv_caps)))
