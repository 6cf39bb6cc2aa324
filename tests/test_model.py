"""The captioner: summed loss, pixel-space normalisation, gradients to pixels, stopping at EOS, building from
presets / local pretrained dirs / a whole export, and the HF export round trip. Tiny models only, no hub."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from advcap.errors import AdvcapError
from advcap.model import Captioner, build_captioner, decode_captions, export_hf, tokenizer_source
from advcap.tokenizer import train_tokenizer

S = 32  # image side (px) used throughout: 4×4 patches of 8 px in the tiny preset
CAPTIONS = ["a red square on the left", "a blue circle on the right", "two green triangles", "a small red circle"]
TARGET = "a red square"  # what the trained fixture learns to say for every image


def model_cfg(**overrides) -> SimpleNamespace:
    """A `model` config section: the tiny preset, no pretrained parts, no dropout (deterministic tests)."""
    defaults = {"preset": "tiny", "encoder": None, "decoder": None, "init_from": None, "dropout": 0.0}
    return SimpleNamespace(**{**defaults, **overrides})


def caption_labels(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B,L) labels: caption ids + EOS, then -100 padding (what the data loader produces)."""
    rows = [tokenizer(c)["input_ids"] + [tokenizer.eos_token_id] for c in captions]
    width = max(map(len, rows))
    return torch.tensor([row + [-100] * (width - len(row)) for row in rows])


@pytest.fixture
def transformers_log(caplog):
    """caplog, with the warnings transformers logs during the test in `.records`. Its loggers do not propagate to the root logger outside CI
    (transformers decides so from $CI), so caplog's handler is attached to transformers' own logger; the once-per-
    process warnings are reset so that each test sees its own."""
    import logging

    logging.Logger.warning_once.cache_clear()
    logger = logging.getLogger("transformers")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            yield caplog
    finally:
        logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(CAPTIONS * 3, tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture(scope="module")
def trained(tokenizer) -> Captioner:
    """A tiny captioner trained (~60 Adam steps on random images) to always say TARGET and stop."""
    torch.manual_seed(0)
    captioner = build_captioner(model_cfg(), S, tokenizer)
    labels = caption_labels(tokenizer, [TARGET] * 4)
    optimizer = torch.optim.Adam(captioner.parameters(), lr=1e-2)
    for _ in range(60):
        loss = captioner(torch.rand(4, 3, S, S), labels) / (labels != -100).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return captioner.eval()


def test_forward_returns_the_summed_token_cross_entropy(tokenizer):
    torch.manual_seed(0)
    captioner = build_captioner(model_cfg(), S, tokenizer).eval()
    pixels = torch.rand(3, 3, S, S)
    labels = caption_labels(tokenizer, ["a red square", "two green triangles on the left", "a circle"])
    n_tokens = int((labels != -100).sum())
    assert n_tokens < labels.numel()  # the batch really has padding

    loss = captioner(pixels, labels)

    assert loss.shape == () and loss.dtype == torch.float32
    # HF's own loss: the MEAN over the same tokens, with the same right shift of the labels.
    hf_mean = captioner.model(pixel_values=captioner.normalize(pixels), labels=labels).loss
    torch.testing.assert_close(loss, hf_mean * n_tokens, rtol=1e-5, atol=1e-4)


def test_padding_labels_are_ignored(tokenizer):
    torch.manual_seed(0)
    captioner = build_captioner(model_cfg(), S, tokenizer).eval()
    pixels = torch.rand(1, 3, S, S)
    short = caption_labels(tokenizer, ["a red square"])
    padded = torch.cat([short, torch.full((1, 5), -100)], dim=1)
    # Causal decoding: positions after EOS cannot change earlier logits, and -100 adds nothing.
    torch.testing.assert_close(captioner(pixels, padded), captioner(pixels, short))


def test_the_loss_passes_gpt2_a_decoder_mask_and_equals_the_unmasked_loss(tokenizer, transformers_log):
    """The start token and the padding are both GPT-2's pad token: without a mask transformers warns (and reads
    the ids on the host). The mask of ones the captioner passes silences that and keeps SDPA's causal kernel,
    so the loss is bit-identical to the unmasked one (padding lies after every scored position)."""
    from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import shift_tokens_right

    torch.manual_seed(0)
    captioner = build_captioner(model_cfg(), S, tokenizer).eval()
    pixels = torch.rand(3, 3, S, S)
    labels = caption_labels(tokenizer, ["a red square", "two green triangles on the left", "a circle"])

    loss = captioner(pixels, labels)

    assert not [r for r in transformers_log.records if "attention_mask" in r.getMessage()]
    config = captioner.model.config
    inputs = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    logits = captioner.model(pixel_values=captioner.normalize(pixels), decoder_input_ids=inputs).logits
    unmasked = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                 reduction="sum")
    assert torch.equal(loss, unmasked)
    assert [r for r in transformers_log.records if "attention_mask" in r.getMessage()]  # the check above can see it


