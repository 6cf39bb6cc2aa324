"""Image conditions at evaluation: clean, attacked (FGSM, PGD, targeted PGD, transfer) and blind images,
and the captions a model gives under each, one batch at a time (no collectives: one rank's work).

    clean           the images as they are
    fgsm            FGSM at `attack.epsilon` against the evaluated model, ascending the loss of the image's
                    first reference caption (fgsm@<ε>: the same at ε, an ε sweep)
    pgd             white-box L∞ PGD at `attack.epsilon`: `eval.pgd_steps` steps of `eval.pgd_step_size` (by
                    default 2.5·ε/steps), from `eval.pgd_restarts` random starts; per image the restart with
                    the highest attack loss is kept. Its target is the first reference, or with
                    `eval.pgd_target: clean_caption` the model's own clean caption (an attacker without labels)
    targeted        PGD that *descends* the loss of a target caption (`eval.target_caption`, or the first
                    reference of the next image in the batch): the attack a captioning user fears most. Scored
                    also against the target: the share of images whose caption becomes the target (success)
                    and BLEU-4 to the target
    transfer-fgsm   FGSM at `attack.epsilon` crafted on another run's model (`eval.transfer_from`)
    blind           all-zero images: the score of a captioner that does not look

Attacks run on the model in eval() mode on its summed token cross-entropy. Random starts draw from a
generator seeded by (the global batch index, the condition, the restart), so the images, and the metrics,
are the same with any number of ranks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from advcap.config import Config, parse_condition
from advcap.errors import AdvcapError

if TYPE_CHECKING:
    import torch

    from advcap.model import Captioner

ATTACKED = ("fgsm", "pgd", "targeted", "transfer-fgsm")  # kinds whose ε defaults to attack.epsilon


@dataclass(frozen=True)
class Condition:
    """One image condition: its name as configured (`fgsm@0.1`), its kind and its ε in [0,1] pixel units."""

    name: str
    kind: str  # clean | fgsm | pgd | targeted | blind | transfer-fgsm
    epsilon: Optional[float] = None  # None for clean and blind


@dataclass(frozen=True)
class Generation:
    """How captions are generated."""

    max_new_tokens: int
    num_beams: int = 1


@dataclass(frozen=True)
class PGDSettings:
    """How PGD attacks at evaluation (see the module docstring)."""

    steps: int = 10
    step_size: Optional[float] = None  # pixel units; None: 2.5·ε / steps
    restarts: int = 2
    random_start: bool = True
    target: str = "reference"  # reference | clean_caption (untargeted PGD's caption)

    @classmethod
    def of(cls, cfg: Config) -> "PGDSettings":
        e = cfg.eval
        return cls(e.pgd_steps, e.pgd_step_size, e.pgd_restarts, e.pgd_random_start, e.pgd_target)

    def step(self, epsilon: float) -> float:
        return self.step_size if self.step_size is not None else 2.5 * epsilon / self.steps


def resolve_conditions(names: Sequence[str], cfg: Config) -> list[Condition]:
    """Parse condition names; ε defaults to `attack.epsilon`. Raises AdvcapError for unknown or repeated ones."""
    if not names:
        raise AdvcapError("no eval condition given")
    conditions = []
    for name in names:
        kind, epsilon = parse_condition(name)
        if kind in ATTACKED and epsilon is None:
            epsilon = cfg.attack.epsilon
        if name in [c.name for c in conditions]:
            raise AdvcapError(f"eval condition {name!r} is given twice")
        conditions.append(Condition(name, kind, epsilon))
    return conditions


def caption_labels(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Generated ids (B,T) with the start token in column 0 → labels (B,T-1) for `Captioner.forward`:
    the tokens after the start token up to and including the first EOS, -100 after it."""
    labels = ids[:, 1:].clone()
    is_eos = labels == eos_id
    after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    labels[after_first_eos] = -100
    return labels


def reference_labels(tokenizer: Any, captions: Sequence[str], max_tokens: int) -> torch.Tensor:
    """Captions → labels (B,L) as the loader makes them (tokens + EOS, at most `max_tokens`, -100 padding)."""
    import torch

    from advcap.data.loader import Tokenize

    tokenize = Tokenize(tokenizer, max_tokens)
    rows = [tokenize(c) for c in captions]
    labels = torch.full((len(rows), max(len(r) for r in rows)), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row)
    return labels


