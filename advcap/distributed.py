"""The distributed engine: which Accelerator to build, and how an optimizer step is driven under DDP or DeepSpeed.

Both engines run the same training loop (`advcap.train`). What differs is hidden behind a small driver:

  DDP (Accelerate's default)  gradients are all-reduced in `backward` of the last micro-batch (the others run
                              under `no_sync`); clipping, `optimizer.step()` and `zero_grad()` are ours.
  DeepSpeed ZeRO-1/2          the engine owns reduction, clipping, the step and zero_grad. We mark the
                              accumulation boundary ourselves (only the last backward of the last
                              micro-batch is on it; "no_sync" = off it), call `engine.backward` without its
                              1/accum loss scaling (advcap's loss is already normalised by the step's global
                              token count) and `engine.step()` once per optimizer step, after the ranks
                              agreed on it.

Each driver also names the `mixed` scheme (advcap.step) that costs least under its engine: `mixed_scheme`.

Accelerate's own `backward` is not used under DeepSpeed on purpose: it steps the engine inside every
`backward` call, which would step once per micro-batch and before the non-finite check.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, TypeVar

from advcap.errors import AdvcapError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

# ---------------------------------------------------------------- the launch environment
# Every read of the launcher's variables (RANK, WORLD_SIZE, ACCELERATE_*, SLURM_*, torchrun's) is here.

SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES",
                   "SLURM_RESTART_COUNT", "SLURM_JOB_PARTITION")


def launch_rank() -> int:
    """This process's global rank under a distributed launcher (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def launch_world_size() -> int:
    """Processes the launcher started (1 when run alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launcher() -> str:
    """Which launcher started this process: slurm, slurm+accelerate, accelerate, torchrun or python."""
    if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
        return "slurm+accelerate" if "ACCELERATE_MIXED_PRECISION" in os.environ else "slurm"
    if any(k.startswith("ACCELERATE_") for k in os.environ):
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "python"


def slurm_job_id() -> Optional[str]:
    return os.environ.get("SLURM_JOB_ID")


def slurm_info() -> Optional[dict[str, str]]:
    """The SLURM job's identity (job, array task, nodes, restart count), or None outside SLURM."""
    return {k[len("SLURM_"):].lower(): os.environ[k] for k in SLURM_VARIABLES if k in os.environ} or None

# The DeepSpeed settings that advcap's YAML decides; a DeepSpeed JSON should say "auto" for them.
ZERO_STAGES_SUPPORTED = (0, 1, 2)


# ---------------------------------------------------------------- ranks agree


class RankFailure(AdvcapError):
    """A failure all ranks agreed on: raised on every rank, naming the rank(s) where it happened."""


# File-system conditions a user can act on: said in one line, never as a traceback.
NAMED_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT,
                   errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.ESTALE}


def describe_error(err: BaseException) -> str:
    """One line for an error: OSError as 'what (file)', others as their message or type."""
    if isinstance(err, OSError) and err.strerror:
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror}{where}"
    return str(err) or type(err).__name__


def agree(what: str, fn: Callable[[], T], main_only: bool = False) -> T:
    """Run `fn` on every rank (or on the main process only) and make all ranks agree on the outcome.

    This is the defined point where a failure that only some ranks saw becomes every rank's failure: all
    ranks reach it whatever happened inside `fn`, exchange one small message each, and if any failed, all
    raise RankFailure naming the rank(s) and the error, so none goes on to collectives the others never
    reach. With `main_only`, the main process's return value is returned on every rank. Alone (one
    process), an OSError becomes a RankFailure with a one-line message and any other error propagates.
    """
    import torch.distributed as dist

    joined = dist.is_available() and dist.is_initialized()
    if not joined and launch_world_size() > 1:
        raise RuntimeError(f"{what}: the ranks cannot agree before the process group exists (make_accelerator first)")
    world, main = (dist.get_world_size(), dist.get_rank() == 0) if joined else (1, True)
    result, error = None, None
    if not main_only or main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 — every failure must be agreed on before anyone goes on
            error = err
    if world == 1:
        if error is None:
            return result
        if isinstance(error, AdvcapError):
            raise error
        if not isinstance(error, OSError):
            log.error("%s failed", what, exc_info=error)
        raise RankFailure(f"{what} failed: {describe_error(error)}") from error
    report = None if error is None else describe_error(error)
    reports: list = [None] * world
    dist.all_gather_object(reports, (report, result if main_only and main else None))
    failed = [(rank, message) for rank, (message, _) in enumerate(reports) if message is not None]
    if failed:
        if error is not None and not isinstance(error, (AdvcapError, OSError)):
            log.error("%s failed on this rank", what, exc_info=error)
        names = "; ".join(f"rank {rank}: {message}" for rank, message in failed)
        raise RankFailure(f"{what} failed on {names}") from error
    return reports[0][1] if main_only else result


