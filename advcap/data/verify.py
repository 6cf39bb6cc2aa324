"""`advcap verify`: re-read every shard, check it against the manifest (size, sha256, sample count),
check every sample's json as the loaders do (`advcap.data.samples`), and decode every image."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

from tqdm import tqdm

from advcap.data.images import BadImage, open_rgb
from advcap.data.manifest import ShardInfo, load_manifest
from advcap.data.samples import BadSample, read_meta
from advcap.data.shardwriter import sha256_file

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("image_id", "captions", "split", "filename")


def verify(root: str | Path) -> bool:
    """Check every shard of `root`; log each problem naming shard and sample. True if all is well."""
    manifest = load_manifest(root)
    problems: list[str] = []
    listed = {s.name for s in manifest.shards}
    for stray in sorted(p.name for p in Path(root).glob("*.tar") if p.name not in listed):
        problems.append(f"{stray}: not listed in the manifest")
    with tqdm(total=sum(s.samples for s in manifest.shards), unit="img", desc="verify", disable=None) as bar:
        for shard in manifest.shards:
            problems += _check_shard(shard, bar)
    for problem in problems:
        log.error("%s", problem)
    if problems:
        log.error("verify: %d problem(s) in %s", len(problems), root)
    else:
        log.info("verify: %d shards, %d samples OK in %s", len(manifest.shards), sum(s.samples for s in manifest.shards), root)
    return not problems


def _check_shard(shard: ShardInfo, bar: tqdm) -> list[str]:
    path, name = shard.path, shard.name
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if shard.bytes is not None and size != shard.bytes:
        problems.append(f"{name}: {size} bytes, the manifest says {shard.bytes} (truncated or changed)")
    if sha256_file(path) != shard.sha256:
        problems.append(f"{name}: sha256 differs from the manifest (the file changed or is corrupt)")
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if member.isfile() and ext in ("jpg", "json"):
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as err:
        problems.append(f"{name}: unreadable tar after {len(samples)} samples ({err})")
    for key, sample in samples.items():
        problems += [f"{name}/{key}: {p}" for p in _check_sample(sample, shard.split)]
        bar.update(1)
    if len(samples) != shard.samples:
        problems.append(f"{name}: {len(samples)} samples, manifest says {shard.samples}")
    return problems


def _check_sample(sample: dict[str, bytes], split: str) -> list[str]:
    problems = []
    if "jpg" not in sample or "json" not in sample:
        return [f"incomplete sample (has {', '.join(sorted(sample))})"]
    try:
        meta = read_meta(sample["json"])
        missing = [f for f in REQUIRED_FIELDS if f not in meta.raw]
        if missing:
            problems.append(f"json lacks {', '.join(missing)}")
        elif meta.raw["split"] != split:
            problems.append(f"json says split {meta.raw['split']!r}, the manifest {split!r}")
        elif len(meta.captions) != len(meta.raw["captions"]):
            problems.append(f"{len(meta.raw['captions']) - len(meta.captions)} unusable caption(s) (blank, not strings, or not valid Unicode)")
    except BadSample as err:
        problems.append(str(err))
    try:
        open_rgb(sample["jpg"])
    except BadImage as err:
        problems.append(f"jpg {err}")
    return problems
