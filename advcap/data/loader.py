"""Streaming loaders over WebDataset shards: an endless resampled stream for training, and a finite,
exact-once stream in a fixed global order for evaluation.

Batches are dicts:
    pixels     float32 (B,3,S,S) in [0,1], resized to exactly S×S (bilinear, as ViTImageProcessor)
    input_ids  int64 (B,L): caption tokens + EOS, padded with the pad id
    labels     int64 (B,L): input_ids with -100 on the padding after the first EOS
    image_ids  list[str]; references: list[list[str]] (all usable captions of each image)
    bad_shards, bad_samples (training batches only): running counts, for this rank and worker, of
               shard reads cut short by a corrupt tar and of samples skipped as bad
Only `.jpg` and `.json` members are ever read: nothing is unpickled.

Bad data never stops a run: a sample without a `.jpg` or `.json` member, whose json is not an
object or lacks a string image_id or any usable caption (`advcap.data.samples`), or whose image does
not decode, is skipped with a warning naming shard and key, and counted. Unusable captions (blank,
not strings, lone surrogates) are dropped from a sample that has usable ones.

Training (`TrainStream`): each (rank, worker) draws shards with replacement from its own RNG seeded
by (seed, epoch, rank, worker), so the data order is a deterministic function of those and a resumed
run skips to where it stopped without decoding what it skips. Every rank yields the same number of
batches per epoch (sized from the manifest), which keeps collective ops in step.

Evaluation (`EvalStream`): batches of a fixed size are formed once over the split in manifest
order and dealt round-robin to ranks (and within a rank to workers), so every image is processed
exactly once, in the same batch whatever the world size.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from advcap.data.images import BadImage, to_square_pixels
from advcap.data.location import FetchError, open_url
from advcap.data.manifest import Manifest, ShardInfo
from advcap.data.samples import MEMBERS, BadSample, SampleMeta, sample_meta

log = logging.getLogger(__name__)

# A shard that yields nothing this many times in a row means no shard is readable: stop, don't spin.
MAX_EMPTY_SHARDS_IN_A_ROW = 50


def _wanted_member(name: str) -> bool:
    return name.endswith(MEMBERS)


@dataclass
class Tokenize:
    """Caption → token ids ending in EOS; truncation keeps the EOS."""

    tokenizer: object
    max_tokens: int

    def __call__(self, caption: str) -> list[int]:
        ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"][: self.max_tokens - 1]
        return ids + [self.tokenizer.eos_token_id]


def collate(pixels: list[np.ndarray], token_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack uint8 (S,S,3) images into float [0,1] (B,3,S,S) and pad token lists (labels -100 on padding)."""
    # Transpose while still uint8 (4× less memory traffic than transposing floats).
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    length = max(len(t) for t in token_ids)
    input_ids = torch.full((len(token_ids), length), pad_id, dtype=torch.long)
    labels = torch.full((len(token_ids), length), -100, dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
    return {"pixels": images, "input_ids": input_ids, "labels": labels}


class _ShardReader:
    """Reads shards through webdataset and decodes their samples, skipping (and counting) truncated
    or corrupt shards and bad samples."""

    def __init__(self, where: str):
        self.where = where
        self.bad_shards = 0
        self.bad_samples = 0

    def decode(self, samples: list[dict], image_size: int) -> tuple[list[np.ndarray], list[SampleMeta]]:
        """Decode jpg + json of raw tar samples; a bad sample is skipped with a warning naming it."""
        pixels, metas = [], []
        for sample in samples:
            try:
                # A sample kept by a ShardCache comes back decoded (at this stream's one image size); any
                # other sample dict is dropped after its batch, and its decoding with it.
                if _DECODED not in sample:
                    meta = sample_meta(sample)
                    sample[_DECODED] = to_square_pixels(sample["jpg"], image_size), meta
                image, meta = sample[_DECODED]
            except (BadSample, BadImage) as err:
                self.bad_samples += 1
                log.warning(
                    "%s: skipping bad sample %s in %s (%d bad samples so far): %s",
                    self.where, sample.get("__key__"), sample.get("__url__"), self.bad_samples, err,
                )
                continue
            pixels.append(image)
            metas.append(meta)
        return pixels, metas

    def samples(self, shard: ShardInfo, retries: int) -> Iterator[dict]:
        """The raw samples of one shard; a fetch that fails (after `retries`) or a read that breaks off
        ends the shard, with a warning naming it, and counts as a bad shard read."""
        failed: list[BaseException] = []

        def on_error(exn: BaseException) -> bool:
            failed.append(exn)
            return False  # stop reading this shard; the next one is tried

        count = 0
        try:
            stream = open_url(shard.url, retries)
        except FetchError as err:
            failed.append(err)
        else:
            try:
                members = tar_file_expander([{"url": shard.url, "stream": stream}], handler=on_error,
                                            select_files=_wanted_member)
                for sample in group_by_keys(members, handler=on_error):
                    count += 1
                    yield sample
            finally:
                try:
                    stream.close()
                except FetchError as err:  # a pipe: command that failed midway
                    failed.append(err)
        if failed:
            self.bad_shards += 1
            log.warning(
                "%s: skipping the rest of corrupt shard %s after %d samples (%d bad shard reads so far): %s",
                self.where, shard.url, count, self.bad_shards, _describe(failed[0]),
            )


def _describe(error: BaseException) -> str:
    """The error without the stream objects webdataset appends to its arguments."""
    if isinstance(error, FetchError) or not error.args:
        return str(error)
    return f"{type(error).__name__}: {error.args[0]}"


_DECODED = "__advcap_decoded__"  # a sample dict's decoded (pixels, SampleMeta), added by _ShardReader.decode


class ShardCache:
    """Training shards read whole and without error, kept in memory (their raw samples, and each sample's
    decoding once done) so that later reads of a shard, in this epoch or the next, neither read nor decode it
    again. Up to `budget_bytes` (raw bytes + decoded pixels); a shard that does not fit is read from its source
    each time. The data and its order are the same with or without it."""

    def __init__(self, budget_bytes: int, image_size: int):
        self.budget, self.used = budget_bytes, 0
        self.pixels_per_sample = image_size * image_size * 3
        self.shards: dict[str, list[dict]] = {}
        self.full = False

    def get(self, url: str) -> list[dict] | None:
        return self.shards.get(url)

    def offer(self, url: str, samples: list[dict]) -> None:
        size = sum(len(v) for s in samples for v in s.values() if isinstance(v, bytes))
        size += len(samples) * self.pixels_per_sample
        if self.used + size > self.budget:
            if not self.full:
                self.full = True
                log.info("data cache full (%d of %d MiB used): shards that do not fit are read each time",
                         self.used >> 20, self.budget >> 20)
            return
        self.shards[url] = samples
        self.used += size


class TrainStream(IterableDataset):
    """Endless resampled training batches; one 'epoch' is `batches_per_worker` batches per worker."""

    def __init__(
        self,
        manifest: Manifest,
        tokenizer,
        image_size: int,
        max_tokens: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        shuffle_buffer: int = 1000,
        split: str = "train",
        cache_mb: int = 0,
    ):
        super().__init__()
        self.shards = manifest.split(split)
        self.retries = manifest.retries
        self.tokenize = Tokenize(tokenizer, max_tokens)
        self.pad_id = tokenizer.pad_token_id
        self.image_size, self.batch_size = image_size, batch_size
        self.seed, self.rank = seed, rank
        self.num_workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        samples = manifest.samples(split)
        batches_per_rank = math.ceil(samples / (batch_size * world_size))
        self.batches_per_worker = math.ceil(batches_per_rank / self.num_workers)
        self.epoch, self.skip = 0, 0
        # Kept by the process that iterates: across epochs only with num_workers=0 (data.cache_mb).
        self.cache = ShardCache(cache_mb << 20, image_size) if cache_mb > 0 else None

    @property
    def batches_per_epoch(self) -> int:
        """Batches one rank yields per epoch (equal on every rank)."""
        return self.batches_per_worker * self.num_workers

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Start the next iteration at batch `skip_batches` of `epoch` (for resuming)."""
        self.epoch, self.skip = epoch, skip_batches

    def _worker_role(self) -> tuple[int, int]:
        """(logical worker, batches it skips). DataLoader polls workers 0,1,… in turn; after skipping k
        batches the next one belongs to logical worker k mod n, so physical worker w plays (w + k) mod n."""
        info = get_worker_info()
        worker = info.id if info else 0
        n, k = self.num_workers, self.skip
        logical = (worker + k) % n
        return logical, max(0, (k - logical + n - 1) // n)

    def __iter__(self) -> Iterator[dict]:
        logical, skip = self._worker_role()
        # String seeds hash with SHA-512: stable across processes and Python runs.
        rng = random.Random(f"advcap-train/{self.seed}/{self.epoch}/{self.rank}/{logical}")
        reader = _ShardReader(f"rank {self.rank} worker {logical}")
        raw_batches = _chunks(_shuffled(self._resampled(rng, reader), self.shuffle_buffer, rng), self.batch_size)
        for number, raw in enumerate(islice(raw_batches, skip, self.batches_per_worker), start=skip):
            pixels, metas = reader.decode(raw, self.image_size)
            if not pixels:
                continue
            # Captions are drawn from an RNG of their own per batch, so skipping batches on resume
            # (which decodes nothing) leaves the choices of later batches unchanged.
            pick = random.Random(f"advcap-caption/{self.seed}/{self.epoch}/{self.rank}/{logical}/{number}")
            captions = [pick.choice(m.captions) for m in metas]
            batch = collate(pixels, [self.tokenize(c) for c in captions], self.pad_id)
            batch["image_ids"] = [m.image_id for m in metas]
            batch["bad_shards"] = reader.bad_shards
            batch["bad_samples"] = reader.bad_samples
            yield batch

    def _resampled(self, rng: random.Random, reader: _ShardReader) -> Iterator[dict]:
        empty_in_a_row = 0
        while True:
            shard = rng.choice(self.shards)
            got = 0
            for sample in self._shard_samples(shard, reader):
                got += 1
                yield sample
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if empty_in_a_row >= MAX_EMPTY_SHARDS_IN_A_ROW:
                raise RuntimeError(f"{empty_in_a_row} shard reads in a row gave no sample: are the shards readable?")

    def _shard_samples(self, shard: ShardInfo, reader: _ShardReader) -> Iterator[dict]:
        """One shard's raw samples: from the cache if it holds the shard, else read (and offered to it)."""
        if self.cache is None:
            yield from reader.samples(shard, self.retries)
            return
        cached = self.cache.get(shard.url)
        if cached is not None:
            yield from cached
            return
        samples, bad_reads = [], reader.bad_shards
        for sample in reader.samples(shard, self.retries):
            samples.append(sample)
            yield sample
        if reader.bad_shards == bad_reads:  # read whole, without error
            self.cache.offer(shard.url, samples)


def _shuffled(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style shuffle buffer driven by `rng` (so the order is reproducible)."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def _chunks(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
    while chunk := list(islice(items, size)):
        yield chunk


class EvalStream(IterableDataset):
    """Finite evaluation batches: global batch b goes to rank b mod world, then to worker j mod n."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        tokenizer,
        image_size: int,
        max_tokens: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        limit: int | None = None,
    ):
        super().__init__()
        self.shards = manifest.split(split)
        self.retries = manifest.retries
        self.split = split
        self.tokenize = Tokenize(tokenizer, max_tokens)
        self.pad_id = tokenizer.pad_token_id
        self.image_size, self.batch_size = image_size, batch_size
        self.rank, self.world_size = rank, world_size
        total = manifest.samples(split)
        self.images = total if limit is None else min(limit, total)

    def batch_indices(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Global batch numbers this rank (and worker) processes."""
        n_batches = math.ceil(self.images / self.batch_size)
        mine = range(self.rank, n_batches, self.world_size)
        return [b for j, b in enumerate(mine) if j % num_workers == worker]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        wanted = set(self.batch_indices(worker, num_workers))
        reader = _ShardReader(f"eval {self.split} rank {self.rank}")
        pending: dict[int, list[dict]] = {}
        start: int | None = 0  # global index of the shard's first sample; None once a count is unknown
        for shard in self.shards:
            if start is not None and shard.samples is not None:
                first_batch, last_batch = start // self.batch_size, (start + shard.samples - 1) // self.batch_size
                start += shard.samples
                if not wanted.intersection(range(first_batch, last_batch + 1)):
                    continue  # nothing of ours in this shard: don't even open it
                index = start - shard.samples
            elif start is not None:
                # Shards without a manifest: every rank reads them all, in order, to number the samples.
                index, start = start, None
            for sample in reader.samples(shard, self.retries):
                batch = index // self.batch_size
                index += 1
                if index > self.images:
                    break
                if batch in wanted:
                    pending.setdefault(batch, []).append(sample)
                    if len(pending[batch]) == self.batch_size or index == self.images:
                        yield from self._make_batch(batch, pending.pop(batch), reader)
            if index >= self.images:
                break
        for batch in sorted(pending):  # batches cut short by a corrupt shard
            yield from self._make_batch(batch, pending.pop(batch), reader)

    def _make_batch(self, number: int, samples: list[dict], reader: _ShardReader) -> Iterator[dict]:
        # Bad samples are skipped; evaluation counts the shortfall against the manifest.
        pixels, metas = reader.decode(samples, self.image_size)
        if not pixels:
            return
        references = [m.captions for m in metas]
        batch = collate(pixels, [self.tokenize(r[0]) for r in references], self.pad_id)
        batch.update(batch_index=number, image_ids=[m.image_id for m in metas], references=references)
        yield batch


def split_metadata(manifest: Manifest, split: str) -> Iterator[SampleMeta]:
    """Image id and captions of every usable sample of `split`, in shard order; images are not decoded."""
    reader = _ShardReader(f"{split} captions")
    for shard in manifest.split(split):
        for sample in reader.samples(shard, manifest.retries):
            try:
                yield sample_meta(sample)
            except BadSample as err:
                reader.bad_samples += 1
                log.warning("skipping bad sample %s in %s: %s", sample.get("__key__"), shard.url, err)


def make_loader(stream: IterableDataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a stream that batches itself (batch_size=None). `pin_memory` (only with a CUDA
    device: page-locked batches, whose copies to the GPU can be asynchronous) is done by the loader's own
    thread, beside the step."""
    if num_workers > 0:
        # The fast tokenizer's thread pool does not survive fork; workers tokenize single captions anyway.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        multiprocessing_context="fork" if num_workers > 0 else None,
        pin_memory=pin_memory,
    )
