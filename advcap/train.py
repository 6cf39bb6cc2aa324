"""Training: `train(cfg)` runs one phase × seed into its run directory.

`_train` is the loop, one screen: `_start` builds what a start of the run works with (a `_Run`), `_step` makes
one optimizer step, and components decide when to act: the data stream (position = micro-batches consumed), the
step (`advcap.step`), the driver of the engine (`advcap.distributed`), logging, validation and its overfitting
guard, the non-finite policy, the checkpointer (`due(step)`) and the trackers (`advcap.tracking`); `_finish`
exports the model and marks the run finished. Every rank runs the same loop; besides
the gradient reduction the ranks exchange two tiny reductions per optimizer step: the global target-token
count (loss normalisation) and a flags vector (a non-finite loss or gradient norm anywhere, a stop
request anywhere), so all ranks skip or stop at the same step. Setup, checkpoints and the final
export are agreed sections (`advcap.distributed.agree`): a failure on any rank is every rank's failure.

The run directory is held by the job for the whole run (`RunDir.held`): a second process that tries
to write it is refused, naming the holder.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from advcap import faults, provenance
from advcap.checkpoint import Checkpointer, TrainerState
from advcap.config import UNTRAINED, Config, grad_accum_steps, per_rank_batch_size
from advcap.data.loader import TrainStream, make_loader
from advcap.data.manifest import data_manifest
from advcap.distributed import (Heartbeat, agree, collectives_guarded, configure_deepspeed, launch_world_size,
                                make_accelerator, make_driver)
from advcap.errors import AdvcapError
from advcap.freeze import apply_freeze, trainable_parameters
from advcap.model import build_captioner, decode_captions, export_hf, tokenizer_source
from advcap.modelcard import CARD, model_card
from advcap.rundir import PARAMETERS, PROVENANCE, TRAINING_STATE, RunDir
from advcap.step import StepSettings, train_micro_step
from advcap.stopping import EXIT_STOPPED, StopRequest  # noqa: F401 — EXIT_STOPPED: callers know it from here
from advcap.tokenizer import load_tokenizer
from advcap.tracking import Trackers, check_trackers, log_with
from advcap.validation import BestCheckpoint, Validator, better, overfit_signature

log = logging.getLogger(__name__)

FINISHED, STOPPED = "finished", "stopped"
STOPPED_NO_PROGRESS = "stopped before its first step"  # nothing to checkpoint: see advcap.stopping


def resolve_tokenizer(cfg: Config):
    source = cfg.data.tokenizer or tokenizer_source(cfg.model)
    if source is None:
        raise AdvcapError(
            f"model.preset={cfg.model.preset} has a randomly initialised decoder with no tokenizer of its own: "
            "set data.tokenizer to a tokenizer directory (make one with `advcap tokenizer`)"
        )
    return load_tokenizer(source)


def prepare_run_dir(rundir: RunDir, cfg: Config, resume: str | None) -> str | None:
    """Check the run directory against the config, under its lock (main process). Returns FINISHED if this
    run is done, else the resume to use: None (a fresh start), 'latest' or a checkpoint folder.

    Interrupted checkpoint commits are finished or undone first (`RunDir.recover`), so `--resume auto`
    sees exactly the checkpoints that exist.
    """
    for action in rundir.recover():
        log.warning("%s: %s", rundir, action)
    diffs = rundir.conflicts_with(cfg, ignore=UNTRAINED)
    if diffs:
        raise AdvcapError(f"{rundir} holds a run with a different config ({'; '.join(diffs)}); use another run.out")
    if rundir.training_finished():
        return FINISHED
    has_checkpoints = bool(rundir.checkpoint_dirs())
    if resume == "auto":  # what a requeued or resubmitted job wants: continue if there is anything to continue
        return "latest" if has_checkpoints else None
    if resume is None and has_checkpoints:
        raise AdvcapError(f"{rundir} has checkpoints of an unfinished run: continue it with --resume latest")
    return resume


def _micro_batches(stream: TrainStream, workers: int, consumed: int, pin_memory: bool = False):
    """Endless micro-batches from data position `consumed` (epochs follow one another); `pin_memory` for a
    CUDA device, so the step's copies to it can be asynchronous."""
    epoch, skip = divmod(consumed, stream.batches_per_epoch)
    while True:
        stream.set_position(epoch, skip)
        # A DataLoader iterator draws its base seed from the global torch RNG (dropout's). A resumed run
        # starts an iterator where an uninterrupted one does not, so that draw must not touch the global RNG.
        with torch.random.fork_rng(devices=[]):
            loader = iter(make_loader(stream, workers, pin_memory))
        yield from loader
        epoch, skip = epoch + 1, 0


