"""Tests for advcap.attacks: FGSM / random-start FGSM / PGD on tiny models, 3x8x8 images."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advcap.attacks import fgsm, input_gradient, pgd

EPS = 0.05
ULP2 = 2 * torch.finfo(torch.float32).eps  # rounding the ball's edges toward x costs ≤ 2 ulps of 1.0


class TinyNet(nn.Module):
    """Conv + linear classifier on 3x8x8 images; tanh keeps the input gradient dense."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class CountingLoss:
    """Cross-entropy of a model; counts calls and records (detached) the points it was called at."""

    def __init__(self, model: nn.Module, labels: torch.Tensor) -> None:
        self.model, self.labels, self.calls, self.points = model, labels, 0, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.points.append(x.detach().clone())
        return F.cross_entropy(self.model(x), self.labels)


@pytest.fixture
def model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def images() -> torch.Tensor:
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x[:, :, 0, :] = 0.0  # saturated pixels at both ends of the range
    x[:, :, -1, :] = 1.0
    return x


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 3])


@pytest.fixture
def loss_fn(model: TinyNet, labels: torch.Tensor) -> CountingLoss:
    return CountingLoss(model, labels)


def reference_grad(model: nn.Module, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """∇ₓ cross-entropy computed independently: backward on a deep copy of the model."""
    twin = copy.deepcopy(model)
    x = images.clone().requires_grad_(True)
    F.cross_entropy(twin(x), labels).backward()
    return x.grad


def assert_in_ball(adv: torch.Tensor, clean: torch.Tensor, eps: float) -> None:
    """|x' - x| ≤ ε both in the images' dtype and as exact reals, and x' ∈ [0,1]."""
    gap = (adv - clean).abs()
    assert (gap <= eps).all(), f"L∞ {gap.max().item()!r} > ε={eps}"
    assert gap.double().max().item() <= eps
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0


ATTACKS = {
    "fgsm": lambda f, x, eps: fgsm(f, x, eps),
    "fgsm_random_start": lambda f, x, eps: fgsm(
        f, x, eps, random_start=True, generator=torch.Generator().manual_seed(0)
    ),
    "pgd": lambda f, x, eps: pgd(
        f, x, eps, step_size=eps / 4, steps=5, generator=torch.Generator().manual_seed(0)
    ),
    "pgd_no_random_start": lambda f, x, eps: pgd(
        f, x, eps, step_size=eps / 4, steps=5, random_start=False
    ),
}


# --- FGSM is the formula --------------------------------------------------------------------


def test_fgsm_matches_formula_up_to_rounding(model, labels, images, loss_fn):
    g = reference_grad(model, labels, images)
    expected = torch.clamp(images + EPS * g.sign(), 0, 1)
    adv = fgsm(loss_fn, images, EPS)
    # x + ε often rounds an ulp outside the ball; fgsm rounds toward x instead, nothing more.
    torch.testing.assert_close(adv, expected, rtol=0, atol=ULP2)
    assert (adv != images).float().mean() > 0.5  # the attack actually moved the pixels
    assert loss_fn.calls == 1


def test_fgsm_is_bit_exact_when_x_plus_eps_is_representable(model, labels):
    # Dyadic pixels (k/256) and ε = 1/16: x ± ε is exact in float32, so no rounding is needed.
    k = torch.randint(0, 257, (4, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    x = k.float() / 256
    g = reference_grad(model, labels, x)
    adv = fgsm(CountingLoss(model, labels), x, 1 / 16)
    assert torch.equal(adv, torch.clamp(x + (1 / 16) * g.sign(), 0, 1))


def test_fgsm_with_given_grad_runs_no_pass_and_matches(model, labels, images, loss_fn):
    _, g = input_gradient(CountingLoss(model, labels), images)
    adv_given = fgsm(loss_fn, images, EPS, grad=g)
    assert loss_fn.calls == 0
    assert torch.equal(adv_given, fgsm(CountingLoss(model, labels), images, EPS))


def test_input_gradient_matches_reference_and_returns_detached_loss(model, labels, images):
    loss, g = input_gradient(CountingLoss(model, labels), images)
    torch.testing.assert_close(g, reference_grad(model, labels, images))
    assert loss.ndim == 0 and not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(model(images), labels).detach())


def test_linear_loss_optimum_is_the_box_corner():
    # For L = Σ w·x both attacks must land on the corner of ball ∩ [0,1] that sign(w) points to.
    w = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    x[0, 0] = 0.0
    x[1, 0] = 1.0
    corner = torch.where(w > 0, (x + EPS).clamp(max=1), (x - EPS).clamp(min=0))
    for adv in (
        fgsm(lambda z: (w * z).sum(), x, EPS),
        pgd(lambda z: (w * z).sum(), x, EPS, step_size=EPS / 3, steps=4, random_start=False),
        # from a random start up to ε on the wrong side: 7·ε/3 ≥ 2ε of travel is enough
        pgd(lambda z: (w * z).sum(), x, EPS, step_size=EPS / 3, steps=7,
            generator=torch.Generator().manual_seed(0)),
    ):
        torch.testing.assert_close(adv, corner, rtol=0, atol=ULP2)
        assert_in_ball(adv, x, EPS)


# --- bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [EPS, 0.1, 0.3])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_result_in_eps_ball_and_unit_range(model, labels, images, attack, eps, dtype):
    model = model.to(dtype)
    x = images.to(dtype)
    adv = ATTACKS[attack](CountingLoss(model, labels), x, eps)
    assert adv.dtype == dtype and adv.shape == x.shape and not adv.requires_grad
    assert_in_ball(adv, x, eps)
    assert (adv != x).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [EPS, 1 / 255, 8 / 255, 0.3])
def test_bounds_exact_for_pixels_near_the_ball_edges(dtype, eps):
    # Pixels just around ε and 1 - ε are where fl(x ± ε) overshoots and the [0,1] clip meets the
    # ball; a linear loss with mixed signs pushes every pixel onto an edge.
    g = torch.Generator().manual_seed(9)
    jitter = (torch.rand(3, 4000, generator=g, dtype=torch.float64) - 0.5) * 1e-5
    x = torch.cat([eps + jitter[0], 1 - eps + jitter[1], torch.rand(4000, generator=g).double(),
                   torch.tensor([0.0, 1.0])]).clamp(0, 1).to(dtype)
    w = torch.randn(x.shape, generator=g)
    linear = lambda z: (w * z.float()).sum()
    for adv in (fgsm(linear, x, eps), pgd(linear, x, eps, step_size=eps, steps=2, generator=g)):
        assert adv.dtype == dtype
        assert_in_ball(adv, x, eps)
    # float32/float64 resolve ε, so fgsm must move essentially the whole way to the edge
    if dtype in (torch.float32, torch.float64):
        corner = torch.where(w > 0, (x + eps).clamp(max=1), (x - eps).clamp(min=0))
        torch.testing.assert_close(fgsm(linear, x, eps), corner, rtol=0, atol=ULP2)


def test_pgd_at_epsilon_zero_takes_the_rules_zero_step(loss_fn, images):
    """ε = 0 (e.g. attack.epsilon=0 with the step rule 2.5ε/steps = 0): the clean images, not an error."""
    out = pgd(loss_fn, images, 0.0, 0.0, 3, restarts=2, per_image_loss=lambda x: x.flatten(1).sum(1))
    assert torch.equal(out, images)
    with pytest.raises(ValueError, match="step_size"):
        pgd(loss_fn, images, 0.1, 0.0, 3)


def test_pgd_projects_every_iterate(loss_fn, images):
    # step_size ≫ ε: every point the loss is evaluated at, not only the result, must be feasible.
    adv = pgd(loss_fn, images, EPS, step_size=10 * EPS, steps=4, random_start=True,
              generator=torch.Generator().manual_seed(0))
    assert loss_fn.calls == 4
    for point in loss_fn.points + [adv]:
        assert_in_ball(point, images, EPS)
    assert not torch.equal(loss_fn.points[0], images)  # the random start moved off x


def test_random_start_fgsm_steps_125_eps_from_the_start_point(images):
    w = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    points: list[torch.Tensor] = []

    def linear(z: torch.Tensor) -> torch.Tensor:
        points.append(z.detach().clone())
        return (w * z).sum()

    adv = fgsm(linear, images, EPS, random_start=True, generator=torch.Generator().manual_seed(6))
    (start,) = points
    assert_in_ball(start, images, EPS)
    assert not torch.equal(start, images)
    lo, hi = (images - EPS).clamp(min=0), (images + EPS).clamp(max=1)
    expected = torch.minimum(torch.maximum(start + 1.25 * EPS * w.sign(), lo), hi)
    torch.testing.assert_close(adv, expected, rtol=0, atol=ULP2)
    # step_size overrides 1.25ε
    points.clear()
    adv_small = fgsm(linear, images, EPS, random_start=True, step_size=0.01,
                     generator=torch.Generator().manual_seed(6))
    expected = torch.minimum(torch.maximum(points[0] + 0.01 * w.sign(), lo), hi)
    torch.testing.assert_close(adv_small, expected, rtol=0, atol=ULP2)


# --- purity: parameters, mode, inputs ------------------------------------------------------


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_parameter_grads_untouched_when_none(model, loss_fn, images, attack):
    ATTACKS[attack](loss_fn, images, EPS)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_parameter_grads_untouched_when_prefilled(model, loss_fn, images, attack):
    sentinels = {}
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i))
        sentinels[p] = (p.grad, p.grad.clone())
    ATTACKS[attack](loss_fn, images, EPS)
    for p, (tensor, value) in sentinels.items():
        assert p.grad is tensor and torch.equal(p.grad, value)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_frozen_model(model, loss_fn, images, attack):
    model.requires_grad_(False)
    _, g = input_gradient(loss_fn, images)
    assert g.abs().sum() > 0
    adv = ATTACKS[attack](loss_fn, images, EPS)
    assert (adv != images).float().mean() > 0.5
    assert_in_ball(adv, images, EPS)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_mode_and_inputs_untouched(model, loss_fn, images, training):
    model.train(training)
    x = images.clone().requires_grad_(True)  # caller's tensor may itself require grad
    before = images.clone()
    for attack in ATTACKS.values():
        adv = attack(loss_fn, x, EPS)
        assert not adv.requires_grad and adv.grad_fn is None
    assert model.training is training
    assert torch.equal(x.detach(), before) and x.grad is None