# ---------------------------------------------------------------- a rank that stops answering


class Heartbeat:
    """Each rank records how far it got in the process group's own rendezvous store (which torchrun's agent
    hosts), so that when a collective fails the ranks still alive can name the rank(s) that stopped
    answering. One small store write per step (a round trip to the launcher's agent, next to a step's
    collectives); a no-op when run alone.

    The store is the one the process group already uses (no connection or thread of our own, which could
    outlive the interpreter's shutdown); torch exposes it only privately, so without it there is no heartbeat.
    """

    PREFIX = "advcap/heartbeat/"

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.store = rank, world, None
        if world > 1:
            try:
                from torch.distributed.distributed_c10d import _get_default_store

                self.store = _get_default_store()
            except (ImportError, RuntimeError, ValueError) as err:
                log.debug("no heartbeat store: %s", err)

    def close(self) -> None:
        self.store = None

    def beat(self, where: str) -> None:
        if self.store is not None:
            import time

            self.store.set(f"{self.PREFIX}{self.rank}", f"{time.time():.1f} {where}")

    def silent_ranks(self) -> str:
        """Who stopped answering, as far as the store tells: ranks whose last beat is the oldest."""
        if self.store is None:
            return "the other rank(s)"
        import time

        seen = {}
        for rank in range(self.world):
            if rank == self.rank:
                continue
            key = f"{self.PREFIX}{rank}"
            try:  # check first: get() on a missing key would wait for it
                stamp, _, where = self.store.get(key).decode().partition(" ") if self.store.check([key]) else ("0", "", "")
                seen[rank] = (float(stamp), where or "never")
            except Exception:  # noqa: BLE001 — a store that is gone
                seen[rank] = (0.0, "never")
        if not seen:
            return "the other rank(s)"
        oldest = min(stamp for stamp, _ in seen.values())
        now = time.time()
        return ", ".join(
            f"rank {rank} (last seen {where}, {now - stamp:.0f} s ago)" if stamp else f"rank {rank} (never seen)"
            for rank, (stamp, where) in sorted(seen.items()) if stamp <= oldest + 1.0
        )


def leave_process_group() -> None:
    """Destroy the process group at a normal end (every rank got there). Not after a failure: a rank still
    waiting in a collective would hang the ones that destroy it. (A command that never imported torch has none.)"""
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_collective_failure(err: BaseException) -> bool:
    """A collective that timed out or lost a peer (gloo raises plain RuntimeErrors, NCCL DistBackendError)."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and (
        "gloo" in text or "Connection reset" in text or "Connection closed" in text or "Timed out" in text))


@contextlib.contextmanager
def collectives_guarded(heartbeat: Heartbeat, what: str, timeout_s: int, resume_hint: str) -> Any:
    """Turn a collective that timed out or lost a peer into one clear error naming the silent rank(s)."""
    try:
        yield
    except RuntimeError as err:
        if not is_collective_failure(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdvcapError(
            f"rank {heartbeat.rank}: {heartbeat.silent_ranks()} stopped answering during {what} (dist.timeout_s="
            f"{timeout_s}; {first}). The job ends here. {resume_hint}"
        ) from None


def deepspeed_launch() -> bool:
    """True under `accelerate launch --use_deepspeed` or a launcher config with distributed_type DEEPSPEED."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def mixed_precision(precision: str) -> str:
    """Accelerate's mixed_precision for advcap's train.precision (auto: bf16 where a CUDA GPU has it)."""
    import torch

    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16"}[precision]