def _optimizer(model: torch.nn.Module, cfg: Config, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; `fused` (CUDA): one kernel per step instead of a loop of them.
    The CPU keeps torch's default implementation."""
    params = trainable_parameters(model)
    if not params:
        raise AdvcapError("the freeze policy leaves no trainable parameter")
    # No weight decay on biases and LayerNorm weights (1-d), as is usual for transformers.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True if fused else None)


@dataclass
class NonFinitePolicy:
    """Counts skipped steps and says when too many in a row must stop the run."""

    limit: int

    def record(self, state: TrainerState, skipped: bool) -> None:
        """Count the step that was just taken (state.step + 1) as skipped or not."""
        if skipped:
            state.nonfinite_steps += 1
            state.nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient norm on some rank: step skipped on all ranks "
                        "(%d in a row)", state.step + 1, state.nonfinite_in_a_row)
        else:
            state.nonfinite_in_a_row = 0

    def exhausted(self, state: TrainerState) -> bool:
        return state.nonfinite_in_a_row >= self.limit


def train(cfg: Config, resume: str | None = None, stop_at_step: int | None = None) -> str:
    """Train the run `cfg` describes. Returns FINISHED, STOPPED after a stop request (a checkpoint was saved:
    resumable), or STOPPED_NO_PROGRESS when the request came before the first step of this start.

    `resume`: None (fresh; an error if checkpoints exist), 'latest', 'auto' (latest if any, else fresh)
    or a checkpoint folder.
    """
    # The stop handlers live only as long as the run: a caller that goes on (tests, a notebook, a driver that
    # evaluates next) must get SIGTERM's usual meaning back.
    previous = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    heartbeat = None
    try:
        check_trackers(cfg.log.trackers)  # a missing tracker package is said before any work
        rundir = RunDir.of(cfg)
        accelerator = make_accelerator(cfg.train.precision, cfg.dist.timeout_s, log_with(cfg.log.trackers, rundir),
                                       rundir.path)
        world = accelerator.num_processes
        if launch_world_size() != world:
            raise AdvcapError(f"the launcher started {launch_world_size()} processes but Accelerate sees {world}: "
                              "check the launch config")
        heartbeat = Heartbeat(accelerator.process_index, world)
        hint = "The last checkpoint is intact: run the same command with --resume auto to go on."
        with rundir.held(), collectives_guarded(heartbeat, f"training {rundir}", cfg.dist.timeout_s, hint):
            decision = agree("checking the run directory", lambda: prepare_run_dir(rundir, cfg, resume), main_only=True)
            if decision == FINISHED:
                log.info("%s is already finished with this config: nothing to do", rundir)
                return FINISHED
            # The trackers write into the run directory: they are closed while it is held, whatever happens.
            with contextlib.closing(Trackers(accelerator)) as trackers:
                return _train(cfg, accelerator, rundir, decision, stop_at_step, heartbeat, trackers)
    finally:
        if heartbeat is not None:
            heartbeat.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class _Run:
    """One start of a run: what the loop and its policies work with (made by `_start`)."""

    cfg: Config
    accelerator: Any
    rundir: RunDir
    trackers: Trackers
    tokenizer: Any
    model: torch.nn.Module  # as prepared by Accelerate (DDP- or DeepSpeed-wrapped)
    attack_model: torch.nn.Module  # the same captioner unwrapped
    scheduler: Any
    driver: Any  # advcap.distributed's engine driver
    checkpointer: Checkpointer
    validator: Validator | None
    best: BestCheckpoint | None
    batches: Iterator[dict]
    settings: StepSettings
    nonfinite: NonFinitePolicy
    record: dict  # provenance.json, filled in as the run goes
    accum: int
    generator: torch.Generator
    validation_s: float = 0.0


