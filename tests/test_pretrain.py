"""The demo's pretrained stand-ins: scene labels, and ViT / GPT-2 directories that load as
`model.encoder` / `model.decoder` with fresh cross-attention, as hub checkpoints would."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from advcap.data.synth import generate
from advcap.model import build_captioner
from advcap.pretrain import pretrain_gpt2, pretrain_vit, scene_label_names, scene_labels
from advcap.tokenizer import train_tokenizer


def test_scene_labels_mark_exactly_the_scene():
    scene = {"background": "grey", "objects": [
        {"shape": "circle", "color": "red", "size": "large", "x": 0.2, "y": 0.5},
        {"shape": "star", "color": "blue", "size": "small", "x": 0.9, "y": 0.4},
    ]}
    names = scene_label_names()
    on = {names[i] for i in np.flatnonzero(scene_labels(scene))}
    assert on == {
        "circle-red", "circle-red@x0", "circle-red@large",
        "star-blue", "star-blue@x2", "star-blue@small",
        "background-grey", "count-2",
    }


def test_stand_ins_train_save_and_load_as_encoder_and_decoder(tmp_path):
    synth = tmp_path / "synth"
    generate(synth, n_images=12, seed=0, size=32)
    entries = json.loads((synth / "captions.json").read_text())["images"]
    captions = [s["raw"] for e in entries for s in e["sentences"]]
    tokenizer = train_tokenizer(captions, tmp_path / "tok", vocab_size=300)

    vit = pretrain_vit(synth, tmp_path / "vit", image_size=32, steps=3, batch_size=4, preset="tiny")
    gpt2 = pretrain_gpt2(captions, tokenizer, tmp_path / "gpt2", steps=3, batch_size=4, preset="tiny")

    cfg = SimpleNamespace(preset="custom", encoder=str(vit), decoder=str(gpt2), init_from=None, dropout=0.0)
    captioner = build_captioner(cfg, 32, tokenizer)
    names = [n for n, _ in captioner.model.decoder.named_parameters()]
    assert any("crossattention" in n for n in names)  # fresh cross-attention, as for hub GPT-2

    from transformers import GPT2LMHeadModel, ViTModel

    pretrained_dec = GPT2LMHeadModel.from_pretrained(gpt2)
    assert not pretrained_dec.config.add_cross_attention  # the stand-in never saw an image
    torch.testing.assert_close(captioner.model.decoder.transformer.wte.weight, pretrained_dec.transformer.wte.weight)
    pretrained_enc = ViTModel.from_pretrained(vit, add_pooling_layer=False)
    torch.testing.assert_close(
        captioner.model.encoder.embeddings.patch_embeddings.projection.weight,
        pretrained_enc.embeddings.patch_embeddings.projection.weight,
    )
