"""Benchmark: the shard loader vs HuggingFace's ViTImageProcessor, and shard conversion throughput.

    .venv/bin/python bench/loader.py [--images 512] [--repeats 3]
    .venv/bin/python bench/loader.py --train-stream --workers N [--images 256] [--batch 32] [--batches 40]

Measured side by side in one run, medians over repeats, single process and one torch thread
(so images/s is per core):
  (a) this loader: shard tar → decoded, resized 224×224 float [0,1] batch (+ tokenised captions);
  (b) ViTImageProcessor on the same images, already decoded to PIL (its input in a typical pipeline);
  (c) `advcap shards` conversion of 640×480 JPEGs (resize 256) with 1 and 2 worker processes.
The last line is one JSON object with the figures.

`--train-stream` measures instead what training reads: `TrainStream` through `make_loader` with N worker
processes (`data.workers`), images/s in steady state. A worker's epoch is lengthened to `--batches`
batches (the shards are resampled, so any length reads real data), so worker start-up is paid once as in a
COCO epoch, and the clock starts when the first round of batches (one per worker) has arrived.
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

from advcap.data.loader import EvalStream, TrainStream, make_loader
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


def time_train_stream(manifest, tokenizer, image_size: int, batch: int, workers: int, batches: int) -> float:
    """Steady-state images/s of the training input path with `workers` worker processes."""
    stream = TrainStream(manifest, tokenizer, image_size, 32, batch, 0, 0, 1, workers)
    stream.batches_per_worker = batches  # a long epoch: see the module docstring
    arrivals = [(time.perf_counter(), batch["pixels"].shape[0]) for batch in make_loader(stream, workers)]
    first_round = max(1, workers)
    if len(arrivals) <= first_round:
        raise SystemExit(f"--batches {batches} gave {len(arrivals)} batches: too few to time after the first round")
    start = arrivals[first_round - 1][0]
    return sum(n for _, n in arrivals[first_round:]) / (arrivals[-1][0] - start)


def train_stream_main(args: argparse.Namespace) -> None:
    """The `--train-stream` measurement (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        annotations, images = make_source(tmp / "src", args.images)
        tokenizer = train_tokenizer([f"a picture number {i} with shapes" for i in range(200)], tmp / "tok", 300)
        convert("karpathy", annotations, images, tmp / "shards", resize=256, shard_size=64, workers=1)
        manifest = load_manifest(tmp / "shards")
        rates = [time_train_stream(manifest, tokenizer, args.image_size, args.batch, args.workers, args.batches)
                 for _ in range(args.repeats)]
    figures = {"workers": args.workers, "batch": args.batch, "image_size": args.image_size,
               "batches_per_worker": args.batches, "repeats": args.repeats,
               "train_stream_img_per_s": round(statistics.median(rates), 1)}
    print(f"training stream, {args.workers} workers, batch {args.batch}, {args.image_size} px: "
          f"{figures['train_stream_img_per_s']} img/s")
    print(json.dumps(figures))


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
    parser.add_argument("--train-stream", action="store_true", help="measure the training stream only (below)")
    parser.add_argument("--workers", type=int, default=2, help="--train-stream: DataLoader worker processes")
    parser.add_argument("--batch", type=int, default=BATCH, help="--train-stream: images per batch")
    parser.add_argument("--batches", type=int, default=40, help="--train-stream: batches per worker")
    parser.add_argument("--image-size", type=int, default=SIZE, help="--train-stream: side in px")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.train_stream:
        train_stream_main(args)
        return
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
