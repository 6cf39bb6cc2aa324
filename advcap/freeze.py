"""Freeze policies: which captioner parameters train (the `freeze` config section).

A frozen parameter gets `requires_grad=False` and is left out of the optimizer (`trainable_parameters`).
Autograd still runs through frozen layers, so FGSM gets ∂loss/∂pixels through a frozen ViT or GPT-2;
`torch.no_grad` is never used.

Parameter names are the `VisionEncoderDecoderModel`'s own (`encoder.…`, `decoder.…`, `enc_to_dec_proj.…`),
as in an exported checkpoint, whether a `Captioner` or the bare model is passed. Four groups:

- `encoder`: the ViT (`encoder.*`).
- `cross_attention`: GPT-2's cross-attention blocks (`crossattention`, `ln_cross_attn`) plus
  `enc_to_dec_proj` (the projection HF adds when encoder and decoder widths differ). Both are freshly
  initialised and read the image features; both belong to the decoder side, so `modules: decoder` freezes them.
- `decoder`: the rest of GPT-2, token/position embeddings and the (tied) LM head included.
- (`total`: all of the above.)

Order of rules: the module policy first, then `keep_trainable` re-enables, then `also_freeze` disables —
so `also_freeze` wins when both match. A pattern that matches nothing is an error (a typo would otherwise
silently train the wrong thing).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable

import torch

from advcap.config import FREEZE_MODULES
from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

GROUPS = ("encoder", "decoder", "cross_attention")
# HF GPT-2 names (BERT-style decoders also say "crossattention"); the projection is the encoder→decoder bridge.
_CROSS_ATTENTION = re.compile(r"crossattention|ln_cross_attn|^enc_to_dec_proj\.")


def parameter_group(name: str) -> str:
    """The group (`encoder`, `decoder`, `cross_attention`) of a VisionEncoderDecoderModel parameter name."""
    if name.startswith("encoder."):
        return "encoder"
    if _CROSS_ATTENTION.search(name):
        return "cross_attention"
    if name.startswith("decoder."):
        return "decoder"
    raise AdvcapError(f"parameter {name!r} belongs to neither the encoder nor the decoder")


def apply_freeze(model: torch.nn.Module, freeze_cfg: Any) -> dict[str, dict[str, int]]:
    """Set `requires_grad` on every parameter as the `freeze` section says; return and log the counts.

    Args:
        model: a `Captioner` or a `VisionEncoderDecoderModel` (not yet DDP-wrapped).
        freeze_cfg: `modules` ("none" | "encoder" | "decoder"), `keep_trainable` and `also_freeze`
            (lists of regexes, `re.search` on the names described in the module docstring).
    Returns:
        {group: {"trainable": n, "frozen": m}} for encoder, decoder, cross_attention and total, in
        parameter elements (tied weights counted once).
    Raises:
        AdvcapError: unknown `modules`, an invalid regex, or a regex that matches no parameter.
    """
    modules = str(freeze_cfg.modules)
    if modules not in FREEZE_MODULES:
        raise AdvcapError(f"freeze.modules={modules!r} is not one of {', '.join(FREEZE_MODULES)}")
    named = _named_parameters(model)
    frozen_groups = {"none": (), "encoder": ("encoder",), "decoder": ("decoder", "cross_attention")}[modules]
    for name, param in named:
        param.requires_grad_(parameter_group(name) not in frozen_groups)
    for name, param in _matching(named, freeze_cfg.keep_trainable, "freeze.keep_trainable"):
        param.requires_grad_(True)
    for name, param in _matching(named, freeze_cfg.also_freeze, "freeze.also_freeze"):
        param.requires_grad_(False)

    counts = parameter_counts(model)
    log.info(
        "freeze.modules=%s: training %s of %s parameters (%s)",
        modules,
        f"{counts['total']['trainable']:,}",
        f"{counts['total']['trainable'] + counts['total']['frozen']:,}",
        ", ".join(f"{g} {counts[g]['trainable']:,}/{counts[g]['trainable'] + counts[g]['frozen']:,}" for g in GROUPS),
    )
    return counts


def parameter_counts(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter elements per group (see `apply_freeze`), plus `total`."""
    counts = {group: {"trainable": 0, "frozen": 0} for group in (*GROUPS, "total")}
    for name, param in _named_parameters(model):
        state = "trainable" if param.requires_grad else "frozen"
        counts[parameter_group(name)][state] += param.numel()
        counts["total"][state] += param.numel()
    return counts


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer gets: those with `requires_grad` (tied weights once)."""
    return [param for param in model.parameters() if param.requires_grad]


def _named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) with VisionEncoderDecoderModel names, for a Captioner or the bare model."""
    from advcap.model import Captioner

    inner = model.model if isinstance(model, Captioner) else model
    return list(inner.named_parameters())


def _matching(
    named: list[tuple[str, torch.nn.Parameter]], patterns: Iterable[str] | None, key: str
) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters whose names match any of `patterns`; each pattern must compile and match something."""
    hits: list[tuple[str, torch.nn.Parameter]] = []
    for pattern in patterns or ():
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise AdvcapError(f"{key}: {pattern!r} is not a valid regex: {err}") from None
        matched = [(name, param) for name, param in named if regex.search(name)]
        if not matched:
            raise AdvcapError(f"{key}: {pattern!r} matches no parameter name (e.g. {named[0][0]!r})")
        hits.extend(matched)
    return hits
