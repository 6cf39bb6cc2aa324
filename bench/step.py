"""Benchmark: the cost of in-step FGSM, measured side by side in one run.

    .venv/bin/python bench/step.py [--repeats 7] [--batch 8] [--image-size 224] [--arch small|paper]
                                   [--device cpu|cuda] [--precision fp32|bf16|tf32] [--peak-tflops X]

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

Device and precision mirror training. `--device cuda` moves model and batch to the GPU, uses the fused
AdamW training uses there, and synchronises the device around each timed step. `--precision bf16` runs
every forward under `torch.autocast(dtype=bfloat16)` with fp32 outputs, as Accelerate's
`mixed_precision="bf16"` does to the prepared model (weights, gradients and AdamW stay fp32); `tf32`
(CUDA only) is fp32 with TF32 matmuls, which training does not switch on. Attention is transformers'
default, SDPA (reported as `attn_implementation`). Per variant: samples/s and model FLOP utilisation
(MFU) = counted FLOPs / time / the device's dense peak for the precision, from `--peak-tflops` or, on a
GPU, the table below; null when unknown. Peak memory: `torch.cuda.max_memory_allocated` on a GPU, the
process's peak RSS on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import statistics
import time
from types import MethodType, SimpleNamespace

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


# Dense (no sparsity) peak TFLOP/s by precision, from the vendors' data sheets: NVIDIA A100 Tensor Core GPU,
# H100 Tensor Core GPU (SXM and PCIe), V100 (SXM2 and PCIe), A10 and L4 data sheets. None: the GPU lacks it.
# Matched against `torch.cuda.get_device_name()` in order; the first pattern that matches wins.
PEAK_TFLOPS: list[tuple[str, dict[str, float | None]]] = [
    (r"H100.*PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    (r"H100 (SXM|80GB HBM3)", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}),
    (r"A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"V100-SXM", {"bf16": None, "tf32": None, "fp32": 15.7}),
    (r"V100-PCIE", {"bf16": None, "tf32": None, "fp32": 14.0}),
    (r"\bA10\b", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bL4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
]


def known_peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's dense peak TFLOP/s of a GPU (by its CUDA name) at a precision; None if not listed."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks[precision]
    return None


def check_device(device: str, precision: str) -> None:
    """Refuse, in words, what this machine cannot run (a SystemExit, not a traceback)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA device on this machine")
    if precision == "tf32" and device != "cuda":
        raise SystemExit("--precision tf32 exists on CUDA GPUs only (fp32 storage, TF32 tensor-core matmuls)")
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"--precision bf16: {torch.cuda.get_device_name()} has no bf16 support")


def set_precision(model: Captioner, device: str, precision: str) -> None:
    """What training's precision does to the model: bf16 autocast on every forward (outputs back in fp32),
    as Accelerate's `prepare` does for `mixed_precision="bf16"`; tf32: TF32 matmuls (CUDA only)."""
    if precision == "bf16":
        from accelerate.utils import convert_outputs_to_fp32

        forward = torch.autocast(device_type=device, dtype=torch.bfloat16)(type(model).forward)
        model.forward = MethodType(convert_outputs_to_fp32(forward), model)
    elif precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: str) -> None:
    """Wait for the device's queued kernels, so a wall-clock interval covers the work launched in it."""
    if device == "cuda":
        torch.cuda.synchronize()


def build(arch: PresetArch, image_size: int, vocab: int) -> Captioner:
    from transformers import VisionEncoderDecoderModel

    from advcap.model import preset_decoder, preset_encoder

    tokenizer = type("Tok", (), {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "__len__": lambda self: vocab})()
    model = VisionEncoderDecoderModel(encoder=preset_encoder(arch, image_size, 0.0), decoder=preset_decoder(arch, tokenizer, 0.0))
    model.config.decoder_start_token_id = 0
    model.config.pad_token_id = 0
    return Captioner(model, image_size)


def attention_implementation(model: Captioner) -> str:
    """The attention kernels the encoder and decoder were built with ("sdpa" is transformers' default)."""
    sides = {model.model.encoder.config._attn_implementation, model.model.decoder.config._attn_implementation}
    return "/".join(sorted(str(side) for side in sides))


def set_freeze(model: Captioner, modules: str) -> None:
    for param in model.parameters():
        param.requires_grad_(True)
    apply_freeze(model, SimpleNamespace(modules=modules, keep_trainable=[], also_freeze=[]))