@dataclass
class _Stepped:
    """One optimizer step's inputs and per-micro-batch results, for logging."""

    micro: list[dict]
    results: list
    local_tokens: int
    grad_norm: Any
    stop_now: bool  # a stop request on some rank


def _train(cfg: Config, accelerator, rundir: RunDir, resume: str | None, stop_at_step: int | None,
           heartbeat: Heartbeat, trackers: Trackers) -> str:
    run, state = _start(cfg, accelerator, rundir, resume, trackers)
    stop = StopRequest()
    stop.install()
    window = _Window(accelerator.device)
    started = time.perf_counter()
    run.model.train()
    log.info(
        "training %s: %d steps, global batch %d = %d ranks × %d × %d accumulation, mode %s, freeze %s",
        rundir, cfg.train.steps, cfg.train.global_batch_size, accelerator.num_processes,
        per_rank_batch_size(cfg, accelerator.num_processes), run.accum, cfg.train.mode, cfg.freeze.modules,
    )
    if state.step < cfg.train.steps and _stop_agreed(accelerator, stop):
        log.warning("stop requested before the first step of this start: nothing new to checkpoint")
        return STOPPED_NO_PROGRESS
    while state.step < cfg.train.steps and state.stopped_early is None:  # (a resumed early stop only finishes)
        heartbeat.beat(f"at step {state.step + 1}")
        faults.point("train.step", step=state.step + 1)
        stepped = _step(run, state, stop)
        window = _log_if_due(run, state, window, stepped)
        if _validate_if_due(run, state):
            run.checkpointer.save(state)
            break
        _raise_if_nonfinite_exhausted(run, state)
        if stepped.stop_now or state.step == stop_at_step:
            run.checkpointer.save(state)
            log.warning("stopped at step %d on request; continue with --resume latest", state.step)
            return STOPPED
        if run.checkpointer.due(state.step):
            run.checkpointer.save(state)

    trained_here = state.step > run.record["resumed_at_step"]
    if state.stopped_early is None and trained_here and not run.checkpointer.due(state.step):
        run.checkpointer.save(state)  # the final state (not again when resumed from it)
    if state.stopped_early is not None and state.stopped_early["action"] == "rollback":
        agree("rolling back to checkpoints/best", lambda: run.best.load_into(run.attack_model))
        log.warning("finishing with the weights of checkpoints/best (step %d)", state.best_step)
    wall = time.perf_counter() - started
    _finish(run, state, wall)
    log.info("finished %s in %.1f s", rundir, wall)
    return FINISHED


