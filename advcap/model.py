"""The captioner: a ViT encoder + GPT-2 decoder (`VisionEncoderDecoderModel`) behind a pixel-space wrapper.

Three ways to build one (`build_captioner`):

- **pretrained pair** — `model.encoder` / `model.decoder` (hub names or local dirs; the `vit-base-gpt2` preset
  names `google/vit-base-patch16-224-in21k` + `gpt2`): the ViT without its pooler, GPT-2 with freshly
  initialised cross-attention. This is every phase's starting point in the paper's protocol.
- **whole captioner** — `model.init_from`: a hub captioner or an `hf/` export of an earlier run.
- **preset** — `tiny` (tests) or `demo` (CPU demo), randomly initialised from a config, fully offline.
  A preset side can be replaced by a pretrained one: `model.encoder` / `model.decoder` override that side.

The wrapper (`Captioner`) takes pixels in [0,1] and normalises them itself, so attacks perturb and clip in
pixel space and ε is in pixel units. Its `forward` returns a *summed* token cross-entropy: the training
step divides by the global token count, so every token weighs the same across ranks and micro-batches.
"""

from __future__ import annotations

import contextlib

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn.functional as F

from advcap.config import MODEL_PRESETS
from advcap.errors import AdvcapError
from advcap.logs import held_back

if TYPE_CHECKING:
    from transformers import PreTrainedModel, VisionEncoderDecoderModel

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that the loss skips (padding after the first EOS)
DEFAULT_MAX_NEW_TOKENS = 32  # caption length cap for generation, also written into the export's generation config
HALF = (0.5, 0.5, 0.5)  # mean = std of the in21k ViT processor: maps [0,1] to [-1,1]


@dataclass(frozen=True)
class PresetArch:
    """Sizes of a randomly initialised preset (the image size comes from `data.image_size`)."""

    encoder_hidden: int
    encoder_layers: int
    encoder_heads: int
    patch_size: int  # px; must divide the image size
    decoder_hidden: int
    decoder_layers: int
    decoder_heads: int
    max_positions: int  # longest decoder sequence in tokens, start token included


# What each of config.MODEL_PRESETS means (the names are defined there; `custom` names its sources explicitly).
PRESET_ARCHS: dict[str, PresetArch] = {
    "tiny": PresetArch(32, 2, 2, 8, 32, 2, 2, 64),
    # The demo's captioner: small enough that 15 runs fit in minutes on two cores; with its better-trained
    # stand-ins (advcap.demo) it learns to look within 250 steps and FGSM still costs it (README, "The demo").
    "demo": PresetArch(64, 2, 4, 8, 64, 2, 4, 64),
}
# Presets that name pretrained models: (encoder, decoder).
PRESET_PRETRAINED: dict[str, tuple[str, str]] = {
    "vit-base-gpt2": ("google/vit-base-patch16-224-in21k", "gpt2"),
}


