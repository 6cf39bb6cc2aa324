"""The training step: clean, adversarial or mixed loss, with FGSM generated inside the step from
the rank's own batch and the current weights.

Passes per micro-batch (a "pass" = one forward through the captioner):
  clean        1 forward, 1 backward
  adversarial  attack forward + input-only backward (no parameter grads), adversarial forward + backward
  mixed        2 forwards. Scheme `reuse` (what training uses under DDP and ZeRO-1): the clean
               backward, run under `no_sync` (DDP: no all-reduce; DeepSpeed: not the accumulation
               boundary), yields the parameter gradients AND ∂loss/∂pixels, which FGSM reuses; the
               adversarial backward then syncs: one reduction per optimizer step. Cost:
               2 forwards + 2 backwards, the floor (bench/step.py: 2.00× the FLOPs of clean).
               Scheme `combined` (what training uses under ZeRO-2, which reduces the gradients on every
               backward, boundary or not, so `reuse` would reduce twice per micro-batch; and for
               random-start FGSM, whose gradient is not at the clean point): the input gradient comes
               from `autograd.grad(..., retain_graph=True)` and one backward of α·clean + (1-α)·adversarial
               follows, reduced once: an extra input-gradient pass
               (2.35× the FLOPs of clean) and two graphs alive at once. Its clean forward runs through
               the unwrapped model: DeepSpeed hooks the wrapped forward's outputs and would run its
               gradient reduction at the end of ANY backward through them, the input-gradient pass
               included. Parameter gradients are unaffected: both wrappers reduce from hooks on the
               parameters, which fire once with the sum of both passes.

Host synchronisation: the step adds none of its own (tests/test_syncs.py counts them). Its pixels are in
[0,1] by construction (the loader divides uint8 by 255), so FGSM runs with `check_range=False`, and the
attack itself is pure tensor arithmetic; what remains is the captioner's own forward (see model.py).

Loss scaling: the captioner returns a SUM of token cross-entropies; `loss_scale` = world / global
target tokens of the optimizer step, so that DDP's gradient average over ranks yields exactly the
gradient of the mean token loss of the global batch, whatever each rank's caption lengths.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from advcap.attacks import fgsm, input_gradient
from advcap.config import TRAIN_MODES

SCHEMES = ("reuse", "combined")

# The step's pixels come from the loader, uint8/255: in [0,1] by construction, so FGSM skips its range check
# (two host reads per call).
_fgsm = functools.partial(fgsm, check_range=False)


@dataclass
class StepSettings:
    """What the phase decides, per step."""

    mode: str  # clean | adversarial | mixed
    clean_weight: float  # α in α·clean + (1-α)·adversarial
    epsilon: float  # L∞ radius, [0,1] pixel units
    random_start: bool = False
    scheme: str = "reuse"  # reuse | combined (see module docstring); training takes its driver's `mixed_scheme`


@dataclass
class StepResult:
    """Detached per-micro-batch figures for logging; losses are the SUM of token CE on this rank."""

    clean_loss_sum: Tensor | None
    adv_loss_sum: Tensor | None
    adv_pixels: Tensor | None  # (B,3,S,S) in [0,1]
    zero_grad_fraction: Tensor | None  # share of exactly-zero input-gradient entries (collapsed attack)


def train_micro_step(
    model: torch.nn.Module,
    attack_model: torch.nn.Module,
    pixels: Tensor,
    labels: Tensor,
    settings: StepSettings,
    loss_scale: float,
    backward: Callable[[Tensor], None],
    no_sync: Callable[[], contextlib.AbstractContextManager],
    sync: bool,
    generator: torch.Generator | None = None,
) -> StepResult:
    """Forward(s) and backward(s) of one micro-batch; gradients accumulate in the parameters' `.grad`.

    Args:
        model: the (possibly DDP/DeepSpeed-wrapped) captioner: `model(pixels, labels)` → summed CE.
        attack_model: the same captioner unwrapped: used for attack passes that need only the input
            gradient, so they never enter DDP's reducer.
        pixels: (B,3,S,S) float in [0,1]; labels: (B,L) long, -100 on padding.
        loss_scale: multiplies every summed loss before backward (world / global target tokens).
        backward: `accelerator.backward`; no_sync: `lambda: accelerator.no_sync(model)`.
        sync: False for micro-batches before the last of an accumulation (their backward must not sync).
    """
    if settings.mode not in TRAIN_MODES:
        raise ValueError(f"unknown training mode {settings.mode!r}: expected one of {TRAIN_MODES}")
    outer = contextlib.nullcontext() if sync else no_sync()
    with outer:
        if settings.mode == "clean":
            loss = model(pixels, labels)
            backward(loss * loss_scale)
            return StepResult(loss.detach(), None, None, None)
        alpha = settings.clean_weight
        if settings.mode == "adversarial" or alpha == 0.0:
            return _adversarial_only(model, attack_model, pixels, labels, settings, loss_scale, backward, generator)
        if settings.random_start or settings.scheme == "combined":
            return _mixed_combined(model, attack_model, pixels, labels, settings, loss_scale, backward, generator)
        return _mixed_reuse(model, pixels, labels, settings, loss_scale, backward, no_sync, sync)


def _attack_loss(attack_model: torch.nn.Module, labels: Tensor) -> Callable[[Tensor], Tensor]:
    """The attack target during training: the batch's own captions, teacher-forced."""
    return lambda images: attack_model(images, labels)