def _start(cfg: Config, accelerator, rundir: RunDir, resume: str | None,
           trackers: Trackers) -> tuple[_Run, TrainerState]:
    """Build the model, optimizer, engine, data stream and policies; write the run's config; resume the state."""
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_cosine_schedule_with_warmup

    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank, accum = per_rank_batch_size(cfg, world), grad_accum_steps(cfg, world)
    manifest = data_manifest(cfg.data)
    tokenizer = resolve_tokenizer(cfg)

    set_seed(cfg.train.seed)  # the same initialisation on every rank
    captioner = build_captioner(cfg.model, cfg.data.image_size, tokenizer)
    counts = apply_freeze(captioner, cfg.freeze)
    cuda = accelerator.device.type == "cuda"
    # On the device before the optimizer exists: torch before 2.4 checks a fused optimizer's parameters
    # at construction, and has no fused CPU kernel. (`prepare` would move it anyway.)
    captioner.to(accelerator.device)
    optimizer = _optimizer(captioner, cfg, fused=cuda)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.train.warmup_steps, cfg.train.steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, cfg.train.global_batch_size, per_rank, accum, cfg.train.grad_clip_norm)
    model, optimizer = accelerator.prepare(captioner, optimizer)
    driver = make_driver(accelerator, model, optimizer, cfg.train.grad_clip_norm)
    attack_model = accelerator.unwrap_model(model)
    set_seed(cfg.train.seed, device_specific=True)  # dropout etc. differ per rank

    def write_run_files() -> None:
        rundir.write_config(cfg)
        rundir.write_json(PARAMETERS, counts)

    agree("writing config.yaml and parameters.json", write_run_files, main_only=True)
    record = provenance.collect(
        accelerator,
        global_batch_size=cfg.train.global_batch_size,
        per_rank_batch_size=per_rank,
        grad_accum_steps=accum,
        shard_manifest_sha256=manifest.sha256(),
        parameters=counts,
        mixed_scheme=driver.mixed_scheme,  # the engine's scheme for `mixed` (random-start FGSM: always combined)
    )
    checkpointer = Checkpointer(rundir, cfg.train.checkpoint_every_steps, cfg.train.keep_checkpoints, accelerator,
                                model, attack_model, optimizer, scheduler)
    state = checkpointer.resume(resume) if resume else TrainerState()
    record["resumed_at_step"] = state.step
    validator = Validator.for_run(cfg, manifest, tokenizer, accelerator, attack_model)
    best = BestCheckpoint(rundir, cfg.train.keep_best) if validator and cfg.train.keep_best != "none" else None
    if best is not None and accelerator.is_main_process:
        best.drop_if_ahead_of(state.step)
    trackers.start(rundir, cfg, f"{cfg.run.phase}-seed{cfg.train.seed}",
                   {"world_size": world, "per_rank_batch_size": per_rank, "grad_accum_steps": accum})

    stream = TrainStream(
        manifest, tokenizer, cfg.data.image_size, cfg.data.max_caption_tokens, per_rank, cfg.train.seed,
        rank, world, cfg.data.workers, cfg.data.shuffle_buffer, cache_mb=cfg.data.cache_mb,
    )
    settings = StepSettings(
        mode=cfg.train.mode,
        clean_weight=cfg.train.clean_weight,
        epsilon=cfg.attack.epsilon,
        random_start=cfg.attack.random_start,
        scheme=driver.mixed_scheme,  # the engine's cheaper scheme (advcap.distributed)
    )
    run = _Run(
        cfg=cfg, accelerator=accelerator, rundir=rundir, trackers=trackers, tokenizer=tokenizer, model=model,
        attack_model=attack_model, scheduler=scheduler, driver=driver, checkpointer=checkpointer,
        validator=validator, best=best, batches=_micro_batches(stream, cfg.data.workers, state.micro_batches,
                                                                pin_memory=cuda),
        settings=settings, nonfinite=NonFinitePolicy(cfg.train.max_nonfinite_steps), record=record, accum=accum,
        generator=torch.Generator(device=accelerator.device),
    )
    return run, state


def _step(run: _Run, state: TrainerState, stop: StopRequest) -> _Stepped:
    """One optimizer step: the micro-batches' forwards and backwards, the ranks' agreement on skipping or
    stopping, the update (skipped on a non-finite loss or gradient norm anywhere), the schedule."""
    cfg, accelerator, device = run.cfg, run.accelerator, run.accelerator.device
    micro = [next(run.batches) for _ in range(run.accum)]
    state.micro_batches += run.accum
    poisoned = None
    if faults.active("train.loss", "nan", step=state.step + 1):  # a NaN loss on this rank only, this step
        poisoned = run.attack_model.register_forward_hook(lambda module, inputs, loss: loss * float("nan"))
    local_tokens = sum(int((b["labels"] != -100).sum()) for b in micro)
    global_tokens = accelerator.reduce(torch.tensor(float(local_tokens), device=device), "sum").item()
    loss_scale = accelerator.num_processes / global_tokens
    # Random-start FGSM draws from a generator re-seeded per (seed, rank, step): exact on resume.
    run.generator.manual_seed(hash((cfg.train.seed, accelerator.process_index, state.step)) & 0x7FFF_FFFF)
    results = []
    for i, batch in enumerate(micro):
        backward, no_sync = run.driver.micro_batch(last=i == run.accum - 1)
        results.append(
            train_micro_step(
                # Pinned batches (CUDA) copy asynchronously; the step's kernels queue after the copy.
                run.model, run.attack_model, batch["pixels"].to(device, non_blocking=True),
                batch["labels"].to(device, non_blocking=True), run.settings,
                loss_scale, backward, no_sync, sync=i == run.accum - 1, generator=run.generator,
            )
        )
    if poisoned is not None:
        poisoned.remove()
    grad_norm = run.driver.grad_norm()
    skip, stop_now = _agree_on_step(accelerator, results, grad_norm, stop)
    applied, grad_norm = run.driver.step(skip=skip, grad_norm=grad_norm)
    run.nonfinite.record(state, skipped=skip)
    if applied:
        run.scheduler.step()
    state.step += 1
    return _Stepped(micro, results, local_tokens, grad_norm, stop_now)


