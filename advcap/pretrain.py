"""Stand-ins for the pretrained halves of the paper's captioner, for the offline demo.

The paper starts from an ImageNet-21k ViT and GPT-2, with fresh cross-attention. Neither can be
downloaded here, so the demo mirrors that protocol in miniature:
- `pretrain_vit`: a `demo`-sized ViT trained to predict labels read off the scenes (which coloured
  shapes are present, where, how large; the background; how many objects) — visual features that
  know nothing of captions;
- `pretrain_gpt2`: a `demo`-sized GPT-2 language model (no cross-attention) trained on the training
  captions — a decoder that writes fluent captions but has never seen an image.
Both are saved with `save_pretrained`, so `model.encoder=<dir> model.decoder=<dir>` loads them the
way `google/vit-base-patch16-224-in21k` and `gpt2` load on a cluster.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from advcap import atomic, faults
from advcap.data.images import to_square_pixels
from advcap.data.synth import BACKGROUNDS, COLORS, SHAPES, SIZES
from advcap.model import HALF, PRESET_ARCHS, preset_decoder, preset_encoder

log = logging.getLogger(__name__)

PAIRS = [(s, c) for s in SHAPES for c in COLORS]
THIRDS = 3


def scene_label_names() -> list[str]:
    names = [f"{s}-{c}" for s, c in PAIRS]
    names += [f"{s}-{c}@x{t}" for s, c in PAIRS for t in range(THIRDS)]
    names += [f"{s}-{c}@{z}" for s, c in PAIRS for z in SIZES]
    names += [f"background-{b}" for b in BACKGROUNDS] + [f"count-{n}" for n in (1, 2, 3)]
    return names


def scene_labels(scene: dict) -> np.ndarray:
    """Multi-hot float32 vector over `scene_label_names()` for one scene record of the demo set."""
    index = {name: i for i, name in enumerate(scene_label_names())}
    labels = np.zeros(len(index), dtype=np.float32)
    for obj in scene["objects"]:
        pair = f"{obj['shape']}-{obj['color']}"
        labels[index[pair]] = 1
        labels[index[f"{pair}@x{min(THIRDS - 1, int(obj['x'] * THIRDS))}"]] = 1
        labels[index[f"{pair}@{obj['size']}"]] = 1
    labels[index[f"background-{scene['background']}"]] = 1
    labels[index[f"count-{len(scene['objects'])}"]] = 1
    return labels


def _fit(params: list, batch_loss: Callable[[], torch.Tensor], steps: int, lr: float, what: str) -> float:
    """AdamW with a one-cycle schedule over `steps` batches; returns the last batch's loss."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in tqdm(range(steps), desc=f"pretrain {what.split()[0]}", disable=None):
        faults.point("pretrain.step", step=step + 1)
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log.info("pretrain step %d/%d: %s %.4f", step + 1, steps, what, loss.item())
    return loss.item()


def _train_split(synth_dir: Path) -> list[dict]:
    entries = json.loads((synth_dir / "captions.json").read_text())["images"]
    return [e for e in entries if e["split"] == "train"]


def pretrain_vit(synth_dir: str | Path, out_dir: str | Path, image_size: int, steps: int, seed: int = 0,
                 batch_size: int = 64, lr: float = 1e-3, preset: str = "demo") -> Path:
    """Train a preset-sized ViT on scene labels of the demo train split; save it to `out_dir`."""
    from transformers import ViTImageProcessorPil  # the PIL backend: the resize the data pipeline uses

    synth_dir, out_dir = Path(synth_dir), Path(out_dir)
    torch.manual_seed(seed)
    entries = _train_split(synth_dir)
    images = torch.from_numpy(np.stack([
        to_square_pixels((synth_dir / "images" / e["filename"]).read_bytes(), image_size) for e in entries
    ])).permute(0, 3, 1, 2).contiguous()
    targets = torch.from_numpy(np.stack([scene_labels(e["scene"]) for e in entries]))
    encoder = preset_encoder(PRESET_ARCHS[preset], image_size, dropout=0.0)
    head = torch.nn.Linear(encoder.config.hidden_size, targets.shape[1])
    rng = random.Random(seed)

    def batch_loss() -> torch.Tensor:
        idx = torch.tensor(rng.sample(range(len(entries)), min(batch_size, len(entries))))
        pixels = (images[idx].float() / 255 - 0.5) / 0.5
        features = encoder(pixel_values=pixels).last_hidden_state.mean(dim=1)
        return F.binary_cross_entropy_with_logits(head(features), targets[idx])

    _fit([*encoder.parameters(), *head.parameters()], batch_loss, steps, lr, "ViT label BCE")
    processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=list(HALF),
                                      image_std=list(HALF))
    # Whole or not at all: the demo skips this stage when the folder exists.
    return atomic.replace_dir(out_dir, lambda folder: (encoder.save_pretrained(folder), processor.save_pretrained(folder)))


def pretrain_gpt2(captions: list[str], tokenizer, out_dir: str | Path, steps: int, seed: int = 0,
                  batch_size: int = 64, lr: float = 1e-3, max_tokens: int = 32, preset: str = "demo") -> Path:
    """Train a preset-sized GPT-2 LM (no cross-attention) on `captions`; save it with the tokenizer."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # The captioner's decoder sees [start] caption [eos]: pretrain on the same shape of sequence.
    sequences = [[bos] + tokenizer(c, add_special_tokens=False)["input_ids"][: max_tokens - 1] + [eos] for c in captions]
    model = preset_decoder(PRESET_ARCHS[preset], tokenizer, dropout=0.0, cross_attention=False)
    rng = random.Random(seed)

    def batch_loss() -> torch.Tensor:
        batch = rng.sample(sequences, min(batch_size, len(sequences)))
        length = max(len(s) for s in batch)
        ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)  # the pad token is also BOS/EOS: say which is which
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, 1 : len(seq)] = torch.tensor(seq[1:])
            mask[row, : len(seq)] = 1
        # Next-token CE computed here, as the captioner does: handing `labels=` to GPT2LMHeadModel makes
        # transformers 5 warn that it cannot tell the loss type from the class name (it then uses this same loss).
        logits = model(input_ids=ids, attention_mask=mask).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    _fit(list(model.parameters()), batch_loss, steps, lr, "GPT-2 LM loss")
    return atomic.replace_dir(out_dir, lambda folder: (model.save_pretrained(folder), tokenizer.save_pretrained(folder)))