def test_works_under_caller_no_grad(loss_fn, images):
    # Evaluation loops run under no_grad; the attack still needs (and builds) its own graph.
    with torch.no_grad():
        adv = fgsm(loss_fn, images, EPS)
        adv_pgd = pgd(loss_fn, images, EPS, step_size=EPS / 2, steps=2, random_start=False)
    assert torch.equal(adv, fgsm(loss_fn, images, EPS))
    assert (adv_pgd != images).any()


# --- strength and determinism ----------------------------------------------------------------


def test_pgd_without_random_start_is_deterministic_and_stronger(model, labels, images):
    def loss_at(x: torch.Tensor) -> float:
        with torch.no_grad():
            return F.cross_entropy(model(x), labels).item()

    run = lambda: pgd(CountingLoss(model, labels), images, EPS, EPS / 4, 10, random_start=False)
    first, second = run(), run()
    assert torch.equal(first, second)
    clean, fast = loss_at(images), loss_at(fgsm(CountingLoss(model, labels), images, EPS))
    assert clean < fast <= loss_at(first)


def test_random_start_reproducible_with_generator_and_independent_of_global_rng(loss_fn, images):
    for attack in (
        lambda g: fgsm(loss_fn, images, EPS, random_start=True, generator=g),
        lambda g: pgd(loss_fn, images, EPS, EPS / 4, 3, generator=g),
    ):
        torch.manual_seed(100)
        state = torch.get_rng_state()
        a = attack(torch.Generator().manual_seed(7))
        assert torch.equal(torch.get_rng_state(), state)  # global RNG not consumed
        torch.manual_seed(200)
        b = attack(torch.Generator().manual_seed(7))
        c = attack(torch.Generator().manual_seed(8))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_random_start_changes_the_result(loss_fn, images):
    plain = fgsm(loss_fn, images, EPS)
    rs = fgsm(loss_fn, images, EPS, random_start=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(plain, rs)


@pytest.mark.parametrize(
    "attack",
    [
        lambda f, x: fgsm(f, x, 0.0),
        lambda f, x: fgsm(f, x, 0.0, random_start=True),
        lambda f, x: pgd(f, x, 0.0, step_size=0.01, steps=3),
        lambda f, x: pgd(f, x, 0.0, step_size=0.01, steps=3, random_start=False),
    ],
)
def test_zero_epsilon_returns_a_detached_copy(loss_fn, images, attack):
    x = images.clone().requires_grad_(True)
    adv = attack(loss_fn, x)
    assert torch.equal(adv, images) and not adv.requires_grad
    assert adv.data_ptr() != x.data_ptr()


def test_float64_images_give_float64_gradient(model, labels, images):
    model = model.double()
    _, g = input_gradient(CountingLoss(model, labels), images.double())
    assert g.dtype == torch.float64 and g.shape == images.shape


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda f, x: fgsm(f, x, -0.1), "epsilon"),
        (lambda f, x: fgsm(f, x, float("nan")), "epsilon"),
        (lambda f, x: fgsm(f, x, float("inf")), "epsilon"),
        (lambda f, x: fgsm(f, x, EPS, step_size=0.0), "step_size"),
        (lambda f, x: fgsm(f, x, EPS, random_start=True, grad=torch.zeros_like(x)), "random"),
        (lambda f, x: fgsm(f, x, EPS, grad=torch.zeros(3, 8, 8)), "shape"),
        (lambda f, x: pgd(f, x, -0.1, 0.01, 3), "epsilon"),
        (lambda f, x: pgd(f, x, EPS, 0.0, 3), "step_size"),
        (lambda f, x: pgd(f, x, EPS, -0.01, 3), "step_size"),
        (lambda f, x: pgd(f, x, EPS, 0.01, 0), "steps"),
        (lambda f, x: pgd(f, x, EPS, 0.01, 2.5), "steps"),
        (lambda f, x: fgsm(f, x * 2 - 1, EPS), r"\[0,1\]"),  # normalized pixels by mistake
        (lambda f, x: fgsm(f, (x * 255).to(torch.uint8), EPS), "floating"),
    ],
)
def test_invalid_arguments_raise_value_error(loss_fn, images, call, match):
    with pytest.raises(ValueError, match=match):
        call(loss_fn, images)
    assert loss_fn.calls == 0  # rejected before any work