def test_gradient_reaches_the_pixels(tokenizer):
    torch.manual_seed(0)
    captioner = build_captioner(model_cfg(), S, tokenizer)
    pixels = torch.rand(2, 3, S, S, requires_grad=True)
    loss = captioner(pixels, caption_labels(tokenizer, ["a red square", "a blue circle"]))
    (grad,) = torch.autograd.grad(loss, pixels)
    assert grad.shape == pixels.shape
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_wrapper_normalises_pixels_for_the_encoder(tokenizer):
    captioner = build_captioner(model_cfg(), S, tokenizer).eval()
    seen = []
    captioner.model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True
    )
    pixels = torch.full((1, 3, S, S), 0.5)
    pixels[..., 0, 0] = 1.0
    pixels[..., 0, 1] = 0.0
    captioner(pixels, caption_labels(tokenizer, ["a red square"]))

    assert captioner.image_mean == captioner.image_std == (0.5, 0.5, 0.5)
    (normalised,) = seen
    assert normalised[..., 1:, :].abs().max() == 0  # 0.5 → 0
    assert (normalised[..., 0, 0] == 1).all() and (normalised[..., 0, 1] == -1).all()  # [0,1] → [-1,1]


def test_greedy_generation_reproduces_the_trained_caption_and_stops_at_eos(trained, tokenizer):
    ids = trained.generate(torch.rand(3, 3, S, S), max_new_tokens=20)

    target = tokenizer(TARGET)["input_ids"]
    assert ids.shape == (3, 1 + len(target) + 1)  # start token, caption, EOS — then it stopped
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert (ids[:, 1:-1] == torch.tensor(target)).all()
    assert (ids[:, -1] == tokenizer.eos_token_id).all()
    assert decode_captions(tokenizer, ids) == [TARGET] * 3


def test_generation_tells_gpt2_its_start_token_is_not_padding(trained, transformers_log):
    """The start token is GPT-2's pad token: advcap passes a decoder mask, so transformers has nothing to warn
    about, and greedy and beam captions equal those of an unmasked generate."""
    pixels = torch.rand(3, 3, S, S)
    greedy, beams = trained.generate(pixels, max_new_tokens=12), trained.generate(pixels, 12, num_beams=3)
    assert not [r for r in transformers_log.records if "attention_mask" in r.getMessage() and "padded" in r.getMessage()]
    for ids, n in ((greedy, 1), (beams, 3)):
        plain = trained.model.generate(pixel_values=trained.normalize(pixels), max_new_tokens=12, num_beams=n,
                                       do_sample=False)
        assert torch.equal(ids, plain)


