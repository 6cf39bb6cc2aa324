"""Benchmark: the cost of in-step FGSM, measured side by side in one run.

    .venv/bin/python bench/step.py [--repeats 7] [--batch 8] [--image-size 224] [--arch small|paper]

Median wall time of one training micro-step (forward(s) + backward(s) + optimizer step) for
  clean                   1 forward + 1 backward                          (the reference)
  adversarial             attack pass (input gradient only) + adversarial forward/backward
  mixed                   scheme `reuse`: the clean backward also yields ∂L/∂x (DDP / single process)
  mixed, encoder frozen   the same with the ViT frozen (freeze_vit)
  mixed, decoder frozen   the same with GPT-2 frozen (freeze_gpt)
  mixed, combined         scheme `combined`: autograd.grad(retain_graph) + one combined backward (ZeRO-2)
on one model (`small`: ViT and GPT-2 of hidden 256, 4 layers; `paper`: ViT-B/16 and GPT-2 small, the
paper's sizes, randomly initialised; 224 px, 24-token captions), interleaved over repeats so machine-load
drift hits all variants alike. Each variant's FLOPs are counted once (torch's FLOP formulas for matmuls,
convolutions and attention, forward and backward), so the time ratio can be read against the FLOP ratio, its
floor: `mixed` does 2× the FLOPs of clean. The last line is one JSON object with the figures.
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
    "mixed_freeze_gpt": ("mixed", "reuse", "decoder"),
    "mixed_combined": ("mixed", "combined", "none"),
}


ARCHS = {
    "small": (PresetArch(256, 4, 4, 16, 256, 4, 4, 64), 1000),
    "paper": (PresetArch(768, 12, 12, 16, 768, 12, 12, 64), 50257),  # ViT-B/16 + GPT-2 small (124M)
}


def build(arch: PresetArch, image_size: int, vocab: int) -> Captioner:
    from transformers import VisionEncoderDecoderModel

    from advcap.model import preset_decoder, preset_encoder

    tokenizer = type("Tok", (), {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "__len__": lambda self: vocab})()
    model = VisionEncoderDecoderModel(encoder=preset_encoder(arch, image_size, 0.0), decoder=preset_decoder(arch, tokenizer, 0.0))
    model.config.decoder_start_token_id = 0
    model.config.pad_token_id = 0
    return Captioner(model, image_size)


def set_freeze(model: Captioner, modules: str) -> None:
    for param in model.parameters():
        param.requires_grad_(True)
    apply_freeze(model, SimpleNamespace(modules=modules, keep_trainable=[], also_freeze=[]))


def step(model, optimizer, pixels, labels, settings) -> None:
    train_micro_step(model, model, pixels, labels, settings, 1.0 / int((labels != -100).sum()),
                     backward=lambda loss: loss.backward(), no_sync=contextlib.nullcontext, sync=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_step(model, optimizer, pixels, labels, settings) -> float:
    start = time.perf_counter()
    step(model, optimizer, pixels, labels, settings)
    return time.perf_counter() - start


def count_flops(model, optimizer, pixels, labels, settings) -> int:
    """FLOPs of one step by torch's FLOP formulas (matmul, conv, attention), forward and backward.

    A plain dispatch mode, not FlopCounterMode: the latter's module tracking hooks refuse autograd.grad,
    which the attack passes use."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **(kwargs or {}), out_val=out)
            return out

    with Count():
        step(model, optimizer, pixels, labels, settings)
    return Count.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    args = parser.parse_args()
    arch, vocab = ARCHS[args.arch]
    torch.manual_seed(0)
    pixels = torch.rand(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(1, vocab, (args.batch, 24))
    labels[::2, 16:] = -100  # captions of different lengths
    # One model and optimizer for every variant (the paper's sizes would not fit five times); a variant
    # sets its freeze policy before it runs. The weights drift by lr 1e-9 steps: immaterial to the cost.
    model = build(arch, args.image_size, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)
    settings = {name: StepSettings(mode=mode, clean_weight=0.5, epsilon=0.05, scheme=scheme)
                for name, (mode, scheme, _) in VARIANTS.items()}
    flops = {}
    for name, (_, _, freeze) in VARIANTS.items():
        set_freeze(model, freeze)
        flops[name] = count_flops(model, optimizer, pixels, labels, settings[name])  # also the warm-up
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, (_, _, freeze) in VARIANTS.items():
            set_freeze(model, freeze)
            times[name].append(time_step(model, optimizer, pixels, labels, settings[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    figures = {
        "arch": args.arch, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "batch": args.batch, "image_size": args.image_size, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        **{f"{name}_s": round(m, 4) for name, m in median.items()},
        **{f"{name}_over_clean": round(m / median["clean"], 3) for name, m in median.items() if name != "clean"},
        **{f"{name}_gflop": round(f / 1e9, 1) for name, f in flops.items()},
        "clean_samples_per_s": round(args.batch / median["clean"], 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(f"{args.arch}: {figures['parameters_m']} M parameters, batch {args.batch}, {args.image_size} px, "
          f"{torch.get_num_threads()} threads")
    for name, m in median.items():
        print(f"{name:18s} {m * 1000:9.1f} ms/step  {m / median['clean']:.2f}× clean  "
              f"FLOPs {flops[name] / flops['clean']:.2f}× clean  {flops[name] / m / 1e9:6.1f} GFLOP/s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