def test_non_scalar_loss_is_rejected(model, labels, images):
    per_sample = lambda x: F.cross_entropy(model(x), labels, reduction="none")
    with pytest.raises(ValueError, match="scalar"):
        fgsm(per_sample, images, EPS)
    with pytest.raises(TypeError, match="Tensor"):
        fgsm(lambda x: 1.0, images, EPS)


def test_loss_independent_of_images_is_rejected(model, labels, images):
    with pytest.raises(ValueError, match="does not depend"):
        fgsm(lambda x: F.cross_entropy(model(images), labels), images, EPS)  # ignores x
    with pytest.raises(ValueError, match="does not depend"):
        fgsm(lambda x: F.cross_entropy(model(x.detach()), labels).detach(), images, EPS)


# --- the ε-ball's edges without host reads ----------------------------------------------------


def loop_until_inside(bound: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference rounding: step every bound outside the ball by an ulp toward x, compared in
    float64 against ε itself, until no bound is outside (a host read per round)."""
    for _ in range(64):
        over = (bound - x).abs().double() > eps
        if not over.any():
            return bound
        big = torch.maximum(bound.abs(), x.abs())
        step = torch.where(over, torch.nextafter(big, torch.full_like(big, float("inf"))) - big, 0.0)
        bound = torch.where(bound > x, torch.maximum(bound - step, x), torch.minimum(bound + step, x))
    raise AssertionError("the reference loop did not converge")


def unit_interval(dtype: torch.dtype) -> torch.Tensor:
    """Every value of a 16-bit float dtype in [0,1] (-0.0 included); for wider dtypes, 2·10⁵ consecutive
    values around each of 0, ε-ish points, ½ and 1 plus uniform ones."""
    if dtype in (torch.float16, torch.bfloat16):
        every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        return every[(every >= 0) & (every <= 1)]
    width = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    parts = [torch.rand(100_000, generator=torch.Generator().manual_seed(11), dtype=dtype)]
    for centre in (0.0, 1 / 255, 8 / 255, 0.05, 0.3, 0.5, 0.7, 0.95, 1.0):
        bits = int(torch.tensor(centre, dtype=dtype).view(width))
        parts.append(torch.arange(max(bits - 10_000, 0), bits + 10_000, dtype=width).view(dtype))
    return torch.cat(parts).clamp(0, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_epsilon_ball_edges_equal_the_loop_until_inside_bit_for_bit(dtype):
    """The fixed-step, branch-free rounding gives exactly what looping until every bound is inside gives.

    Bit for bit but for the sign of a zero: at x = -0.0 the loop's torch.minimum(+0.0, -0.0) returns either
    zero, by the element's place in the vectorised kernel, where the fixed steps leave +0.0."""
    from advcap.attacks import _linf_box

    x = unit_interval(dtype)
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    bits = lambda t: t.masked_fill(t == 0, 0.0).view(width)  # noqa: E731 (either zero as +0.0)
    for eps in (1 / 255, 2 / 255, 8 / 255, 0.01, 0.03, 0.05, 0.1, 0.3, 0.5, 1e-4):
        lo, hi = _linf_box(x, eps)
        expected_hi = loop_until_inside(torch.clamp(x + eps, max=1.0), x, eps)
        expected_lo = loop_until_inside(torch.clamp(x - eps, min=0.0), x, eps)
        assert torch.equal(bits(hi), bits(expected_hi)), (dtype, eps)
        assert torch.equal(bits(lo), bits(expected_lo)), (dtype, eps)
        assert not lo.signbit().any() and not hi.signbit().any()


def test_unchecked_fgsm_keeps_images_outside_the_range_within_epsilon():
    """check_range=False trusts the caller; given pixels outside [0,1] anyway, the result stays within ε of
    them, and so do both edges of the box (never NaN from the rounding, never an error from a host read)."""
    from advcap.attacks import _linf_box

    x = torch.tensor([-0.5, -1e-30, 1.0 + 1e-6, 2.0, 0.5]).view(1, 5)
    adv = fgsm(None, x, EPS, grad=torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]]), check_range=False)
    for result in (adv, *_linf_box(x, EPS)):
        assert torch.isfinite(result).all()
        assert ((result - x).abs().double() <= EPS).all()