def _log_if_due(run: _Run, state: TrainerState, window: "_Window", stepped: _Stepped) -> "_Window":
    """Add the step to the log window; log the window (and start a new one) and example images when due."""
    cfg = run.cfg
    window.add(stepped.results, stepped.micro, stepped.local_tokens, stepped.grad_norm)
    if state.step % cfg.train.log_every_steps == 0 or state.step == cfg.train.steps:
        _log_window(run.accelerator, run.trackers, window, state, run.scheduler, cfg)
        window = _Window(run.accelerator.device)
    if cfg.train.image_log_every_steps and state.step % cfg.train.image_log_every_steps == 0:
        _log_examples(run.accelerator, run.trackers, run.attack_model, run.tokenizer, stepped.micro[-1],
                      stepped.results[-1], state.step, cfg)
    return window


def _validate_if_due(run: _Run, state: TrainerState) -> bool:
    """Validate when due; True when the overfitting guard ends training here."""
    if run.validator is None or not run.validator.due(state.step):
        return False
    validated = time.perf_counter()
    action = _validate(run.validator, run.best, run.trackers, state, run.cfg, run.attack_model)
    run.validation_s += time.perf_counter() - validated
    return action is not None


def _raise_if_nonfinite_exhausted(run: _Run, state: TrainerState) -> None:
    if run.nonfinite.exhausted(state):
        path = run.checkpointer.save(state)
        raise AdvcapError(
            f"{state.nonfinite_in_a_row} non-finite (NaN/inf) steps in a row up to step {state.step}: "
            f"stopping (train.max_nonfinite_steps={run.cfg.train.max_nonfinite_steps}); last state saved in "
            f"{path}. Lower train.lr or check the data."
        )


def _finish(run: _Run, state: TrainerState, wall: float) -> None:
    """Check that the ranks agree on the weights; export the captioner with its model card, write
    provenance.json and, last, the finished training state (an agreed section of the main process)."""
    cfg, record = run.cfg, run.record
    record["weights_sha256"] = _check_ranks_agree(run.accelerator, run.attack_model)

    def finish() -> None:
        steps_here = state.step - record["resumed_at_step"]
        record.update(
            wall_time_s=round(wall, 2),
            train_samples_per_s=round(steps_here * cfg.train.global_batch_size / max(wall, 1e-9), 2),
            nonfinite_steps=state.nonfinite_steps,
            steps_trained=state.step,
            validation=None if run.validator is None else {
                "every_steps": cfg.train.val_every_steps, "images": run.validator.images,
                "seconds": round(run.validation_s, 2),
                "share_of_wall_time": round(run.validation_s / max(wall, 1e-9), 4),
                "best": None if run.best is None else {"metric": cfg.train.keep_best, "step": state.best_step,
                                                       "value": state.best_value},
            },
            overfit_alarms=state.overfit_alarms,
            stopped_early=state.stopped_early,
        )

        def export(folder: Path) -> None:
            export_hf(run.attack_model, run.tokenizer, folder)
            (folder / CARD).write_text(model_card(cfg, record), encoding="utf-8")

        run.rundir.replace_dir(run.rundir.export_dir.name, export)
        log.info("exported the captioner to %s", run.rundir.export_dir)
        run.rundir.write_json(PROVENANCE, record)
        state.finished = True
        run.rundir.write_json(TRAINING_STATE, asdict(state))  # last: the run counts as finished from here on

    agree("exporting the model and finishing the run", finish, main_only=True)


