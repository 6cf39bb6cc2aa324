"""Benchmark: captions/s of batched greedy generation with and without the key-value cache.

    .venv/bin/python bench/generate.py [--preset demo|h256] [--image-size 64] [--batch 32]
                                       [--max-new-tokens 24] [--repeats 5] [--threads N]

One process, one run: the captioner `advcap eval` uses (`Captioner.generate`, greedy), randomly initialised
(speed does not depend on the weights), captions a fixed batch of random images with `use_cache=True`
and `use_cache=False`, interleaved (the order alternates per repeat, so drifting machine load hits both
alike), after one warm-up call each; captions/s is the batch size over the median wall time. Every call
generates exactly `--max-new-tokens` tokens per caption (`min_new_tokens` keeps EOS away), so both
variants do the same work. Presets: `demo` (advcap's demo captioner: ViT and GPT-2 of 2 layers, hidden 64)
and `h256` (4 layers, hidden 256, 8 heads). The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from advcap.model import PRESET_ARCHS, Captioner, PresetArch, preset_decoder, preset_encoder, set_special_tokens

ARCHS = {"demo": PRESET_ARCHS["demo"], "h256": PresetArch(256, 4, 8, 8, 256, 4, 8, 64)}
VOCAB = 1000  # about what `advcap tokenizer` trains on the demo captions


class _Vocabulary:
    """The few tokenizer attributes a preset decoder needs: its size and the special ids."""

    bos_token_id = eos_token_id = pad_token_id = 0

    def __len__(self) -> int:
        return VOCAB


def build(arch: PresetArch, image_size: int, max_new_tokens: int) -> Captioner:
    from transformers import VisionEncoderDecoderModel

    torch.manual_seed(0)
    vocab = _Vocabulary()
    model = VisionEncoderDecoderModel(
        encoder=preset_encoder(arch, image_size, dropout=0.0), decoder=preset_decoder(arch, vocab, dropout=0.0)
    )
    set_special_tokens(model, vocab)
    model.generation_config.min_new_tokens = max_new_tokens  # no early EOS: every call does full-length work
    return Captioner(model, image_size).eval()


def time_call(captioner: Captioner, pixels: torch.Tensor, max_new_tokens: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    ids = captioner.generate(pixels, max_new_tokens=max_new_tokens, num_beams=1, use_cache=use_cache)
    return time.perf_counter() - start, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(ARCHS), default="demo")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    arch = ARCHS[args.preset]
    captioner = build(arch, args.image_size, args.max_new_tokens)
    pixels = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in captioner.parameters())
    print(
        f"captioner: preset {args.preset} (hidden {arch.decoder_hidden}, {arch.decoder_layers}+{arch.encoder_layers} layers), "
        f"{params / 1e6:.2f}M parameters, {args.image_size}x{args.image_size} px, vocabulary {VOCAB}"
    )
    print(
        f"greedy, batch {args.batch}, {args.max_new_tokens} new tokens per caption, {args.repeats} interleaved repeats, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )

    outputs = {}
    for use_cache in (True, False):  # warm-up (allocator, lazy init), and the outputs to compare
        _, outputs[use_cache] = time_call(captioner, pixels, args.max_new_tokens, use_cache)
    expected_shape = (args.batch, 1 + args.max_new_tokens)
    if any(tuple(ids.shape) != expected_shape for ids in outputs.values()):
        raise SystemExit(f"generation did not run the full length: {[tuple(i.shape) for i in outputs.values()]}")
    identical = torch.equal(outputs[True], outputs[False])

    seconds = {True: [], False: []}
    for repeat in range(args.repeats):
        for use_cache in ((True, False) if repeat % 2 == 0 else (False, True)):
            elapsed, _ = time_call(captioner, pixels, args.max_new_tokens, use_cache)
            seconds[use_cache].append(elapsed)
    rate = {c: args.batch / statistics.median(s) for c, s in seconds.items()}
    for use_cache, label in ((True, "with KV cache   "), (False, "without KV cache")):
        spread = ", ".join(f"{s:.3f}" for s in seconds[use_cache])
        print(f"{label}: {rate[use_cache]:8.1f} captions/s  ({rate[use_cache] * args.max_new_tokens:8.0f} tokens/s; "
              f"seconds per batch: {spread})")
    speedup = rate[True] / rate[False]
    print(f"cache speedup: {speedup:.2f}x; cached and uncached greedy captions identical: {identical}")
    print(json.dumps({
        "preset": args.preset,
        "image_size": args.image_size,
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "parameters": params,
        "captions_per_s_cache": round(rate[True], 2),
        "captions_per_s_no_cache": round(rate[False], 2),
        "cache_speedup": round(speedup, 3),
        "identical_outputs": identical,
    }))


if __name__ == "__main__":
    main()