def test_export_round_trip_through_the_three_hf_classes(trained, tokenizer, tmp_path):
    from transformers import AutoTokenizer, VisionEncoderDecoderModel, ViTImageProcessor

    out = export_hf(trained, tokenizer, tmp_path / "hf")
    model, loading = VisionEncoderDecoderModel.from_pretrained(out, output_loading_info=True)
    model.eval()
    assert not any(loading.values()), loading  # no missing (the zero pooler is saved), unexpected or mismatched keys
    assert trained.model.encoder.pooler is None  # the run's model stays without one
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    processor = ViTImageProcessor.from_pretrained(out)

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8))  # not square, not S
    pixel_values = processor(image, return_tensors="pt").pixel_values
    pixels01 = torch.from_numpy(np.asarray(image.resize((S, S), Image.BILINEAR), dtype=np.float32) / 255)
    pixels01 = pixels01.permute(2, 0, 1)[None]

    torch.testing.assert_close(pixel_values, trained.normalize(pixels01), rtol=0, atol=1e-6)
    with torch.no_grad():
        hf_ids = model.generate(pixel_values=pixel_values)  # the user's call: the saved generation config
    ours = trained.generate(pixels01)
    assert torch.equal(hf_ids, ours)
    assert hf_tokenizer.batch_decode(hf_ids, skip_special_tokens=True) == [TARGET]

    # Resuming from the export (model.init_from) gives the same model.
    resumed = build_captioner(model_cfg(preset="custom", init_from=str(out)), S, hf_tokenizer).eval()
    assert resumed.model.encoder.pooler is None
    assert torch.equal(resumed.generate(pixels01), ours)
    labels = caption_labels(tokenizer, [TARGET])
    torch.testing.assert_close(resumed(pixels01, labels), trained(pixels01, labels))


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory, tokenizer):
    """A tiny 'pretrained' ViT (with pooler, ImageNet mean/std processor) and GPT-2 (no cross-attention),
    saved as the demo's pretraining stage does; the GPT-2 is wider, so HF adds enc_to_dec_proj."""
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTImageProcessor, ViTModel

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(1)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=S, patch_size=8))
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": S, "width": S}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "vit")
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=48, n_layer=2, n_head=2, n_positions=64))
    gpt.save_pretrained(root / "gpt")
    return root, vit.state_dict(), gpt.state_dict()


def test_local_encoder_and_decoder_dirs_keep_their_weights_and_get_fresh_cross_attention(pretrained_dirs, tokenizer):
    root, vit_state, gpt_state = pretrained_dirs
    captioner = build_captioner(
        model_cfg(preset="custom", encoder=str(root / "vit"), decoder=str(root / "gpt")), S, tokenizer
    )
    model = captioner.model

    encoder_state = model.encoder.state_dict()
    assert model.encoder.pooler is None
    assert set(encoder_state) == {k for k in vit_state if not k.startswith("pooler.")}
    assert all(torch.equal(encoder_state[k], vit_state[k]) for k in encoder_state)

    decoder_state = model.decoder.state_dict()
    assert all(torch.equal(decoder_state[k], gpt_state[k]) for k in gpt_state)
    new = set(decoder_state) - set(gpt_state)
    assert new and all("crossattention" in k or "ln_cross_attn" in k for k in new)
    assert len(new) == 2 * 8  # per layer: c_attn, q_attn, c_proj, ln_cross_attn (weight + bias each)
    cross = decoder_state["transformer.h.0.crossattention.c_attn.weight"]
    assert torch.isfinite(cross).all() and 0.005 < cross.std() < 0.1  # freshly initialised, N(0, 0.02)
    assert model.enc_to_dec_proj.weight.shape == (48, 32)

    assert captioner.image_mean == pytest.approx((0.485, 0.456, 0.406))  # from the ViT's preprocessor_config
    assert model.config.decoder_start_token_id == tokenizer.bos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    pixels = torch.rand(2, 3, S, S, requires_grad=True)
    captioner(pixels, caption_labels(tokenizer, ["a red square", "a circle"])).backward()
    assert pixels.grad.abs().sum() > 0


