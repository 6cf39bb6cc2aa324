"""L∞ adversarial attacks on pixels in [0,1]: FGSM (optionally random-start) and PGD.

The functions are pure. They see the model only through ``loss_fn(images) -> scalar loss``, which
they maximise (untargeted), and they take the gradient with ``torch.autograd.grad`` w.r.t. the
images alone. So parameter ``.grad``, the optimizer and DDP's all-reduce are never touched, and a
fully frozen model (every parameter ``requires_grad=False``) works as long as the loss is
differentiable in the pixels. Train/eval mode of the model is the caller's choice.

Units: ε and step sizes are in [0,1] pixel units (the paper's ε = 0.1 on ViT's [-1,1] inputs is
0.05 here). Every result is detached, has the images' shape, dtype and device, lies in [0,1], and
is within ε of the clean images as floats: ``(x_adv - x).abs() <= ε`` holds exactly when the
difference is computed in the images' dtype. Plain ``x + ε`` often rounds one ulp past ε, so the
ε-ball's edges are rounded toward x (see ``_linf_box``); results can differ from the textbook
formula by an ulp or two of 1.0 (≤ 2.4e-7 in float32), never by more.

Host synchronisation: past the argument checks, an attack is pure tensor arithmetic (no ``.item()``, no
branch on a tensor's value), so on a GPU it never waits for the device. The one check that must read
values, images in [0,1], runs by default and is skipped with ``check_range=False``: the train step does
so, because its batches are in [0,1] by construction (the loader divides uint8 pixels by 255).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

LossFn = Callable[[Tensor], Tensor]
"""Maps images (B,3,H,W) in [0,1] to a scalar (0-dim) loss to be maximised."""


def input_gradient(loss_fn: LossFn, images: Tensor) -> tuple[Tensor, Tensor]:
    """Loss and its gradient w.r.t. the images, without touching any parameter's ``.grad``.

    Args:
        loss_fn: images -> 0-dim loss tensor. Runs with autograd enabled even if the caller
            is under ``torch.no_grad()`` (evaluation loops usually are).
        images: float tensor, any shape, typically (B,3,H,W) in [0,1]. Not modified.

    Returns:
        ``(loss, grad)``: the detached 0-dim loss, and ∂loss/∂images with the images' shape,
        dtype and device.
    """
    x = images.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a torch.Tensor, got {type(loss).__name__}")
    if loss.ndim != 0:
        raise ValueError(
            f"loss_fn must return a scalar (0-dim) loss, got shape {tuple(loss.shape)}; "
            "reduce it first, e.g. with .mean()"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not depend on the images (no autograd graph): does loss_fn detach "
            "its input or run under torch.inference_mode()?"
        )
    # inputs=x only: parameters' AccumulateGrad nodes never run, so their .grad stays as it was.
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        raise ValueError("the loss does not depend on the images: loss_fn must use its argument")
    return loss.detach(), grad


def fgsm(
    loss_fn: LossFn,
    images: Tensor,
    epsilon: float,
    random_start: bool = False,
    grad: Tensor | None = None,
    generator: torch.Generator | None = None,
    step_size: float | None = None,
    check_range: bool = True,
) -> Tensor:
    """Fast gradient sign method: one signed-gradient step, projected to the ε-ball and [0,1].

    Without random start: ``x' = clip(x + ε·sign(∇ₓL(x)), 0, 1)``. With ``random_start`` (Wong
    et al. 2020, "Fast is better than free"): ``x0 = clip(x + U(-ε, ε), 0, 1)``, then
    ``x' = Π(x0 + α·sign(∇L(x0)))`` with α = 1.25ε and Π the projection onto the ε-ball around x
    intersected with [0,1].

    Args:
        loss_fn: images -> 0-dim loss, maximised. Not called when ``grad`` is given.
        images: clean images, float, any shape (B,3,H,W typical), values in [0,1].
        epsilon: L∞ radius in [0,1] pixel units, ≥ 0. ε = 0 returns a copy of the images.
        random_start: start from a uniform random point in the ε-ball (default: no).
        grad: ∇ₓL at the clean images, same shape as ``images``, if the caller already has it
            (the train step's clean pass); then no forward or backward is run here.
            Not allowed with ``random_start`` (the gradient would be at the wrong point).
        generator: RNG for the random start (any device); ``None`` uses the global RNG.
        step_size: α in pixel units, > 0; default ε, or 1.25ε with ``random_start``.
        check_range: check that the images lie in [0,1] (reads their min/max on the host, a device
            sync); False only where the caller guarantees the range, as the train step does.

    Returns:
        Detached adversarial images: same shape/dtype/device, in [0,1], ``|x' - x| ≤ ε``.
    """
    epsilon = _check_number("epsilon", epsilon, allow_zero=True)
    if step_size is not None:
        step_size = _check_number("step_size", step_size, allow_zero=False)
    _check_images(images, check_range)
    if grad is not None:
        if random_start:
            raise ValueError(
                "grad= is the gradient at the clean images, but random_start=True needs it at "
                "the random start point; pass grad=None with random_start=True"
            )
        if grad.shape != images.shape:
            raise ValueError(
                f"grad must have the images' shape {tuple(images.shape)}, got {tuple(grad.shape)}"
            )
    x = images.detach()
    if epsilon == 0:
        return x.clone()
    lo, hi = _linf_box(x, epsilon)
    if random_start:
        start = _random_start(x, epsilon, lo, hi, generator)
        alpha = 1.25 * epsilon if step_size is None else step_size
    else:
        start = x
        alpha = epsilon if step_size is None else step_size
    if grad is None:
        _, grad = input_gradient(loss_fn, start)
    with torch.no_grad():
        return torch.clamp(start + alpha * grad.detach().sign().to(x.dtype), lo, hi)


def pgd(
    loss_fn: LossFn,
    images: Tensor,
    epsilon: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    restarts: int = 1,
    per_image_loss: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Projected gradient descent (Madry et al. 2018), L∞, on the loss to maximise.

    ``x0 = x`` (or ``clip(x + U(-ε, ε), 0, 1)`` with ``random_start``); then ``steps`` times
    ``x ← Π(x + step_size·sign(∇L(x)))``, with Π the projection onto the ε-ball around the clean
    images intersected with [0,1]. Calls ``loss_fn`` ``steps`` times per restart.

    With ``restarts`` > 1 (which needs ``random_start``), the attack runs from that many random starts
    and keeps, per image, the final iterate with the highest ``per_image_loss`` (the same loss, one value
    per image): the restart that hurts that image most by the attack's own loss.

    Args:
        loss_fn: images -> 0-dim loss, maximised.
        images: clean images, float, any shape (B,3,H,W typical), values in [0,1].
        epsilon: L∞ radius in [0,1] pixel units, ≥ 0. ε = 0 returns a copy of the images.
        step_size: per-step size in pixel units, > 0 (commonly 2.5·ε/steps); 0 is allowed when ε = 0.
        steps: number of gradient steps, ≥ 1.
        random_start: start from a uniform random point in the ε-ball (default: yes).
            Without it the attack is deterministic.
        generator: RNG for the random starts (any device); ``None`` uses the global RNG.
        restarts: random starts, ≥ 1.
        per_image_loss: images -> (B,) losses, needed when ``restarts`` > 1.

    Returns:
        Detached adversarial images: same shape/dtype/device, in [0,1], ``|x' - x| ≤ ε``.
    """
    epsilon = _check_number("epsilon", epsilon, allow_zero=True)
    # ε = 0 leaves nothing to travel: the usual rule's step (2.5ε/steps) is then 0, and allowed.
    step_size = _check_number("step_size", step_size, allow_zero=epsilon == 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    if restarts > 1 and (not random_start or per_image_loss is None):
        raise ValueError("restarts > 1 need random_start=True and a per_image_loss to choose between them")
    _check_images(images, check_range=True)
    x = images.detach()
    if epsilon == 0:
        return x.clone()
    lo, hi = _linf_box(x, epsilon)
    best, best_loss = None, None
    for _ in range(restarts):
        x_adv = _random_start(x, epsilon, lo, hi, generator) if random_start else x.clone()
        for _ in range(steps):
            _, grad = input_gradient(loss_fn, x_adv)
            with torch.no_grad():
                x_adv = torch.clamp(x_adv + step_size * grad.sign(), lo, hi)
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            loss = per_image_loss(x_adv).detach()
            if best is None:
                best, best_loss = x_adv, loss
            else:
                better = loss > best_loss
                best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
                best_loss = torch.maximum(loss, best_loss)
    return best


def _linf_box(x: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Elementwise bounds ``[lo, hi]`` of the ε-ball around x intersected with [0,1].

    ``fl(x + ε) - x`` exceeds ε for most float32 pixels (one ulp of rounding), so each bound
    is stepped toward x until its float distance to x is at most ε (one or two steps).

    Pure tensor arithmetic, no host read: a fixed number of steps, each applied only where the bound
    is still outside, instead of a loop until none is (whose test would stall a GPU stream). A bound
    inside is left bit for bit as it is, so a step more than needed changes nothing.
    """
    limit = _floor_to_dtype(epsilon, x.dtype)  # |d| > ε exactly when |d| > limit, for d of x's dtype
    with torch.no_grad():
        hi = _lower_into_ball(torch.clamp(x + epsilon, max=1.0), x, limit)
        lo = _raise_into_ball(torch.clamp(x - epsilon, min=0.0), x, limit)
    return lo, hi


ROUNDING_STEPS = 3
"""Steps toward x a bound takes at most. Pixels in [0,1] need one or two: fl(x ± ε) is within an ulp
of the true edge, one step brings it inside, and rounding the float difference can ask for one more
(tests/test_attacks.py compares with a loop that runs until every bound is inside)."""


def _lower_into_ball(hi: Tensor, x: Tensor, limit: float) -> Tensor:
    """Step ``hi`` (≥ x ≥ 0) down by its own ulp until ``hi - x <= limit``; never below x."""
    for _ in range(ROUNDING_STEPS):
        stepped = torch.maximum(hi - _spacing_above(hi), x)
        hi = torch.where(hi - x > limit, stepped, hi)
    return _inside_or_x(hi, x, limit)


def _raise_into_ball(lo: Tensor, x: Tensor, limit: float) -> Tensor:
    """Step ``lo`` (0 ≤ lo ≤ x) up by x's ulp until ``x - lo <= limit``; never above x.

    An ulp of x, the larger of the two: near 0 an ulp of lo would be tiny."""
    gap = _spacing_above(x.abs())
    for _ in range(ROUNDING_STEPS):
        lo = torch.where(x - lo > limit, torch.minimum(lo + gap, x), lo)
    return _inside_or_x(lo, x, limit)


def _inside_or_x(bound: Tensor, x: Tensor, limit: float) -> Tensor:
    """The bound, or x itself (always inside) where it is still outside: only for images outside [0,1]."""
    return torch.where((bound - x).abs() > limit, x, bound)


# Per float dtype: the integer type of its width and the bits of its exponent field.
_EXPONENT_FIELD = {
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float32: (torch.int32, 0x7F80_0000),
    torch.float64: (torch.int64, 0x7FF0_0000_0000_0000),
}


def _spacing_above(magnitude: Tensor) -> Tensor:
    """``nextafter(m, inf) - m`` for finite m ≥ 0 below the dtype's maximum, from the exponent bits.

    The gap above m is 2^e·eps for m in [2^e, 2^(e+1)) and the least subnormal below the normals.
    (``torch.nextafter`` itself has no vectorised CPU kernel, and this runs on every image.)
    """
    int_dtype, exponent_bits = _EXPONENT_FIELD[magnitude.dtype]
    power = (magnitude.view(int_dtype) & exponent_bits).view(magnitude.dtype)  # 2^e; 0 below the normals
    info = torch.finfo(magnitude.dtype)
    return torch.clamp(power * info.eps, min=info.tiny * info.eps)


def _floor_to_dtype(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` ≤ ``value`` (finite, ≥ 0), computed on the host.

    For a float d of that dtype, ``d > value`` holds exactly when ``d > _floor_to_dtype(value)``: the
    distance test against ε itself (not against ε rounded to the dtype), without a float64 copy.
    """
    info = torch.finfo(dtype)
    if value >= info.max:
        return float(info.max)
    if value <= 0:
        return 0.0
    _, exponent = math.frexp(value)  # value = m·2^exponent with 0.5 <= m < 1
    # The spacing of dtype numbers in [2^(exponent-1), 2^exponent); below the normals it stays fixed.
    spacing = max(math.ldexp(info.eps, exponent - 1), info.tiny * info.eps)
    return math.floor(value / spacing) * spacing


def _random_start(
    x: Tensor, epsilon: float, lo: Tensor, hi: Tensor, generator: torch.Generator | None
) -> Tensor:
    """``x + U(-ε, ε)`` clipped to the box ``[lo, hi]``; noise drawn on the generator's device."""
    device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    with torch.no_grad():
        return torch.clamp(x + (2 * noise - 1) * epsilon, lo, hi)


def _check_number(name: str, value: float, *, allow_zero: bool) -> float:
    """A finite real ≥ 0 (or > 0), as a float; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound} (pixel units in [0,1]), got {value!r}")
    return number


def _check_images(images: Tensor, check_range: bool) -> None:
    """Images must be a float tensor; with ``check_range``, with values in [0,1] (not normalized pixels).

    The dtype check reads only metadata; the range check reads the min/max on the host (a device sync).
    """
    if not isinstance(images, Tensor) or images.dtype not in _EXPONENT_FIELD:
        kind = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"images must be a floating-point tensor (float16, bfloat16, float32 or float64) in [0,1], got {kind}"
        )
    if check_range and images.numel():
        low, high = (v.item() for v in torch.aminmax(images.detach()))
        if not (0.0 <= low and high <= 1.0):  # also rejects NaN
            raise ValueError(
                "images must lie in [0,1] (pixel space, before normalization), "
                f"got range [{low:.4g}, {high:.4g}]"
            )