def step(model, optimizer, pixels, labels, settings) -> None:
    train_micro_step(model, model, pixels, labels, settings, 1.0 / int((labels != -100).sum()),
                     backward=lambda loss: loss.backward(), no_sync=contextlib.nullcontext, sync=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_step(model, optimizer, pixels, labels, settings, device: str = "cpu") -> float:
    synchronize(device)
    start = time.perf_counter()
    step(model, optimizer, pixels, labels, settings)
    synchronize(device)
    return time.perf_counter() - start


def count_flops(model, optimizer, pixels, labels, settings) -> int:
    """FLOPs of one step by torch's FLOP formulas (matmul, conv, attention), forward and backward.

    A plain dispatch mode, not FlopCounterMode: the latter's module tracking hooks refuse autograd.grad,
    which the attack passes use."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    # torch's table lacks the CPU kernels of SDPA; their arguments begin as the CUDA flash kernels' do.
    formulas = {**flop_registry,
                aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
                aten._scaled_dot_product_flash_attention_for_cpu_backward:
                    flop_registry[aten._scaled_dot_product_flash_attention_backward]}

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = formulas.get(func._overloadpacket)
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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "tf32"), default="fp32")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak TFLOP/s at this precision (default: the GPU table; CPU: none)")
    args = parser.parse_args()
    check_device(args.device, args.precision)
    device = args.device
    arch, vocab = ARCHS[args.arch]
    torch.manual_seed(0)
    pixels = torch.rand(args.batch, 3, args.image_size, args.image_size).to(device)
    labels = torch.randint(1, vocab, (args.batch, 24))
    labels[::2, 16:] = -100  # captions of different lengths
    labels = labels.to(device)
    # One model and optimizer for every variant (the paper's sizes would not fit five times); a variant
    # sets its freeze policy before it runs. The weights drift by lr 1e-9 steps: immaterial to the cost.
    model = build(arch, args.image_size, vocab).to(device)
    set_precision(model, device, args.precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9, fused=True if device == "cuda" else None)
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
            times[name].append(time_step(model, optimizer, pixels, labels, settings[name], device))
    median = {name: statistics.median(t) for name, t in times.items()}
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak_tflops = args.peak_tflops or (known_peak_tflops(device_name, args.precision) if device == "cuda" else None)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peak_memory = torch.cuda.max_memory_allocated() if device == "cuda" else rss
    mfu = {name: None if peak_tflops is None else flops[name] / m / (peak_tflops * 1e12) for name, m in median.items()}
    figures = {
        "arch": args.arch, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "batch": args.batch, "image_size": args.image_size, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        **{f"{name}_s": round(m, 4) for name, m in median.items()},
        **{f"{name}_over_clean": round(m / median["clean"], 3) for name, m in median.items() if name != "clean"},
        **{f"{name}_gflop": round(f / 1e9, 1) for name, f in flops.items()},
        "clean_samples_per_s": round(args.batch / median["clean"], 3),
        "peak_rss_mb": round(rss / 2**20, 1),
        "device": device, "device_name": device_name, "precision": args.precision,
        "attn_implementation": attention_implementation(model),
        **{f"{name}_samples_per_s": round(args.batch / m, 3) for name, m in median.items()},
        "peak_memory_bytes": int(peak_memory),
        "peak_tflops": peak_tflops,
        **{f"{name}_mfu": None if u is None else round(u, 4) for name, u in mfu.items()},
    }
    print(f"{args.arch}: {figures['parameters_m']} M parameters, batch {args.batch}, {args.image_size} px, "
          f"{torch.get_num_threads()} threads")
    if (device, args.precision) != ("cpu", "fp32") or peak_tflops is not None:
        print(f"{device_name}, {args.precision}, attention {figures['attn_implementation']}, "
              f"peak {peak_tflops or 'unknown'} TFLOP/s, peak memory {peak_memory / 2**30:.2f} GiB")
    for name, m in median.items():
        utilisation = "" if mfu[name] is None else f"  MFU {mfu[name]:.1%}"
        print(f"{name:18s} {m * 1000:9.1f} ms/step  {m / median['clean']:.2f}× clean  "
              f"FLOPs {flops[name] / flops['clean']:.2f}× clean  {flops[name] / m / 1e9:6.1f} GFLOP/s{utilisation}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
