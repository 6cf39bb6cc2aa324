"""Freeze policies on a tiny captioner: flags per policy, patterns, counts, real optimizer steps that leave
frozen weights bit-identical, and ∂loss/∂pixels through frozen modules (what FGSM needs)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from advcap.errors import AdvcapError
from advcap.freeze import apply_freeze, parameter_counts, parameter_group, trainable_parameters
from advcap.model import build_captioner
from advcap.tokenizer import train_tokenizer

S = 32
CROSS = re.compile(r"crossattention|ln_cross_attn")


def freeze_cfg(modules: str = "none", keep_trainable=(), also_freeze=()) -> SimpleNamespace:
    return SimpleNamespace(modules=modules, keep_trainable=list(keep_trainable), also_freeze=list(also_freeze))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    captions = ["a red square", "a blue circle on the left"] * 4
    return train_tokenizer(captions, tmp_path_factory.mktemp("tok"), vocab_size=280)


@pytest.fixture
def captioner(tokenizer):
    torch.manual_seed(0)
    cfg = SimpleNamespace(preset="tiny", encoder=None, decoder=None, init_from=None, dropout=0.0)
    return build_captioner(cfg, S, tokenizer)


def labels_for(tokenizer, captions: list[str]) -> torch.Tensor:
    rows = [tokenizer(c)["input_ids"] + [tokenizer.eos_token_id] for c in captions]
    width = max(map(len, rows))
    return torch.tensor([row + [-100] * (width - len(row)) for row in rows])


def flags(captioner) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in captioner.model.named_parameters()}


@pytest.mark.parametrize(
    "modules, trained_groups",
    [
        ("none", {"encoder", "decoder", "cross_attention"}),
        ("encoder", {"decoder", "cross_attention"}),  # phase 4, freeze ViT: GPT-2 incl. cross-attention trains
        ("decoder", {"encoder"}),  # phase 5, freeze GPT-2: cross-attention frozen with it
    ],
)
def test_module_policies_set_the_flags(captioner, modules, trained_groups):
    apply_freeze(captioner, freeze_cfg(modules))
    for name, trainable in flags(captioner).items():
        assert trainable == (parameter_group(name) in trained_groups), name
    # The LM head is tied to the token embedding: it follows the decoder.
    assert captioner.model.decoder.lm_head.weight.requires_grad == ("decoder" in trained_groups)


def test_parameter_groups_follow_hf_names(captioner):
    names = [name for name, _ in captioner.model.named_parameters()]
    groups = {name: parameter_group(name) for name in names}
    assert {g for n, g in groups.items() if n.startswith("encoder.")} == {"encoder"}
    assert {n for n, g in groups.items() if g == "cross_attention"} == {n for n in names if CROSS.search(n)}
    assert groups["decoder.transformer.wte.weight"] == "decoder"


def test_keep_trainable_cross_attention_inside_a_frozen_decoder(captioner):
    """Phase 5′ (freeze_gpt_xattn): encoder + cross-attention train, the rest of GPT-2 stays frozen."""
    apply_freeze(captioner, freeze_cfg("decoder", keep_trainable=["crossattention", "ln_cross_attn"]))
    trainable = {name for name, flag in flags(captioner).items() if flag}
    expected = {n for n in flags(captioner) if n.startswith("encoder.") or CROSS.search(n)}
    assert trainable == expected
    assert any(CROSS.search(n) for n in trainable) and any(n.startswith("encoder.") for n in trainable)


def test_also_freeze_wins_over_keep_trainable(captioner):
    apply_freeze(captioner, freeze_cfg("none", keep_trainable=[r"\.wpe\."], also_freeze=[r"\.wpe\.", "embeddings"]))
    frozen = {name for name, flag in flags(captioner).items() if not flag}
    assert frozen == {n for n in flags(captioner) if ".wpe." in n or "embeddings" in n}
    assert "decoder.transformer.wpe.weight" in frozen and "encoder.embeddings.cls_token" in frozen


def test_applying_a_policy_again_starts_from_scratch(captioner):
    apply_freeze(captioner, freeze_cfg("encoder"))
    apply_freeze(captioner, freeze_cfg("none"))
    assert all(flags(captioner).values())


def test_counts_add_up(captioner):
    counts = apply_freeze(captioner, freeze_cfg("decoder", keep_trainable=["crossattention"]))
    total = sum(p.numel() for p in captioner.model.parameters())
    assert counts["total"]["trainable"] + counts["total"]["frozen"] == total
    for state in ("trainable", "frozen"):
        assert sum(counts[g][state] for g in ("encoder", "decoder", "cross_attention")) == counts["total"][state]
    assert counts["total"]["trainable"] == sum(p.numel() for p in trainable_parameters(captioner))
    assert counts["decoder"]["trainable"] == 0 and counts["encoder"]["frozen"] == 0
    cross = counts["cross_attention"]
    assert cross["trainable"] > 0 and cross["frozen"] > 0  # crossattention trains, ln_cross_attn stays frozen
    assert parameter_counts(captioner) == counts


def test_enc_to_dec_proj_is_decoder_side():
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel, VisionEncoderDecoderModel

    encoder = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=S, patch_size=8), add_pooling_layer=False)
    decoder = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=48, n_layer=1, n_head=2, n_positions=16,
                                         add_cross_attention=True, bos_token_id=0, eos_token_id=0))
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)  # widths differ → enc_to_dec_proj
    assert parameter_group("enc_to_dec_proj.weight") == "cross_attention"

    apply_freeze(model, freeze_cfg("decoder"))  # a bare VisionEncoderDecoderModel works too
    assert not model.enc_to_dec_proj.weight.requires_grad
    apply_freeze(model, freeze_cfg("encoder"))
    assert model.enc_to_dec_proj.weight.requires_grad


@pytest.mark.parametrize(
    "cfg, message",
    [
        (freeze_cfg("decoder", keep_trainable=["crossatention"]), r"freeze.keep_trainable: 'crossatention' matches no"),
        (freeze_cfg("none", also_freeze=["wte", "vit\\.pooler"]), r"freeze.also_freeze: 'vit\\\\.pooler' matches no"),
        (freeze_cfg("none", also_freeze=["(unclosed"]), r"'\(unclosed' is not a valid regex"),
        (freeze_cfg("gpt"), r"freeze.modules='gpt' is not one of"),
    ],
)
def test_bad_policies_are_errors(captioner, cfg, message):
    with pytest.raises(AdvcapError, match=message):
        apply_freeze(captioner, cfg)


def test_optimizer_steps_leave_frozen_parameters_bit_identical(captioner, tokenizer):
    """Phase-3-style steps (clean + FGSM loss, input gradient from the clean pass) under freeze=encoder."""
    apply_freeze(captioner, freeze_cfg("encoder", also_freeze=["wpe"]))
    before = {name: p.detach().clone() for name, p in captioner.model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable_parameters(captioner), lr=1e-2, weight_decay=0.1)
    labels = labels_for(tokenizer, ["a red square", "a blue circle on the left"])
    torch.manual_seed(1)
    for _ in range(3):
        pixels = torch.rand(2, 3, S, S, requires_grad=True)
        clean = captioner(pixels, labels)
        (grad,) = torch.autograd.grad(clean, pixels, retain_graph=True)  # touches no parameter .grad
        adversarial = (pixels + 0.05 * grad.sign()).clamp(0, 1).detach()
        loss = 0.5 * clean + 0.5 * captioner(adversarial, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for name, param in captioner.model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert param.grad is None, name
            assert torch.equal(param, before[name]), f"{name} changed while frozen"
    assert not captioner.model.decoder.transformer.wpe.weight.requires_grad


@pytest.mark.parametrize(
    "cfg",
    [freeze_cfg("encoder"), freeze_cfg("decoder"), freeze_cfg("decoder", also_freeze=["^encoder\\."])],
    ids=["frozen-encoder", "frozen-decoder", "everything-frozen"],
)
def test_input_gradient_flows_through_frozen_modules(captioner, tokenizer, cfg):
    apply_freeze(captioner, cfg)
    pixels = torch.rand(2, 3, S, S, requires_grad=True)
    loss = captioner(pixels, labels_for(tokenizer, ["a red square", "a blue circle"]))
    (grad,) = torch.autograd.grad(loss, pixels)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in captioner.parameters())
