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

Accelerate's own `backward` is not used under DeepSpeed on purpose: it steps the engine inside every
`backward` call, which would step once per micro-batch and before the non-finite check.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable

import torch

from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

# The DeepSpeed settings that advcap's YAML decides; a DeepSpeed JSON should say "auto" for them.
ZERO_STAGES_SUPPORTED = (0, 1, 2)


def deepspeed_launch() -> bool:
    """True under `accelerate launch --use_deepspeed` or a launcher config with distributed_type DEEPSPEED."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def mixed_precision(precision: str) -> str:
    """Accelerate's mixed_precision for advcap's train.precision (auto: bf16 where a CUDA GPU has it)."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16"}[precision]


def make_accelerator(precision: str = "fp32"):
    """The Accelerator for this process.

    Without CUDA, DDP runs on the CPU: `cpu=True` is what makes `--multi_gpu --num_processes N` start N gloo
    ranks. Under DeepSpeed, `cpu=True` would silently drop the DeepSpeed plugin (plain DDP, no ZeRO), and
    without it Accelerate finds no backend on a CPU-only host; so the process group is asked for with gloo,
    the backend of DeepSpeed's CPU accelerator.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    if deepspeed_launch():
        handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
        return Accelerator(mixed_precision=mixed_precision(precision), kwargs_handlers=handlers)
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision(precision))


def configure_deepspeed(accelerator, global_batch: int, per_rank: int, accum: int, clip: float) -> None:
    """Fill the DeepSpeed config's "auto" values from advcap's config before `prepare`; refuse conflicts.

    advcap's YAML is the one source of truth for the batch, accumulation and clipping. A DeepSpeed JSON that
    sets one of them to a different number is an error naming both values, not a silent override.
    """
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the accelerate launch flags"
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
    """Accelerate's DDP (or a single process): no_sync before the last micro-batch, our clip and step."""

    def __init__(self, accelerator, model, optimizer, clip: float):
        self.accelerator, self.model, self.optimizer, self.clip = accelerator, model, optimizer, clip

    def micro_batch(self, last: bool) -> tuple[Callable[[torch.Tensor], None], Callable[[], Any]]:
        """(backward, no_sync) for one micro-batch; `last` is the accumulation boundary."""
        return self.accelerator.backward, lambda: self.accelerator.no_sync(self.model)

    def step(self, skip: bool) -> tuple[bool, Any]:
        """Finish the optimizer step: (applied, grad norm or None). `skip`: the ranks agreed to skip it."""
        grad_norm = None
        if not skip:
            if self.clip > 0:
                grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return not skip, grad_norm


class DeepSpeedDriver:
    """DeepSpeed's engine: we set the boundary, it reduces, clips, steps and zeroes the gradients."""

    def __init__(self, engine):
        self.engine = engine

    def micro_batch(self, last: bool) -> tuple[Callable[[torch.Tensor], None], Callable[[], Any]]:
        # ZeRO-2 refuses the engine's no_sync; the boundary flag is what defers the reduction and the step,
        # so "no sync" here means "not the boundary" (the clean backward of the reuse scheme runs in it).
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

    def step(self, skip: bool) -> tuple[bool, Any]:
        # The engine's step is collective: every rank calls it. It skips by itself (and clears the gradients)
        # when the global gradient norm is not finite, which a non-finite loss on any rank makes it.
        self.engine.step()
        applied = self.engine.was_step_applied()
        if skip and applied:
            log.error("DeepSpeed applied a step whose loss was not finite on some rank (its gradients were finite)")
        norm = self.engine.get_global_grad_norm()
        return applied, None if norm is None or not applied else torch.as_tensor(float(norm))


def make_driver(accelerator, model, optimizer, clip: float):
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedDriver(model)
    return DDPDriver(accelerator, model, optimizer, clip)