def target_captions(references: Sequence[Sequence[str]], fixed: Optional[str]) -> list[str]:
    """The targeted attack's caption for each image of a batch: `fixed`, or the next image's first reference
    (the last image takes the first's; a batch of one image has no other image: its own, flagged unusable)."""
    if fixed is not None:
        return [fixed] * len(references)
    return [references[(i + 1) % len(references)][0] for i in range(len(references))]


def generator_for(device: Any, *parts: object) -> torch.Generator:
    """A generator seeded by `parts` (stable across processes and Python runs)."""
    import torch

    seed = int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class Source:
    """A model that crafts transfer attacks: its captioner and tokenizer."""

    captioner: Captioner
    tokenizer: Any


@dataclass
class BatchCaptioner:
    """Captions a batch of images under each condition (no collectives: one rank's work)."""

    captioner: Captioner
    tokenizer: Any
    generation: Generation
    pgd: PGDSettings = PGDSettings()
    target_caption: Optional[str] = None
    max_caption_tokens: int = 32
    transfer: Optional[Source] = None

    def generate(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) in [0,1] → generated ids (B,T), start token first."""
        return self.captioner.generate(
            pixels, max_new_tokens=self.generation.max_new_tokens, num_beams=self.generation.num_beams, use_cache=True
        )

    def labels(self, captions: Sequence[str], device: Any) -> torch.Tensor:
        return reference_labels(self.tokenizer, captions, self.max_caption_tokens).to(device)

    def attack_pgd(self, pixels: torch.Tensor, target: torch.Tensor, epsilon: float, seed: object, steps: int,
                   restarts: int, descend: bool = False) -> torch.Tensor:
        """PGD images for a target caption: ascending its loss (untargeted) or descending it (targeted)."""
        from advcap.attacks import pgd

        sign = -1.0 if descend else 1.0
        model = self.captioner
        return pgd(
            lambda images: sign * model(images, target), pixels, epsilon, self.pgd.step(epsilon) * self.pgd.steps / steps,
            steps, random_start=self.pgd.random_start, generator=generator_for(pixels.device, seed),
            restarts=restarts, per_image_loss=lambda images: sign * model(images, target, per_image=True),
        )

    def __call__(
        self, pixels: torch.Tensor, labels: torch.Tensor, references: Sequence[Sequence[str]],
        conditions: Sequence[Condition], batch_index: int = 0,
    ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """(captions per condition name, target captions per targeted condition) for images (B,3,S,S) in [0,1]
        whose first references are `labels` (B,L); `batch_index` (global) seeds the random starts."""
        from advcap.attacks import fgsm, input_gradient
        from advcap.model import decode_captions

        clean_ids = reference_gradient = None

        def clean() -> torch.Tensor:
            nonlocal clean_ids
            if clean_ids is None:
                clean_ids = self.generate(pixels)
            return clean_ids

        def fgsm_images(eps: float) -> torch.Tensor:
            # Every FGSM condition of a batch (fgsm, fgsm@<ε>...) steps along the same gradient: one backward.
            nonlocal reference_gradient
            if reference_gradient is None:
                _, reference_gradient = input_gradient(lambda images: self.captioner(images, labels), pixels)
            return fgsm(None, pixels, eps, grad=reference_gradient)

        captions, targets = {}, {}
        for condition in conditions:
            kind, eps = condition.kind, condition.epsilon
            if kind == "clean":
                ids = clean()
            elif kind == "blind":
                ids = self.generate(pixels.new_zeros(pixels.shape))
            elif kind == "fgsm":
                ids = self.generate(fgsm_images(eps))
            elif kind == "pgd":
                target = labels if self.pgd.target == "reference" else caption_labels(clean(), self.tokenizer.eos_token_id)
                ids = self.generate(self.attack_pgd(pixels, target, eps, (batch_index, condition.name),
                                                    self.pgd.steps, self.pgd.restarts))
            elif kind == "targeted":
                wanted = target_captions(references, self.target_caption)
                targets[condition.name] = wanted
                images = self.attack_pgd(pixels, self.labels(wanted, pixels.device), eps, (batch_index, condition.name),
                                         self.pgd.steps, self.pgd.restarts, descend=True)
                ids = self.generate(images)
            elif kind == "transfer-fgsm":
                source = self.transfer
                target = reference_labels(source.tokenizer, [r[0] for r in references], self.max_caption_tokens)
                ids = self.generate(fgsm(lambda images: source.captioner(images, target.to(pixels.device)), pixels, eps))
            else:  # parse_condition admits nothing else
                raise AssertionError(kind)
            captions[condition.name] = decode_captions(self.tokenizer, ids)
        return captions, targets
