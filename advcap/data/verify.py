"""`advcap verify`: re-read every shard, check it against the manifest (size, sha256, sample count),
check every sample's json as the loaders do (`advcap.data.samples`), and decode every image."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from pathlib import Path
from typing import BinaryIO, Mapping

from tqdm import tqdm

from advcap.data.images import BadImage, open_rgb
from advcap.data.location import FetchError, is_remote, open_url
from advcap.data.manifest import Manifest, ShardInfo, load_manifest
from advcap.data.samples import BadSample, img2dataset_layout, sample_meta

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("image_id", "captions", "split", "filename")


def verify(source: str | Path, split_samples: Mapping[str, int] | None = None, retries: int = 3) -> bool:
    """Check every shard of `source` (a folder or URLs, as advcap.data.location says; `split_samples`
    for shards without a manifest); log each problem naming shard and sample. True if all is well."""
    manifest = load_manifest(source, split_samples=split_samples, retries=retries)
    problems: list[str] = []
    if not is_remote(manifest.root):
        listed = {s.name for s in manifest.shards}
        problems += [f"{stray}: not listed in the manifest"
                     for stray in sorted(p.name for p in Path(source).glob("*.tar") if p.name not in listed)]
    counted: dict[str, int] = {}
    total = sum(manifest.samples(split) for split in _splits(manifest))
    with tqdm(total=total, unit="img", desc="verify", disable=None) as bar:
        for shard in manifest.shards:
            found, shard_problems = _check_shard(shard, retries, bar)
            counted[shard.split] = counted.get(shard.split, 0) + found
            problems += shard_problems
    for split in _splits(manifest):
        if manifest.split_samples and counted.get(split, 0) != manifest.samples(split):
            problems.append(f"split {split}: {counted.get(split, 0)} samples, data.samples.{split} says {manifest.samples(split)}")
    for problem in problems:
        log.error("%s", problem)
    if problems:
        log.error("verify: %d problem(s) in %s", len(problems), source)
    else:
        log.info("verify: %d shards, %d samples OK in %s", len(manifest.shards), sum(counted.values()), source)
    return not problems


def _splits(manifest: Manifest) -> list[str]:
    return sorted({s.split for s in manifest.shards})


class _Hashing(io.RawIOBase):
    """Passes a stream through, counting its bytes and hashing them."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.size, self.hash = stream, 0, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        self.size += len(data)
        self.hash.update(data)
        return len(data)


def _check_shard(shard: ShardInfo, retries: int, bar: tqdm) -> tuple[int, list[str]]:
    """(samples found, problems) for one shard, read once as a stream (hash, size and members together)."""
    name = shard.url if is_remote(shard.url) else shard.name
    try:
        stream = open_url(shard.url, retries)
    except FetchError as err:
        return 0, [f"{name}: {err.error}"]
    problems = []
    samples: dict[str, dict[str, bytes]] = {}
    hashing = _Hashing(stream)
    try:
        with tarfile.open(fileobj=io.BufferedReader(hashing), mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if member.isfile() and ext in ("jpg", "json", "txt"):
                    samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
        while hashing.read(1 << 20):  # the tar's end padding counts towards size and hash
            pass
    except (tarfile.TarError, OSError) as err:
        problems.append(f"{name}: unreadable tar after {len(samples)} samples ({err})")
    finally:
        try:
            stream.close()
        except FetchError as err:
            problems.append(f"{name}: {err.error}")
    if not problems:
        if shard.bytes is not None and hashing.size != shard.bytes:
            problems.append(f"{name}: {hashing.size} bytes, the manifest says {shard.bytes} (truncated or changed)")
        if shard.sha256 is not None and hashing.hash.hexdigest() != shard.sha256:
            problems.append(f"{name}: sha256 differs from the manifest (the file changed or is corrupt)")
    for key, sample in samples.items():
        problems += [f"{name}/{key}: {p}" for p in _check_sample(sample, shard.split)]
        bar.update(1)
    if shard.samples is not None and len(samples) != shard.samples:
        problems.append(f"{name}: {len(samples)} samples, manifest says {shard.samples}")
    return len(samples), problems


def _check_sample(sample: dict[str, bytes], split: str) -> list[str]:
    problems = []
    try:
        meta = sample_meta(sample)
        if not img2dataset_layout(sample):  # advcap's own layout: what `advcap shards` writes
            missing = [f for f in REQUIRED_FIELDS if f not in meta.raw]
            if missing:
                problems.append(f"json lacks {', '.join(missing)}")
            elif meta.raw["split"] != split:
                problems.append(f"json says split {meta.raw['split']!r}, the manifest {split!r}")
            elif len(meta.captions) != len(meta.raw["captions"]):
                problems.append(f"{len(meta.raw['captions']) - len(meta.captions)} unusable caption(s) (blank, not strings, or not valid Unicode)")
    except BadSample as err:
        return [str(err)]
    try:
        open_rgb(sample["jpg"])
    except BadImage as err:
        problems.append(f"jpg {err}")
    return problems