def make_accelerator(precision: str = "fp32", timeout_s: int = 600, log_with: Sequence = (),
                     project_dir: Optional[os.PathLike] = None):
    """The Accelerator for this process.

    Without CUDA, DDP runs on the CPU: `cpu=True` is what makes `--multi_gpu --num_processes N` start N gloo
    ranks. Under DeepSpeed, `cpu=True` would silently drop the DeepSpeed plugin (plain DDP, no ZeRO), and
    without it Accelerate finds no backend on a CPU-only host; so the process group is asked for with gloo,
    the backend of DeepSpeed's CPU accelerator.

    `timeout_s` bounds every collective (gloo and NCCL alike): a rank that died or hangs ends the job after
    that long instead of the backends' defaults (30 min gloo, 10 min NCCL). It takes effect when the process
    group is created, i.e. for the first Accelerator of the process.

    `log_with` and `project_dir` go to Accelerate's trackers (see advcap.tracking.log_with): the run's trackers,
    and its run directory, where trackers that take a logging directory write.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    timeout = timedelta(seconds=timeout_s)
    tracking = {"log_with": list(log_with) or None, "project_dir": project_dir}
    if deepspeed_launch():
        group = InitProcessGroupKwargs(timeout=timeout) if cuda else InitProcessGroupKwargs(backend="gloo", timeout=timeout)
        return Accelerator(mixed_precision=mixed_precision(precision), kwargs_handlers=[group], **tracking)
    # No backend named: Accelerate picks it (gloo on the CPU, NCCL on GPUs), and none when run alone.
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision(precision),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)], **tracking)


def configure_deepspeed(accelerator, global_batch: int, per_rank: int, accum: int, clip: float) -> None:
    """Fill the DeepSpeed config's "auto" values from advcap's config before `prepare`; refuse conflicts.

    advcap's YAML is the one source of truth for the batch, accumulation and clipping. A DeepSpeed JSON that
    sets one of them to a different number is an error naming both values, not a silent override.
    """
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the accelerate launch flags"  # launcher's
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage not in ZERO_STAGES_SUPPORTED:
        raise AdvcapError(
            f"DeepSpeed ZeRO stage {stage} (from {source}) is not supported: ZeRO-3 partitions the parameters, "
            "which the in-step attack and the per-rank weight check read whole; use ZeRO-1 or ZeRO-2 "
            "(configs/accelerate/zero1.yaml, zero2.yaml)"
        )
    wanted = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": clip,
    }
    for key, value in wanted.items():
        current = ds.get(key, "auto")
        if current != "auto" and float(current) != float(value):
            raise AdvcapError(
                f"DeepSpeed's {key} is {current} (from {source}) but advcap's config gives {value} "
                "(train.global_batch_size, train.max_batch_size_per_rank and train.grad_clip_norm decide it): "
                f'set "{key}": "auto" in the DeepSpeed JSON and change the advcap config instead'
            )
        ds[key] = value
    # An optimizer DeepSpeed did not write (our AdamW with its weight-decay groups) is fine under ZeRO-1/2.
    ds.setdefault("zero_allow_untested_optimizer", True)
    log.info("DeepSpeed ZeRO-%d: %s", stage, json.dumps({k: ds[k] for k in wanted}))


class DDPDriver:
    """Accelerate's DDP (or a single process): no_sync before the last micro-batch, our norm, clip and step."""

    # `no_sync` really defers the all-reduce: the clean backward of the reuse scheme is free of communication.
    mixed_scheme = "reuse"

    def __init__(self, accelerator, model, optimizer, clip: float):
        self.accelerator, self.model, self.optimizer, self.clip = accelerator, model, optimizer, clip
        self.params = [p for p in model.parameters() if p.requires_grad]

    def micro_batch(self, last: bool) -> tuple[Callable[[torch.Tensor], None], Callable[[], Any]]:
        """(backward, no_sync) for one micro-batch; `last` is the accumulation boundary."""
        return self.accelerator.backward, lambda: self.accelerator.no_sync(self.model)

    def grad_norm(self) -> Optional[torch.Tensor]:
        """The global gradient L2 norm (a device tensor, no host sync): after DDP's all-reduce every rank
        holds the same gradients, so the same norm."""
        import torch

        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.accelerator.device)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0)

    def step(self, skip: bool, grad_norm: Optional[torch.Tensor]) -> tuple[bool, Any]:
        """Finish the optimizer step: (applied, grad norm or None). `skip`: the ranks agreed to skip it
        (a non-finite loss or gradient norm somewhere): the weights and the optimizer state are untouched."""
        import torch

        if not skip:
            if self.clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.clip, grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return not skip, None if skip else grad_norm