def _validate(validator: Validator, best: BestCheckpoint | None, trackers: Trackers, state: TrainerState,
              cfg: Config, model: torch.nn.Module) -> str | None:
    """Score the val subset, keep checkpoints/best, run the overfitting guard. Returns "stop" or "rollback"
    when the guard ends training, else None. Every rank holds the same figures, so all decide alike."""
    figures = validator()
    trackers.scalars(state.step, {f"val/{k}": v for k, v in figures.items() if k != "images"})
    log.info("step %d validation on %d val images: %s", state.step, int(figures["images"]),
             " ".join(f"{k}={v:.4g}" for k, v in figures.items() if k != "images"))
    metric = cfg.train.keep_best
    if best is not None and better(metric, figures[metric], state.best_value):
        state.best_step, state.best_value = state.step, figures[metric]
        agree("saving checkpoints/best", lambda: best.save(model, state.step, figures), main_only=True)
        log.info("step %d: new best %s %.4g: saved %s", state.step, metric, figures[metric], best.path)
    guard = cfg.train.overfit_guard
    if guard == "off" or cfg.train.mode == "clean":
        return None
    signature = overfit_signature(figures, state.step, cfg.train.overfit_fgsm_share, cfg.train.overfit_min_gap)
    state.overfit_streak = state.overfit_streak + 1 if signature else 0
    trackers.scalars(state.step, {"val/overfit_signature": float(signature is not None)})
    if signature is None or state.overfit_streak < cfg.train.overfit_patience:
        return None
    alarm = replace(signature, in_a_row=state.overfit_streak)
    state.overfit_alarms.append(alarm.as_dict())
    log.warning("%s (train.overfit_guard=%s)", alarm.describe(), guard)
    if guard in ("stop", "rollback"):
        state.stopped_early = {"step": state.step, "action": guard, "reason": alarm.describe()}
        return guard
    return None


def _stop_agreed(accelerator, stop: StopRequest) -> bool:
    """Whether any rank was asked to stop (one reduction)."""
    flag = torch.tensor([float(stop.requested)], device=accelerator.device)
    return bool((accelerator.reduce(flag, "sum") > 0).item())


def _agree_on_step(accelerator, results, grad_norm, stop: StopRequest) -> tuple[bool, bool]:
    """One reduction, one host sync per step: (skip: a non-finite loss or gradient norm on any rank,
    stop: a stop request on any rank)."""
    device = accelerator.device
    losses = [t for r in results for t in (r.clean_loss_sum, r.adv_loss_sum) if t is not None]
    bad = ~torch.isfinite(torch.stack(losses))
    if grad_norm is not None:
        bad = torch.cat([bad, ~torch.isfinite(grad_norm.reshape(1).to(device))])
    local_flags = torch.stack([bad.any().float(), torch.tensor(float(stop.requested), device=device)])
    skip, stop_now = (accelerator.reduce(local_flags, "sum") > 0).tolist()
    return bool(skip), bool(stop_now)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
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
        self.clean_n = self.adv_n = self.zero_n = self.tokens = self.steps = self.bad_shards = self.bad_samples = 0
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
        # Running counts of the stream (per rank and worker): the largest seen is this window's view.
        self.bad_shards = max([self.bad_shards] + [int(b.get("bad_shards", 0)) for b in micro])
        self.bad_samples = max([self.bad_samples] + [int(b.get("bad_samples", 0)) for b in micro])
        if grad_norm is not None:
            self.grad_norms.append(torch.as_tensor(grad_norm).detach())


def _log_window(accelerator, trackers: Trackers, w: _Window, state: TrainerState, scheduler, cfg: Config) -> None:
    device = accelerator.device
    counts = torch.tensor([w.tokens, w.zero_n, w.bad_shards, w.bad_samples], dtype=torch.float32, device=device)
    sums = torch.cat([torch.stack([w.clean, w.adv, w.zero]).float(), counts])
    clean, adv, zero, tokens, zero_n, bad, bad_samples = accelerator.reduce(sums, "sum").tolist()
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
        "data/bad_samples": bad_samples,
    }
    trackers.scalars(state.step, values)
    if accelerator.is_main_process:
        shown = " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in values.items() if v is not None and "loss" in k)
        log.info("step %d/%d %s lr=%.3g %.1f samples/s", state.step, cfg.train.steps, shown, values["train/lr"], values["train/samples_per_s"])


def _log_examples(accelerator, trackers: Trackers, captioner, tokenizer, batch, result, step: int, cfg: Config) -> None:
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
    trackers.attack_examples(step, clean, adv, cfg.attack.epsilon, list(zip(references, clean_caps, adv_caps)))