def _zero_fraction(grad: Tensor) -> Tensor:
    return (grad == 0).float().mean().detach()


def _adversarial_only(model, attack_model, pixels, labels, settings, loss_scale, backward, generator) -> StepResult:
    loss_fn = _attack_loss(attack_model, labels)
    if settings.random_start:
        clean_loss, grad = None, None
        adv = _fgsm(loss_fn, pixels, settings.epsilon, random_start=True, generator=generator)
        zero = None
    else:
        clean_loss, grad = input_gradient(loss_fn, pixels)
        adv = _fgsm(loss_fn, pixels, settings.epsilon, grad=grad)
        zero = _zero_fraction(grad)
    adv_loss = model(adv, labels)
    backward(adv_loss * loss_scale)
    return StepResult(clean_loss, adv_loss.detach(), adv, zero)


def _mixed_reuse(model, pixels, labels, settings, loss_scale, backward, no_sync, sync) -> StepResult:
    alpha = settings.clean_weight
    x = pixels.detach().requires_grad_(True)
    # The clean backward never syncs: only the adversarial one below (on the last micro-batch) does.
    with no_sync() if sync else contextlib.nullcontext():
        clean_loss = model(x, labels)
        backward(clean_loss * (alpha * loss_scale))
    grad = x.grad  # α·scale·∂L/∂x: the sign, all FGSM needs, is that of ∂L/∂x (α, scale > 0)
    adv = _fgsm(None, pixels, settings.epsilon, grad=grad)
    adv_loss = model(adv, labels)
    backward(adv_loss * ((1.0 - alpha) * loss_scale))
    return StepResult(clean_loss.detach(), adv_loss.detach(), adv, _zero_fraction(grad))


def _mixed_combined(model, attack_model, pixels, labels, settings, loss_scale, backward, generator) -> StepResult:
    alpha = settings.clean_weight
    if settings.random_start:
        # The clean gradient is at x, the attack needs it at the random start: a separate attack pass.
        adv = _fgsm(_attack_loss(attack_model, labels), pixels, settings.epsilon, random_start=True, generator=generator)
        clean_loss, zero = attack_model(pixels, labels), None
    else:
        x = pixels.detach().requires_grad_(True)
        clean_loss = attack_model(x, labels)  # unwrapped: see the module docstring
        (grad,) = torch.autograd.grad(clean_loss, x, retain_graph=True)
        adv, zero = _fgsm(None, pixels, settings.epsilon, grad=grad), _zero_fraction(grad)
    adv_loss = model(adv, labels)
    backward((alpha * clean_loss + (1.0 - alpha) * adv_loss) * loss_scale)
    return StepResult(clean_loss.detach(), adv_loss.detach(), adv, zero)