class DeepSpeedDriver:
    """DeepSpeed's engine: we set the boundary and decide whether the step happens; it reduces, clips and steps."""

    def __init__(self, engine):
        self.engine = engine
        # ZeRO-1 reduces only on the accumulation boundary, so the reuse scheme's clean backward is free of
        # communication, as under DDP. ZeRO-2 reduces the gradients on every backward, boundary or not: reuse's
        # clean backward would add one reduction of the whole gradient per micro-batch, which costs more than
        # the combined scheme's input-gradient pass (bench/engines.py measures both; the README has figures).
        self.mixed_scheme = "combined" if engine.zero_optimization_stage() >= 2 else "reuse"

    def micro_batch(self, last: bool) -> tuple[Callable[[torch.Tensor], None], Callable[[], Any]]:
        # ZeRO-2 refuses the engine's no_sync; the boundary flag is what defers the step (and, under ZeRO-1, the
        # reduction), so "no sync" here means "not the boundary" (the clean backward of the reuse scheme runs in it).
        self.engine.set_gradient_accumulation_boundary(last)
        return lambda loss: self.engine.backward(loss, scale_wrt_gas=False), self._not_boundary

    @contextlib.contextmanager
    def _not_boundary(self):
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(boundary)

    def grad_norm(self) -> None:
        """Under ZeRO the gradients are partitioned over the ranks; the engine computes the norm in its step."""
        return None

    def step(self, skip: bool, grad_norm: None = None) -> tuple[bool, Any]:
        if skip:
            # advcap's decision, not DeepSpeed's overflow check (which, for bf16, lets a NaN step through):
            # the engine is not stepped at all, and the gradients it accumulated are dropped.
            _discard_zero_gradients(self.engine.optimizer)
            return False, None
        import torch

        self.engine.step()
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        if applied and norm is not None and not math.isfinite(float(norm)):
            raise AdvcapError(
                f"DeepSpeed applied an optimizer step whose gradient norm is {float(norm)} (the losses were finite): "
                "the weights are no longer trustworthy; resume from the last checkpoint with a lower train.lr"
            )
        return applied, None if norm is None or not applied else torch.as_tensor(float(norm))


def _discard_zero_gradients(optimizer: Any) -> None:
    """Drop what a ZeRO-1/2 optimizer accumulated for this step without touching weights or optimizer state:
    the same clearing DeepSpeed's own skipped-step path does (its internals; tests check weights, optimizer
    state and the steps after a discard against DDP)."""
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        raise AdvcapError(
            f"advcap cannot skip a step under DeepSpeed's {type(optimizer).__name__}: only ZeRO-1/2 "
            "(DeepSpeedZeroOptimizer) is supported"
        )
    optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
    optimizer._wait_for_offload_copies()
    optimizer.zero_grad(set_to_none=True)
    optimizer._release_preflattened_grad_buffers()
    if optimizer.cpu_offload:
        optimizer.reset_cpu_buffers()
    else:
        for key in optimizer.averaged_gradients:
            optimizer.averaged_gradients[key] = None
            optimizer.all_grad_tensors[key] = None


def make_driver(accelerator, model, optimizer, clip: float):
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedDriver(model)
    return DDPDriver(accelerator, model, optimizer, clip)
