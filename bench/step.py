"""Benchmark: the cost of in-step FGSM, measured side by side in one run.

    .venv/bin/python bench/step.py [--repeats 7] [--batch 8] [--image-size 224]

Median wall time of one training micro-step (forward(s) + backward(s) + optimizer step) for
  clean                   1 forward + 1 backward                          (the reference)
  adversarial             attack pass (input gradient only) + adversarial forward/backward
  mixed                   scheme `reuse`: the clean backward also yields ∂L/∂x (DDP / single process)
  mixed, encoder frozen   the same with the ViT frozen (freeze_vit)
  mixed, combined         scheme `combined`: autograd.grad(retain_graph) + one combined backward (ZeRO-2)
on a fixed model (ViT and GPT-2 of hidden 256, 4 layers, 224 px, patch 16, batch 8, 24-token
captions), interleaved over repeats so machine-load drift hits all variants alike. The floor for
`mixed` is 2× clean: one clean forward+backward (which also gives the input gradient) and one
adversarial forward+backward. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time
from types import SimpleNamespace

import torch

from advcap.freeze import apply_freeze
from advcap.model import Captioner, PresetArch
from advcap.step import StepSettings, train_micro_step

VARIANTS = {
    "clean": ("clean", "reuse", "none"),
    "adversarial": ("adversarial", "reuse", "none"),
    "mixed": ("mixed", "reuse", "none"),
    "mixed_freeze_vit": ("mixed", "reuse", "encoder"),
    "mixed_combined": ("mixed", "combined", "none"),
}


def build(image_size: int, vocab: int) -> Captioner:
    from transformers import VisionEncoderDecoderModel

    from advcap.model import preset_decoder, preset_encoder

    arch = PresetArch(256, 4, 4, 16, 256, 4, 4, 64)
    tokenizer = type("Tok", (), {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "__len__": lambda self: vocab})()
    model = VisionEncoderDecoderModel(encoder=preset_encoder(arch, image_size, 0.0), decoder=preset_decoder(arch, tokenizer, 0.0))
    model.config.decoder_start_token_id = 0
    model.config.pad_token_id = 0
    return Captioner(model, image_size)


def time_step(model, optimizer, pixels, labels, settings) -> float:
    start = time.perf_counter()
    train_micro_step(model, model, pixels, labels, settings, 1.0 / int((labels != -100).sum()),
                     backward=lambda loss: loss.backward(), no_sync=contextlib.nullcontext, sync=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    vocab = 1000
    pixels = torch.rand(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(1, vocab, (args.batch, 24))
    labels[::2, 16:] = -100  # captions of different lengths
    models = {}
    for name, (mode, scheme, freeze) in VARIANTS.items():
        torch.manual_seed(0)
        model = build(args.image_size, vocab)
        apply_freeze(model, SimpleNamespace(modules=freeze, keep_trainable=[], also_freeze=[]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        settings = StepSettings(mode=mode, clean_weight=0.5, epsilon=0.05, scheme=scheme)
        time_step(model, optimizer, pixels, labels, settings)  # warm-up
        models[name] = (model, optimizer, settings)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, (model, optimizer, settings) in models.items():
            times[name].append(time_step(model, optimizer, pixels, labels, settings))
    median = {name: statistics.median(t) for name, t in times.items()}
    figures = {
        "batch": args.batch, "image_size": args.image_size, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        **{f"{name}_s": round(m, 4) for name, m in median.items()},
        **{f"{name}_over_clean": round(m / median["clean"], 3) for name, m in median.items() if name != "clean"},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    for name, m in median.items():
        print(f"{name:18s} {m * 1000:8.1f} ms/step  {m / median['clean']:.2f}× clean")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