def test_loading_a_decoder_reports_only_what_is_unexpected(pretrained_dirs, tokenizer, transformers_log, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _, _ = pretrained_dirs
    build_captioner(model_cfg(preset="custom", encoder=str(root / "vit"), decoder=str(root / "gpt")), S, tokenizer)
    # The decoder's cross-attention is missing and the ViT's pooler left out by design: nothing to report.
    assert "LOAD REPORT" not in transformers_log.text and "not used" not in transformers_log.text
    # A decoder that lacks a weight of its own is an error naming it, not a warning table.
    shutil.copytree(root / "gpt", tmp_path / "gpt")
    weights = load_file(str(tmp_path / "gpt" / "model.safetensors"))
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, str(tmp_path / "gpt" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdvcapError, match=r"model.decoder=.* lacks 1 weight\(s\) it needs: transformer\.h\.1\.mlp\.c_fc\.weight"):
        build_captioner(model_cfg(preset="custom", encoder=str(root / "vit"), decoder=str(tmp_path / "gpt")), S, tokenizer)


def test_a_loaded_vit_must_match_the_image_size(pretrained_dirs, tokenizer):
    root, _, _ = pretrained_dirs
    with pytest.raises(AdvcapError, match=rf"image_size=64.*image_size={S}"):
        build_captioner(model_cfg(preset="custom", encoder=str(root / "vit"), decoder=str(root / "gpt")), 64, tokenizer)


@pytest.mark.parametrize(
    "overrides, image_size, message",
    [
        ({}, 36, "not a multiple of the preset ViT's patch size 8"),
        ({"preset": "huge"}, S, "model.preset='huge'"),
        ({"preset": "custom"}, S, "needs model.encoder and model.decoder"),
        ({"init_from": "somewhere", "encoder": "elsewhere"}, S, "either model.init_from"),
        ({"init_from": "/nonexistent/captioner"}, S, "cannot load model.init_from='/nonexistent/captioner'"),
    ],
)
def test_bad_model_configs_are_errors(tokenizer, overrides, image_size, message):
    with pytest.raises(AdvcapError, match=message):
        build_captioner(model_cfg(**overrides), image_size, tokenizer)


def test_a_tokenizer_larger_than_the_decoder_vocabulary_is_an_error(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(AdvcapError, match=rf"{len(tokenizer)} tokens.*only 100"):
        build_captioner(model_cfg(decoder=str(tmp_path)), S, tokenizer)


def test_image_processor_matches_the_wrapper(tokenizer):
    processor = build_captioner(model_cfg(), S, tokenizer).image_processor()
    settings = json.loads(processor.to_json_string())
    assert settings["size"] == {"height": S, "width": S}
    assert settings["resample"] == Image.BILINEAR
    assert settings["do_rescale"] and settings["do_normalize"]
    assert settings["image_mean"] == settings["image_std"] == [0.5, 0.5, 0.5]
    assert settings["image_processor_type"] == "ViTImageProcessor"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, None),  # a random preset decoder has no tokenizer of its own
        ({"preset": "vit-base-gpt2"}, "gpt2"),
        ({"preset": "custom", "encoder": "vit_dir", "decoder": "gpt_dir"}, "gpt_dir"),
        ({"preset": "vit-base-gpt2", "init_from": "runs/x/hf"}, "runs/x/hf"),
    ],
)
def test_tokenizer_source_is_the_decoders_own(overrides, expected):
    assert tokenizer_source(model_cfg(**overrides)) == expected


def test_every_preset_name_has_a_meaning():
    """The preset names are defined once (advcap.config, which validates configs); the model's tables say what
    each builds."""
    from advcap.config import MODEL_PRESETS
    from advcap.model import PRESET_ARCHS, PRESET_PRETRAINED

    assert sorted(MODEL_PRESETS) == sorted([*PRESET_ARCHS, *PRESET_PRETRAINED, "custom"])
