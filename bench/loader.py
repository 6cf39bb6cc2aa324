"""Benchmark: the shard loader vs HuggingFace's ViTImageProcessor, and shard conversion throughput.

    .venv/bin/python bench/loader.py [--images 512] [--repeats 3]

Measured side by side in one run, medians over repeats, single process and one torch thread
(so images/s is per core):
  (a) this loader: shard tar → decoded, resized 224×224 float [0,1] batch (+ tokenised captions);
  (b) ViTImageProcessor on the same images, already decoded to PIL (its input in a typical pipeline);
  (c) `advcap shards` conversion of 640×480 JPEGs (resize 256) with 1 and 2 worker processes.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from advcap.data.loader import EvalStream
from advcap.data.manifest import load_manifest
from advcap.data.shardwriter import convert
from advcap.tokenizer import train_tokenizer

SIZE = 224
BATCH = 32


def make_source(root: Path, n: int) -> tuple[Path, Path]:
    """n photo-sized (640×480) JPEGs with shapes and noise, and a Karpathy-split file for them."""
    rng = random.Random(0)
    images = root / "images"
    images.mkdir(parents=True)
    entries = []
    for i in range(n):
        image = Image.effect_noise((640, 480), 40).convert("RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(600), rng.randrange(440)
            draw.ellipse((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(images / f"{i:05d}.jpg", quality=90)
        entries.append({"filename": f"{i:05d}.jpg", "split": "train", "sentences": [{"raw": f"a picture number {i} with shapes"}] * 5})
    annotations = root / "captions.json"
    annotations.write_text(json.dumps({"images": entries}))
    return annotations, images


def time_loader(manifest, tokenizer) -> float:
    stream = EvalStream(manifest, "train", tokenizer, SIZE, 32, BATCH)
    start = time.perf_counter()
    n = sum(batch["pixels"].shape[0] for batch in stream)
    return n / (time.perf_counter() - start)


def time_vit_processor(decoded: list[Image.Image]) -> float:
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": SIZE, "width": SIZE})
    start = time.perf_counter()
    for i in range(0, len(decoded), BATCH):
        processor(decoded[i : i + BATCH], return_tensors="pt")
    return len(decoded) / (time.perf_counter() - start)


def time_conversion(annotations: Path, images: Path, out: Path, workers: int, n: int) -> float:
    start = time.perf_counter()
    convert("karpathy", annotations, images, out, resize=256, shard_size=64, workers=workers)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        annotations, images = make_source(tmp / "src", args.images)
        tokenizer = train_tokenizer([f"a picture number {i} with shapes" for i in range(200)], tmp / "tok", 300)
        conversion = {1: [], 2: []}
        for r in range(args.repeats):
            for workers in (1, 2):
                out = tmp / f"shards-{workers}-{r}"
                conversion[workers].append(time_conversion(annotations, images, out, workers, args.images))
        manifest = load_manifest(tmp / "shards-1-0")
        decoded = []
        for shard in manifest.split("train"):
            with tarfile.open(shard.path) as tar:
                decoded += [Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB") for m in tar if m.name.endswith(".jpg")]
        loader, vit = [], []
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
            loader.append(time_loader(manifest, tokenizer))
            vit.append(time_vit_processor(decoded))
    figures = {
        "images": args.images,
        "repeats": args.repeats,
        "loader_img_per_s_per_core": round(statistics.median(loader), 1),
        "vit_processor_img_per_s_per_core": round(statistics.median(vit), 1),
        "loader_over_vit_processor": round(statistics.median(a / b for a, b in zip(loader, vit)), 2),
        "convert_img_per_s_1_worker": round(statistics.median(conversion[1]), 1),
        "convert_img_per_s_2_workers": round(statistics.median(conversion[2]), 1),
    }
    print(f"loader (shards → 224 px [0,1] batch): {figures['loader_img_per_s_per_core']} img/s per core")
    print(f"ViTImageProcessor (decoded PIL → tensor): {figures['vit_processor_img_per_s_per_core']} img/s per core")
    print(f"loader / ViTImageProcessor: {figures['loader_over_vit_processor']}×")
    print(f"conversion: {figures['convert_img_per_s_1_worker']} img/s (1 worker), {figures['convert_img_per_s_2_workers']} img/s (2 workers)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