class Captioner(torch.nn.Module):
    """Pixel-space wrapper around a `VisionEncoderDecoderModel`.

    Attributes:
        model: the HF `VisionEncoderDecoderModel` (what `export_hf` saves).
        image_size: S, the square input side in px.
        image_mean, image_std: per-channel normalisation of the image processor (3 floats each).
    """

    def __init__(
        self,
        model: VisionEncoderDecoderModel,
        image_size: int,
        image_mean: Sequence[float] = HALF,
        image_std: Sequence[float] = HALF,
    ) -> None:
        super().__init__()
        self.model = model
        self.image_size = int(image_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        # Non-persistent: they are derived from the processor, not learned, and stay out of checkpoints.
        self.register_buffer("mean", torch.tensor(self.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def max_target_length(self) -> int:
        """Longest `labels` length (tokens) the decoder's position table allows."""
        return int(self.model.config.decoder.max_position_embeddings)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) pixels in [0,1] → the encoder's normalised input, differentiable w.r.t. `pixels`."""
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected pixels of shape (B, 3, {self.image_size}, {self.image_size}), got {tuple(pixels.shape)}"
            )
        return (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        """Summed next-token cross-entropy of `labels` given the images.

        Args:
            pixels: (B,3,S,S) float in [0,1].
            labels: (B,L) long token ids ending in EOS, `-100` on padding after the first EOS.
            per_image: return each image's sum (B,) instead of the batch's (what an attack with restarts
                compares per image).
        Returns:
            A scalar float32 tensor: the SUM (nats) over all non-ignored target tokens (or (B,) per image).
            Gradients flow to `pixels` and to every parameter with `requires_grad`.
        """
        if labels.shape[1] > self.max_target_length:
            raise AdvcapError(
                f"captions of {labels.shape[1]} tokens exceed the decoder's {self.max_target_length} positions"
            )
        from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import shift_tokens_right

        config = self.model.config
        # The same shift as VisionEncoderDecoderModel does for `labels=`, but we reduce with a sum ourselves.
        decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
        # Every decoder position is attended, padding included, as without a mask: under causal attention a
        # target token sees only earlier positions, never padding (which comes after the first EOS), and
        # the loss skips the outputs at padding. Given explicitly, the mask spares transformers' host reads
        # of the ids and positions (a padding warning, a packed-sequence check), and a mask of ones still
        # takes SDPA's causal kernel: the same numbers as without one.
        attend = torch.ones_like(decoder_input_ids, dtype=torch.bool)
        logits = self.model(
            pixel_values=self.normalize(pixels), decoder_input_ids=decoder_input_ids, decoder_attention_mask=attend,
            use_cache=False,
        ).logits
        if per_image:
            tokens = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="none")
            return tokens.view(labels.shape).sum(1)
        return F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    @torch.no_grad()
    def generate(
        self,
        pixels: torch.Tensor,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        num_beams: int = 1,
        use_cache: bool = True,
    ) -> torch.LongTensor:
        """Caption images: greedy (num_beams=1) or beam search, stopping at EOS.

        Args:
            pixels: (B,3,S,S) float in [0,1].
        Returns:
            (B, T) token ids, T ≤ 1 + max_new_tokens; column 0 is the decoder start token, finished rows are
            padded with the pad token. Decode with `decode_captions`.
        """
        # The decoder starts from its start token, which is also GPT-2's pad token: without a mask GPT-2
        # cannot tell it is not padding and warns. A mask of ones says so (generate extends it per step).
        start_mask = torch.ones(pixels.shape[0], 1, dtype=torch.long, device=pixels.device)
        return self.model.generate(
            pixel_values=self.normalize(pixels),
            decoder_attention_mask=start_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            use_cache=use_cache,
        )

    def image_processor(self) -> Any:
        """The `ViTImageProcessor` that turns a PIL image into this model's normalised input.

        Bilinear resize to exactly S×S on the uint8 image, /255, then (x - mean) / std: the same pixels the
        run saw. The PIL backend is chosen explicitly, because it is the resize the data pipeline uses; its
        saved config says `ViTImageProcessor`, so users load it with `ViTImageProcessor.from_pretrained`.
        """
        from transformers import ViTImageProcessorPil
        from transformers.image_utils import PILImageResampling

        return ViTImageProcessorPil(
            do_resize=True,
            size={"height": self.image_size, "width": self.image_size},
            resample=PILImageResampling.BILINEAR,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
        )


def build_captioner(model_cfg: Any, image_size: int, tokenizer: Any) -> Captioner:
    """Build the captioner that `model_cfg` describes, for S×S images and `tokenizer`'s vocabulary.

    Args:
        model_cfg: the `model` config section (`preset`, `encoder`, `decoder`, `init_from`, `dropout`).
        image_size: S in px; must equal a loaded ViT's `image_size` and be a multiple of its patch size.
        tokenizer: its BOS starts decoding, its EOS stops it, its PAD fills finished rows; presets size their
            vocabulary to `len(tokenizer)`.
    Raises:
        AdvcapError: unknown preset, conflicting or missing sources, unloadable models, size mismatches.

    `model.dropout` applies to presets only; pretrained models keep the dropout they were trained with.
    """
    init_from, encoder_src, decoder_src = _sources(model_cfg)
    if init_from:
        model = _load_whole(init_from, image_size)
    else:
        model = _build_pair(model_cfg, encoder_src, decoder_src, image_size, tokenizer)
    stats_source = init_from or encoder_src  # None: a preset ViT, normalised like the in21k one
    mean, std = _image_stats(stats_source) if stats_source else (HALF, HALF)

    _check_vocab(model, tokenizer)
    set_special_tokens(model, tokenizer)
    # Users of the export who call plain `generate()` get the run's caption length, not HF's 20-token default.
    model.generation_config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    log.info(
        "captioner: %s, %.2fM parameters, %dx%d px, mean=%s std=%s",
        f"init_from={init_from}" if init_from else f"encoder={encoder_src or model_cfg.preset} "
        f"decoder={decoder_src or model_cfg.preset}",
        sum(p.numel() for p in model.parameters()) / 1e6,
        image_size,
        image_size,
        mean,
        std,
    )
    return Captioner(model, image_size, mean, std)


def tokenizer_source(model_cfg: Any) -> str | None:
    """Where the decoder's own tokenizer lives (for `data.tokenizer: null`): the `init_from` captioner or the
    pretrained decoder. None for a randomly initialised preset decoder, which has no tokenizer of its own."""
    init_from, _, decoder_src = _sources(model_cfg)
    return init_from or decoder_src


def set_special_tokens(model: VisionEncoderDecoderModel, tokenizer: Any) -> None:
    """Write the tokenizer's BOS/EOS/PAD into the model, decoder and generation configs.

    BOS is the decoder start token (training shifts labels right with it, generation starts from it); EOS
    ends generation, so an exported model stops where the trained one does.
    """
    ids = {
        "decoder_start_token_id": tokenizer.bos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for config in (model.config, model.config.decoder, model.generation_config):
        for key, value in ids.items():
            setattr(config, key, value)


def export_hf(captioner: Captioner, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save model, tokenizer, image processor and a processor declaration into one directory (the run's `hf/`).

    Users caption with `VisionEncoderDecoderModel.from_pretrained(d)`, `AutoTokenizer.from_pretrained(d)`,
    `ViTImageProcessor.from_pretrained(d)`: processor(image) → `model.generate(pixel_values=...)` gives the
    same token ids as `captioner.generate` on the same image. transformers 5's `image-text-to-text` pipeline
    and 4.x's `image-to-text` pipeline load it too (see `_write_processor_config`, `_portable_tokenizer_class`).
    `model.init_from=d` resumes from it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _zero_pooler(captioner.model.encoder):
        captioner.model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _portable_tokenizer_class(out)
    captioner.image_processor().save_pretrained(str(out))
    _write_processor_config(out)
    log.debug("exported the captioner to %s", out)
    return out


# The processor class the export names: Donut's (Donut is another VisionEncoderDecoder model). Its call is
# transformers' generic one: images to the image processor, text to the tokenizer as `input_ids`, which
# generate() takes as the decoder prompt. TrOCR's, the other VisionEncoderDecoder processor, turns text into
# `labels` only, and the image-text-to-text pipeline then finds no prompt (KeyError 'decoder_input_ids').
EXPORT_PROCESSOR = "DonutProcessor"


def _write_processor_config(out: Path) -> None:
    """Name the export's processor: without one, transformers 5's `image-text-to-text` pipeline (the only one
    that takes a VisionEncoderDecoderModel; 5.x removed `image-to-text`) loads the tokenizer as its
    processor and refuses it ("Processor was loaded, but it is not an instance of `ProcessorMixin`").

    Only the class goes in, in the format both 4.x and 5.x read: its image processor and tokenizer load from
    their own files. (5.x's `save_pretrained` would nest a second copy of the image settings, which 4.x's
    AutoProcessor refuses.)
    """
    (out / "processor_config.json").write_text(json.dumps({"processor_class": EXPORT_PROCESSOR}, indent=2) + "\n")


def _portable_tokenizer_class(out: Path) -> None:
    """transformers 5 saves a tokenizer trained with `tokenizers` as `TokenizersBackend`, a name 4.x does not
    know; `PreTrainedTokenizerFast` is 5.x's own alias of that class and the name 4.x loads it by."""
    path = out / "tokenizer_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    if settings.get("tokenizer_class") == "TokenizersBackend":
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _zero_pooler(encoder: torch.nn.Module):
    """Attach an all-zero ViT pooler while saving. `VisionEncoderDecoderModel.from_pretrained` always builds
    one, and would report it MISSING and initialise it randomly; captioning never uses it, so the export
    carries a zero one and loads without a gap. The run's own model stays without (unused parameters
    break DDP)."""
    if not hasattr(encoder, "pooler") or encoder.pooler is not None:
        yield
        return
    from transformers.models.vit.modeling_vit import ViTPooler

    encoder.pooler = ViTPooler(encoder.config).to(next(encoder.parameters()).device)
    torch.nn.init.zeros_(encoder.pooler.dense.weight)
    torch.nn.init.zeros_(encoder.pooler.dense.bias)
    try:
        yield
    finally:
        encoder.pooler = None


def decode_captions(tokenizer: Any, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
    """Token ids (B,T) from `generate` → B caption strings, special tokens dropped, whitespace stripped."""
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


# --- building blocks -------------------------------------------------------------------------------------


def _sources(model_cfg: Any) -> tuple[str | None, str | None, str | None]:
    """(init_from, encoder, decoder) sources after applying the preset; None means "not loaded".

    `model.encoder` / `model.decoder` override the preset's side; `init_from` excludes both.
    """
    preset = str(model_cfg.preset)
    if preset not in MODEL_PRESETS:
        raise AdvcapError(f"model.preset={preset!r} is not one of {', '.join(MODEL_PRESETS)}")
    init_from = getattr(model_cfg, "init_from", None)
    encoder, decoder = getattr(model_cfg, "encoder", None), getattr(model_cfg, "decoder", None)
    if init_from:
        if encoder or decoder:
            raise AdvcapError("set either model.init_from or model.encoder/model.decoder, not both")
        return str(init_from), None, None
    default_encoder, default_decoder = PRESET_PRETRAINED.get(preset, (None, None))
    encoder, decoder = encoder or default_encoder, decoder or default_decoder
    if preset == "custom" and not (encoder and decoder):
        raise AdvcapError("model.preset=custom needs model.encoder and model.decoder (or model.init_from)")
    return None, encoder and str(encoder), decoder and str(decoder)


def _build_pair(
    model_cfg: Any, encoder_src: str | None, decoder_src: str | None, image_size: int, tokenizer: Any
) -> VisionEncoderDecoderModel:
    """Join an encoder and a decoder, each loaded from its source or built from the preset's sizes."""
    from transformers import VisionEncoderDecoderModel

    arch = PRESET_ARCHS.get(str(model_cfg.preset))
    dropout = float(model_cfg.dropout)
    encoder = _load_encoder(encoder_src, image_size) if encoder_src else preset_encoder(arch, image_size, dropout)
    decoder = _load_decoder(decoder_src) if decoder_src else preset_decoder(arch, tokenizer, dropout)
    return VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)


def preset_encoder(arch: PresetArch, image_size: int, dropout: float) -> PreTrainedModel:
    """A randomly initialised ViT without pooler (unused parameters would break DDP)."""
    from transformers import ViTConfig, ViTModel

    _check_patch(arch.patch_size, image_size, "preset")
    config = ViTConfig(
        hidden_size=arch.encoder_hidden,
        num_hidden_layers=arch.encoder_layers,
        num_attention_heads=arch.encoder_heads,
        intermediate_size=4 * arch.encoder_hidden,
        image_size=image_size,
        patch_size=arch.patch_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return ViTModel(config, add_pooling_layer=False)


def preset_decoder(arch: PresetArch, tokenizer: Any, dropout: float, cross_attention: bool = True) -> PreTrainedModel:
    """A randomly initialised GPT-2 LM (with cross-attention unless told otherwise: a stand-in for the
    pretrained GPT-2 has none), vocabulary and special tokens from the tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        n_positions=arch.max_positions,
        n_embd=arch.decoder_hidden,
        n_layer=arch.decoder_layers,
        n_head=arch.decoder_heads,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        add_cross_attention=cross_attention,
    )
    return GPT2LMHeadModel(config)


def _load_encoder(source: str, image_size: int) -> PreTrainedModel:
    """A pretrained ViT (hub name or local dir) without its pooler, checked against the image size."""
    from transformers import ViTModel

    # A pretrained ViT usually carries a pooler; the captioner has none (unused; DDP rejects unused parameters).
    encoder = _load_checked(ViTModel, source, "encoder", unused=_POOLER, add_pooling_layer=False)
    _check_image_size(encoder.config, image_size, source)
    return encoder


def _load_decoder(source: str) -> PreTrainedModel:
    """A pretrained causal LM (GPT-2) with freshly initialised cross-attention layers added."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _from_pretrained(AutoConfig, source, "decoder")
    # Set on the config, not as from_pretrained kwargs: GPT-2's config (transformers 5) has no `is_decoder`
    # field, and unknown kwargs would reach the model constructor. BERT-style decoders do read it.
    config.add_cross_attention = True
    config.is_decoder = True
    return _load_checked(AutoModelForCausalLM, source, "decoder", fresh=_CROSS_ATTENTION, config=config)


def _load_checked(cls: Any, source: str, what: str, fresh: Optional[re.Pattern] = None,
                  unused: Optional[re.Pattern] = None, **kwargs: Any) -> PreTrainedModel:
    """`_from_pretrained`, checking the load itself: weights the model lacks must match `fresh` (initialised
    anew by design), else an error naming them; weights of the checkpoint the model leaves out must match
    `unused`, else a warning naming them. transformers' own report (a warning table on every load, also for
    what is expected) is held back."""
    with held_back(LOAD_REPORT_LOGGER, "LOAD REPORT"):
        model, info = _from_pretrained(cls, source, what, output_loading_info=True, **kwargs)
    missing = sorted(k for k in info["missing_keys"] if not (fresh and fresh.search(k)))
    if missing:
        raise AdvcapError(f"model.{what}={source!r} lacks {len(missing)} weight(s) it needs: "
                          f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    ignored = sorted(k for k in info["unexpected_keys"] if not (unused and unused.search(k)))
    ignored += [str(k) for k in info.get("mismatched_keys", [])]
    if ignored:
        log.warning("model.%s=%r: %d weight(s) of the checkpoint not used: %s", what, source, len(ignored),
                    ", ".join(ignored[:5]))
    log.debug("model.%s=%r: %d tensors newly initialised", what, source, len(info["missing_keys"]))
    return model


# The weights a decoder gains to attend to the image (GPT-2's names), initialised fresh by from_pretrained.
_CROSS_ATTENTION = re.compile(r"\.(crossattention|ln_cross_attn)\.")
_POOLER = re.compile(r"^pooler\.")
LOAD_REPORT_LOGGER = "transformers.modeling_utils"


def _load_whole(source: str, image_size: int) -> VisionEncoderDecoderModel:
    """A whole captioner (hub name or `hf/` export dir), its ViT pooler dropped."""
    from transformers import VisionEncoderDecoderModel

    model = _from_pretrained(VisionEncoderDecoderModel, source, "init_from")
    # HF rebuilds the encoder with a pooler (advcap's exports carry a zero one, see _zero_pooler); the
    # captioner never uses it and DDP rejects unused parameters, so it goes.
    if getattr(model.encoder, "pooler", None) is not None:
        model.encoder.pooler = None
    _check_image_size(model.config.encoder, image_size, source)
    return model


def _from_pretrained(cls: Any, source: str, what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(source, **kwargs)`, with load failures turned into an AdvcapError naming `what`."""
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise AdvcapError(f"cannot load model.{what}={source!r}: {err}") from None


def _check_patch(patch_size: int, image_size: int, source: str) -> None:
    if image_size % patch_size:
        raise AdvcapError(
            f"data.image_size={image_size} is not a multiple of the {source} ViT's patch size {patch_size}"
        )


def _check_image_size(encoder_config: Any, image_size: int, source: str) -> None:
    """A loaded ViT's position table fixes its image size; a different data.image_size is an error."""
    if int(encoder_config.image_size) != image_size:
        raise AdvcapError(
            f"data.image_size={image_size} but the ViT {source!r} was built for image_size={encoder_config.image_size}"
        )
    _check_patch(int(encoder_config.patch_size), image_size, repr(source))


def _check_vocab(model: VisionEncoderDecoderModel, tokenizer: Any) -> None:
    """Every tokenizer id must have a row in the decoder's embedding table."""
    vocab = int(model.config.decoder.vocab_size)
    if len(tokenizer) > vocab:
        raise AdvcapError(
            f"the tokenizer has {len(tokenizer)} tokens but the decoder's vocabulary only {vocab}; "
            "use the decoder's own tokenizer (data.tokenizer: null) or a preset decoder"
        )


def _image_stats(source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from `source`'s preprocessor_config.json, or the in21k ViT's 0.5s when it has none."""
    from transformers.utils import cached_file

    try:
        path = cached_file(
            source,
            "preprocessor_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        path = None
    if path is None:
        return HALF, HALF
    settings = json.loads(Path(path).read_text())
    return tuple(settings.get("image_mean", HALF)), tuple(settings.get("image_std", HALF))
