"""The training step (advcap.step) on a tiny captioner: passes per mode and scheme, the two mixed schemes agree,
the gradient is that of α·mean-CE(clean) + (1-α)·mean-CE(FGSM) computed independently, FGSM stays in the ε-ball,
frozen modules get no gradient yet pass the input gradient, and 2 real gloo ranks × B equal 1 rank × 2B."""

from __future__ import annotations

import contextlib
import socket
from types import SimpleNamespace

import pytest
import torch

from advcap.freeze import apply_freeze
from advcap.model import Captioner, build_captioner
from advcap.step import StepSettings, train_micro_step

S = 32  # image side in px
EPS = 0.05
ALPHA = 0.3  # not 0.5, so swapped weights show
# Captions of different lengths: labels get -100 padding after the first EOS.
CAPTIONS = [
    "a red square", "the small blue circle left of a large green shape", "a circle", "green square of the shape",
]


def make_captioner(tokenizer, dropout: float = 0.0, seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    cfg = SimpleNamespace(preset="tiny", encoder=None, decoder=None, init_from=None, dropout=dropout)
    return build_captioner(cfg, S, tokenizer)


def labels_for(tokenizer, captions: list[str]) -> torch.Tensor:
    rows = [tokenizer(c)["input_ids"] + [tokenizer.eos_token_id] for c in captions]
    width = max(map(len, rows))
    return torch.tensor([row + [-100] * (width - len(row)) for row in rows])


def make_batch(tokenizer, captions=CAPTIONS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.rand(len(captions), 3, S, S, generator=torch.Generator().manual_seed(seed))
    pixels[:, :, 0, :] = 0.0  # saturated rows at both ends of the range: FGSM must clip there
    pixels[:, :, -1, :] = 1.0
    return pixels, labels_for(tokenizer, captions)


def run_step(model, pixels, labels, mode: str, scheme: str = "reuse", loss_scale: float | None = None, **kw):
    """One single-process micro-step, as train.py runs it without Accelerate's wrappers."""
    tokens = int((labels != -100).sum())
    settings = StepSettings(mode=mode, clean_weight=ALPHA, epsilon=EPS, scheme=scheme, **kw)
    return train_micro_step(
        model, model, pixels, labels, settings,
        loss_scale=1.0 / tokens if loss_scale is None else loss_scale,
        backward=lambda loss: loss.backward(), no_sync=contextlib.nullcontext, sync=True,
    )


def grads(model) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


class ForwardCounter:
    """Counts calls of one Captioner instance's forward (nn.Module.__call__ looks up `self.forward`)."""

    def __init__(self, captioner: Captioner):
        self.calls = 0
        original = captioner.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        captioner.forward = counted


# ---------------------------------------------------------------- passes per micro-step


@pytest.mark.parametrize("scheme", ["reuse", "combined"])
@pytest.mark.parametrize("mode, expected", [("clean", 1), ("adversarial", 2), ("mixed", 2)])
def test_forward_calls_per_micro_step(tokenizer, mode, expected, scheme):
    model = make_captioner(tokenizer)
    counter = ForwardCounter(model)
    pixels, labels = make_batch(tokenizer)
    result = run_step(model, pixels, labels, mode, scheme)
    assert counter.calls == expected
    assert all(p.grad is not None for p in model.parameters())  # and it did backpropagate
    assert (result.adv_pixels is None) == (mode == "clean")


# ---------------------------------------------------------------- the two mixed schemes


def test_reuse_and_combined_schemes_give_the_same_gradients_and_adversarial_images(tokenizer):
    pixels, labels = make_batch(tokenizer)
    out = {}
    for scheme in ("reuse", "combined"):
        model = make_captioner(tokenizer)
        result = run_step(model, pixels, labels, "mixed", scheme)
        out[scheme] = (grads(model), result)
    (g_reuse, r_reuse), (g_comb, r_comb) = out["reuse"], out["combined"]
    assert torch.equal(r_reuse.adv_pixels, r_comb.adv_pixels)
    assert torch.equal(r_reuse.clean_loss_sum, r_comb.clean_loss_sum)
    torch.testing.assert_close(r_reuse.adv_loss_sum, r_comb.adv_loss_sum, rtol=1e-6, atol=1e-6)
    assert g_reuse.keys() == g_comb.keys()
    for name in g_reuse:
        torch.testing.assert_close(g_reuse[name], g_comb[name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------- the gradient, computed independently


def hf_mean_loss(captioner: Captioner, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token CE through HF's own `labels=` path (its shift and its loss), not through Captioner.forward."""
    mean = torch.tensor(captioner.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(captioner.image_std).view(1, 3, 1, 1)
    return captioner.model(pixel_values=(pixels - mean) / std, labels=labels).loss


@pytest.mark.parametrize("scheme", ["reuse", "combined"])
@pytest.mark.parametrize("mode, alpha", [("mixed", ALPHA), ("adversarial", 0.0), ("clean", 1.0)])
def test_gradient_is_that_of_the_weighted_mean_token_losses(tokenizer, mode, alpha, scheme):
    pixels, labels = make_batch(tokenizer)
    lengths = (labels != -100).sum(1)
    assert len(set(lengths.tolist())) > 1, "the batch must mix caption lengths"

    model = make_captioner(tokenizer)
    result = run_step(model, pixels, labels, mode, scheme)  # loss_scale = 1 / total target tokens
    step_grads = grads(model)

    reference = make_captioner(tokenizer)
    x = pixels.clone().requires_grad_(True)
    (g_x,) = torch.autograd.grad(hf_mean_loss(reference, x, labels), x)
    x_adv = (pixels + EPS * g_x.sign()).clamp(0, 1)  # textbook FGSM
    if mode != "clean":
        # attacks.fgsm rounds the ε-ball's edges toward x: equal up to an ulp or two.
        torch.testing.assert_close(result.adv_pixels, x_adv, rtol=0, atol=1e-6)
        x_adv = result.adv_pixels  # the reference loss is then evaluated at exactly the step's images
    reference.zero_grad(set_to_none=True)
    loss = alpha * hf_mean_loss(reference, pixels, labels)
    if alpha < 1.0:
        loss = loss + (1 - alpha) * hf_mean_loss(reference, x_adv, labels)
    loss.backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(step_grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_loss_sums_are_summed_token_cross_entropies(tokenizer):
    """The logged figures: clean/adversarial losses are sums over target tokens (the mean × token count)."""
    pixels, labels = make_batch(tokenizer)
    model = make_captioner(tokenizer)
    result = run_step(model, pixels, labels, "mixed")
    tokens = int((labels != -100).sum())
    with torch.no_grad():
        clean = hf_mean_loss(model, pixels, labels) * tokens
        adv = hf_mean_loss(model, result.adv_pixels, labels) * tokens
    torch.testing.assert_close(result.clean_loss_sum, clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.adv_loss_sum, adv, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- FGSM inside the step


@pytest.mark.parametrize(
    "mode, scheme, random_start",
    [
        ("adversarial", "reuse", False),
        ("mixed", "reuse", False),
        ("mixed", "combined", False),
        ("adversarial", "reuse", True),
        ("mixed", "combined", True),
    ],
)
def test_fgsm_images_stay_in_the_epsilon_ball_and_in_range(tokenizer, mode, scheme, random_start):
    model = make_captioner(tokenizer)
    pixels, labels = make_batch(tokenizer)
    kwargs = {"generator": torch.Generator().manual_seed(3)} if random_start else {}
    settings = StepSettings(mode=mode, clean_weight=ALPHA, epsilon=EPS, random_start=random_start, scheme=scheme)
    result = train_micro_step(
        model, model, pixels, labels, settings, 1.0 / int((labels != -100).sum()),
        lambda loss: loss.backward(), contextlib.nullcontext, sync=True, **kwargs,
    )
    adv = result.adv_pixels
    assert adv.shape == pixels.shape and adv.dtype == pixels.dtype and not adv.requires_grad
    assert ((adv - pixels).abs() <= EPS).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert not torch.equal(adv, pixels)
    # Most entries moved (a dense input gradient); saturated pixels pushed outward stay clipped.
    assert ((adv - pixels).abs() > EPS / 2).float().mean() > 0.5
    if not random_start:
        assert torch.isclose(result.zero_grad_fraction, torch.tensor(0.0), atol=0.01)


# ---------------------------------------------------------------- frozen modules


@pytest.mark.parametrize("frozen", ["encoder", "decoder"])
@pytest.mark.parametrize("mode, scheme", [("mixed", "reuse"), ("mixed", "combined"), ("adversarial", "reuse")])
def test_frozen_parameters_get_no_grad_but_pass_the_input_gradient(tokenizer, frozen, mode, scheme):
    model = make_captioner(tokenizer)
    counts = apply_freeze(model, SimpleNamespace(modules=frozen, keep_trainable=[], also_freeze=[]))
    assert counts["total"]["frozen"] > 0 and counts["total"]["trainable"] > 0
    pixels, labels = make_batch(tokenizer)
    result = run_step(model, pixels, labels, mode, scheme)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    # The attack's gradient went through the frozen part (the encoder, or the decoder reading its features).
    assert not torch.equal(result.adv_pixels, pixels)
    assert result.zero_grad_fraction < 0.01


# ---------------------------------------------------------------- 2 real DDP ranks × B == 1 rank × 2B

# Tolerances. The all-reduced gradients match the one-batch gradients up to float32 summation order (seen:
# ≤ 3e-8 on gradients up to 0.4). AdamW's first step moves every weight by lr·g/(|g|+1e-8) ≈ ±lr, which
# amplifies rounding in gradients near 1e-8 up to lr·δg/1e-8; so weights are compared at 1% of lr. A wrong
# gradient (another loss weighting per rank, a missing all-reduce) flips or rescales updates by ~lr.
DDP_LR = 1e-4
DDP_WEIGHT_ATOL = 1e-6
DDP_GRAD_RTOL, DDP_GRAD_ATOL = 1e-5, 1e-7
# (scheme, micro-batches per rank): accumulation runs the first micro-batch under no_sync.
DDP_CASES = [("reuse", 1), ("combined", 1), ("reuse", 2)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _adamw_step(model, pixels, labels, scheme, loss_scale, accelerator=None, accum: int = 1):
    """`accum` mixed micro-steps (all but the last without gradient sync, as train.py runs them) and one AdamW
    step; returns (weights, parameter gradients) after it."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=DDP_LR)
    if accelerator is None:
        backward, no_sync, attack_model = (lambda loss: loss.backward()), contextlib.nullcontext, model
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        backward, no_sync = accelerator.backward, (lambda: accelerator.no_sync(model))
        attack_model = accelerator.unwrap_model(model)
    settings = StepSettings(mode="mixed", clean_weight=ALPHA, epsilon=EPS, scheme=scheme)
    for i, (p, l) in enumerate(zip(pixels.chunk(accum), labels.chunk(accum))):
        train_micro_step(model, attack_model, p, l, settings, loss_scale, backward, no_sync, sync=i == accum - 1)
    gradients = {n: p.grad.clone() for n, p in attack_model.named_parameters()}
    optimizer.step()
    return {k: v.detach().clone() for k, v in attack_model.state_dict().items()}, gradients


def _ddp_worker(rank: int, world: int, port: int, init_state, pixels, labels, tokenizer_dir, out_path) -> None:
    """One gloo rank: its half of the fixed batch, loss_scale = world / global tokens as train.py computes it."""
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from advcap.tokenizer import load_tokenizer

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world and accelerator.distributed_type == DistributedType.MULTI_CPU
    per_rank = pixels.shape[0] // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    local_tokens = torch.tensor(float((labels[mine] != -100).sum()))
    global_tokens = accelerator.reduce(local_tokens, "sum").item()
    results = {}
    for scheme, accum in DDP_CASES:
        model = make_captioner(load_tokenizer(tokenizer_dir))
        model.load_state_dict(init_state)
        results[scheme, accum] = _adamw_step(
            model, pixels[mine], labels[mine], scheme, world / global_tokens, accelerator, accum
        )
    torch.save(results, f"{out_path}.rank{rank}")
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def _worst(a: dict, b: dict) -> tuple[str, float]:
    return max(((name, (a[name] - b[name]).abs().max().item()) for name in b), key=lambda kv: kv[1])


@pytest.mark.slow
def test_two_ddp_ranks_equal_one_rank_with_the_whole_batch(tokenizer, tmp_path):
    import torch.multiprocessing as mp

    world = 2
    captions = CAPTIONS + ["a large red circle", "blue", "the shape of a small green square left", "a blue square"]
    pixels, labels = make_batch(tokenizer, captions, seed=5)
    halves = [(labels[:4] != -100).sum().item(), (labels[4:] != -100).sum().item()]
    assert halves[0] != halves[1], "the ranks must hold different token counts"
    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(str(tokenizer_dir))
    init_state = make_captioner(tokenizer).state_dict()

    # spawn, not fork: the parent's OpenMP pool does not survive a fork reliably.
    mp.start_processes(
        _ddp_worker, args=(world, _free_port(), init_state, pixels, labels, str(tokenizer_dir), str(tmp_path / "out")),
        nprocs=world, start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"out.rank{r}") for r in range(world)]
    tokens = int((labels != -100).sum())
    for case in DDP_CASES:
        model = make_captioner(tokenizer)
        model.load_state_dict(init_state)
        weights, gradients = _adamw_step(model, pixels, labels, case[0], 1.0 / tokens)  # 1 rank, 1 micro-batch
        assert _worst(weights, init_state)[1] > 50 * DDP_WEIGHT_ATOL  # the step is large against the tolerance
        for rank, (rank_weights, rank_gradients) in enumerate(ranks[r][case] for r in range(world)):
            for name, g in gradients.items():
                torch.testing.assert_close(
                    rank_gradients[name], g, rtol=DDP_GRAD_RTOL, atol=DDP_GRAD_ATOL,
                    msg=lambda m, name=name: f"{case}, rank {rank}, gradient of {name}: {m}",
                )
            name, diff = _worst(rank_weights, weights)
            assert diff <= DDP_WEIGHT_ATOL, f"{case}, rank {rank}: {name} differs by {diff:.3g}"
        # The ranks agree exactly: one all-reduced gradient, the same AdamW update.
        assert _worst(ranks[0][case][0], ranks[1][case][0])[1] == 0.0
