"""Host synchronisations of the training step, counted per ATen op on the tiny captioner.

On a GPU every op that hands a tensor's value (or a data-dependent shape) to the host stalls the stream
until the device drains. The step's own code (the attack, the loss weighting) must make none: what a
micro-step makes is the captioner's own forward passes' and nothing more, in every mode, scheme and
freeze policy. Counted on the CPU, where the same ops run through the same dispatcher.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from test_step import ALPHA, EPS, ForwardCounter, make_batch, make_captioner
from torch.utils._python_dispatch import TorchDispatchMode

from advcap.attacks import fgsm, pgd
from advcap.freeze import apply_freeze
from advcap.step import StepSettings, train_micro_step

# Ops that return a tensor's value to the host, or whose output shape depends on values; torch tags the
# latter (and `_local_scalar_dense`, what `.item()`, `bool()`, `int()`, `float()` run) and the rest are
# listed here: `equal` returns a Python bool, `is_nonzero`/`allclose`/`item` in case a backend
# dispatches them whole.
ALWAYS_SYNC = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "argwhere",
                         "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                         "bincount", "histc", "histogram"})
SYNC_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
MASK_INDEXING = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})  # sync with a boolean mask


def forces_host_sync(func, args: tuple, kwargs: dict) -> bool:
    """Whether this ATen call makes the host wait for the device (on a GPU)."""
    name = func._overloadpacket.__name__
    if name in MASK_INDEXING:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if name == "repeat_interleave":  # the output length is read from the repeats unless given
        return kwargs.get("output_size") is None
    if name == "one_hot":  # num_classes=-1: the largest index is read
        return (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) < 0
    if name in ("_to_copy", "copy_"):  # a device-to-host copy (non_blocking aside)
        src, dst = (args[0].device, kwargs.get("device")) if name == "_to_copy" else (args[1].device, args[0].device)
        return dst is not None and torch.device(dst).type == "cpu" and src.type != "cpu"
    return name in ALWAYS_SYNC or any(tag in func.tags for tag in SYNC_TAGS)


class HostSyncs(TorchDispatchMode):
    """Counts, by op name, the ATen calls that force a device-to-host synchronisation."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if forces_host_sync(func, args, kwargs):
            self.ops[func._overloadpacket.__name__] += 1
        return func(*args, **kwargs)


# ---------------------------------------------------------------- the counter itself


def test_the_counter_sees_each_kind_of_sync_and_not_arithmetic():
    x = torch.tensor([0.0, 1.0, 2.0, 2.0])
    syncing = [
        lambda: x.sum().item(), lambda: bool(x.any()), lambda: float(x.max()), lambda: x.nonzero(),
        lambda: torch.equal(x, x), lambda: x[x > 0], lambda: x.unique(), lambda: torch.repeat_interleave(x.long()),
        lambda: torch.allclose(x, x),
    ]
    for i, op in enumerate(syncing):
        with HostSyncs() as syncs:
            op()
        assert syncs.total >= 1, f"syncing op {i} not counted"
    with HostSyncs() as syncs:
        y = torch.where(x > 1, x * 2, x).clamp(0, 3)
        torch.maximum(y, x).sum()
        x[torch.tensor([0, 2])]
        torch.repeat_interleave(x, torch.tensor([1, 1, 1, 1]), output_size=4)
    assert syncs.total == 0, syncs.ops


# ---------------------------------------------------------------- the attacks


def test_fgsm_and_its_box_make_no_sync_when_the_range_is_trusted(tokenizer):
    pixels, _ = make_batch(tokenizer)
    grad = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(1))
    linear = lambda images: (weights * images).sum()  # noqa: E731 (a loss that itself makes no sync)
    with HostSyncs() as syncs:
        fgsm(None, pixels, EPS, grad=grad, check_range=False)
        fgsm(linear, pixels, EPS, check_range=False)
        fgsm(linear, pixels, EPS, random_start=True, generator=torch.Generator().manual_seed(2), check_range=False)
    assert syncs.ops == {}
    # Evaluation's attacks check the range at their edge: one read of the min and max, nothing per step.
    with HostSyncs() as syncs:
        fgsm(linear, pixels, EPS)
        pgd(linear, pixels, EPS, EPS / 4, steps=5, generator=torch.Generator().manual_seed(3))
    assert syncs.ops == {"_local_scalar_dense": 4}


# ---------------------------------------------------------------- one micro-step per mode

# (mode, scheme, random start, frozen modules)
CASES = [
    ("clean", "reuse", False, "none"),
    ("adversarial", "reuse", False, "none"),
    ("adversarial", "reuse", True, "none"),
    ("mixed", "reuse", False, "none"),
    ("mixed", "combined", False, "none"),
    ("mixed", "combined", True, "none"),
    ("mixed", "reuse", False, "encoder"),
    ("mixed", "reuse", False, "decoder"),
    ("mixed", "combined", False, "encoder"),
    ("mixed", "combined", False, "decoder"),
    ("adversarial", "reuse", False, "encoder"),
    ("adversarial", "reuse", False, "decoder"),
]


def micro_step_syncs(tokenizer, mode: str, scheme: str, random_start: bool, frozen: str) -> tuple[HostSyncs, int]:
    """Host syncs of one micro-step (forwards and backwards) and the captioner forwards it ran."""
    model = make_captioner(tokenizer)
    if frozen != "none":
        apply_freeze(model, SimpleNamespace(modules=frozen, keep_trainable=[], also_freeze=[]))
    forwards = ForwardCounter(model)
    pixels, labels = make_batch(tokenizer)
    settings = StepSettings(mode=mode, clean_weight=ALPHA, epsilon=EPS, random_start=random_start, scheme=scheme)
    loss_scale = 1.0 / int((labels != -100).sum())  # train.py counts tokens on the loader's CPU batch, per step
    generator = torch.Generator().manual_seed(0)
    with HostSyncs() as syncs:
        result = train_micro_step(
            model, model, pixels, labels, settings, loss_scale, lambda loss: loss.backward(), contextlib.nullcontext,
            sync=True, generator=generator,
        )
    assert (result.adv_pixels is None) == (mode == "clean")  # the step ran what it was asked
    return syncs, forwards.calls


@pytest.fixture(scope="module")
def per_forward(tokenizer) -> Counter:
    """The syncs of a clean micro-step: one forward, one backward: what the captioner itself makes."""
    syncs, forwards = micro_step_syncs(tokenizer, "clean", "reuse", False, "none")
    assert forwards == 1
    return syncs.ops


def test_the_captioner_makes_at_most_one_sync_per_forward(per_forward):
    """transformers' GPT-2 reads ids and positions on the host when no decoder mask is given (a padding
    warning, a packed-sequence check); the captioner passes one, which leaves SDPA's all-ones check."""
    assert sum(per_forward.values()) <= 1, per_forward


@pytest.mark.parametrize("mode, scheme, random_start, frozen", CASES)
def test_the_step_makes_no_sync_beyond_the_captioners_forwards(tokenizer, per_forward, mode, scheme, random_start,
                                                               frozen):
    syncs, forwards = micro_step_syncs(tokenizer, mode, scheme, random_start, frozen)
    allowed = Counter({op: n * forwards for op, n in per_forward.items()})
    extra = syncs.ops - allowed
    assert not extra, (
        f"{mode}/{scheme}{'/random start' if random_start else ''}/frozen {frozen}: {dict(syncs.ops)} in "
        f"{forwards} forwards, {dict(extra)} beyond the captioner's {dict(per_forward)} per forward"
    )
