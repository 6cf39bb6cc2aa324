"""Convert annotation files + images into WebDataset tar shards with a manifest.

Layout: OUT/{split}-{000000..}.tar and OUT/manifest.json. Each sample is `<key>.jpg` + `<key>.json`
(image_id as a string, all captions, split, source filename, original width/height).

Why the shards are byte-identical for any number of workers and across re-runs: records are sorted,
shard i of a split always holds records [i·size, (i+1)·size), every tar member has fixed metadata
(mtime 0, fixed owner and mode), JPEG re-encoding uses a fixed quality, and each shard is written
whole by one process. A shard is written under a temporary name and renamed when complete;
the manifest is rewritten after every finished shard, so an interrupted run resumes by writing
only the shards the manifest does not list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from advcap.data.images import BadImage, shard_jpeg
from advcap.data.manifest import MANIFEST
from advcap.data.sources import ImageRecord, read_records
from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its file name and the records that go into it."""

    name: str
    split: str
    first_index: int  # index of the first record within its split: sample keys are stable
    records: tuple[ImageRecord, ...]
    resize: int
    strict: bool


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plan_shards(records: list[ImageRecord], shard_size: int, resize: int, strict: bool) -> list[ShardTask]:
    """Cut the sorted records of each split into consecutive shards of `shard_size`."""
    tasks = []
    for split in sorted({r.split for r in records}):
        in_split = [r for r in records if r.split == split]
        for number, start in enumerate(range(0, len(in_split), shard_size)):
            chunk = tuple(in_split[start : start + shard_size])
            tasks.append(ShardTask(shard_name(split, number), split, start, chunk, resize, strict))
    return tasks


def write_shard(task: ShardTask, out: Path) -> dict:
    """Write one shard atomically; return its manifest entry (skipped images listed by name)."""
    final, tmp = out / task.name, out / f".{task.name}.tmp"
    skipped = []
    samples = 0
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False, mtime=0.0, user="advcap", group="advcap", mode=0o444)
        for offset, record in enumerate(task.records):
            try:
                jpeg, width, height = shard_jpeg(record.path, task.resize)
            except BadImage as err:
                if task.strict:
                    raise AdvcapError(f"{record.path}: {err} (--strict)") from None
                skipped.append({"filename": record.filename, "path": str(record.path), "reason": str(err)})
                continue
            meta = {
                "image_id": record.image_id,
                "captions": list(record.captions),
                "split": record.split,
                "filename": record.filename,
                "width": width,
                "height": height,
            }
            key = f"{task.split}_{task.first_index + offset:08d}"
            writer.write({"__key__": key, "jpg": jpeg, "json": json.dumps(meta, sort_keys=True).encode()})
            samples += 1
        writer.close()
    os.replace(tmp, final)
    return {"name": task.name, "split": task.split, "samples": samples, "sha256": sha256_file(final), "skipped": skipped}


def _write_shard_star(args: tuple[ShardTask, Path]) -> dict:
    return write_shard(*args)


def convert(
    fmt: str,
    annotations: str | Path,
    images: str | Path,
    out: str | Path,
    split: str | None = None,
    resize: int = 256,
    shard_size: int = 1000,
    workers: int = 1,
    strict: bool = False,
) -> dict:
    """Convert a dataset to shards in `out`; returns the manifest. Resumes an interrupted run."""
    if shard_size < 1:
        raise AdvcapError(f"--shard-size must be ≥ 1, got {shard_size}")
    if resize < 0:
        raise AdvcapError(f"--resize must be ≥ 0 (0 keeps the original bytes), got {resize}")
    if workers < 1:
        raise AdvcapError(f"--workers must be ≥ 1, got {workers}")
    out = Path(out)
    records = read_records(fmt, annotations, images, split)
    missing = [r for r in records if not r.path.is_file()]
    if missing and strict:
        raise AdvcapError(f"{len(missing)} image(s) missing, e.g. {missing[0].path} (--strict)")
    source = {
        "format": fmt,
        "annotations": Path(annotations).name,
        "annotations_sha256": sha256_file(Path(annotations)),
        "resize": resize,
        "shard_size": shard_size,
        "split": split,
    }
    out.mkdir(parents=True, exist_ok=True)
    done = _resumable_entries(out, source)
    tasks = plan_shards(records, shard_size, resize, strict)
    todo = [t for t in tasks if t.name not in done]
    if done:
        log.info("resuming: %d of %d shards already written in %s", len(tasks) - len(todo), len(tasks), out)
    for leftover in out.glob(".*.tar.tmp"):
        leftover.unlink()

    entries = dict(done)
    with tqdm(total=sum(len(t.records) for t in todo), unit="img", desc="shards", disable=None) as bar:
        for entry in _run(todo, out, workers):
            entries[entry["name"]] = entry
            for skip in entry["skipped"]:
                log.warning("skipped %s: %s", skip["path"], skip["reason"])
            bar.update(entry["samples"] + len(entry["skipped"]))
            _write_manifest(out, source, tasks, entries, complete=False)
    manifest = _write_manifest(out, source, tasks, entries, complete=True)
    n_skipped = sum(len(e["skipped"]) for e in entries.values())
    log.info(
        "wrote %d samples in %d shards to %s (%d images skipped)",
        sum(e["samples"] for e in entries.values()), len(entries), out, n_skipped,
    )
    return manifest


def _run(tasks: list[ShardTask], out: Path, workers: int):
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            yield write_shard(task, out)
        return
    # fork: workers start in milliseconds instead of re-importing torch; they only use PIL and tarfile.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap_unordered(_write_shard_star, [(t, out) for t in tasks])


def _resumable_entries(out: Path, source: dict) -> dict[str, dict]:
    """Entries of a previous run into `out` whose shard files are intact; error if settings differ."""
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text())
        previous_source, previous_shards = previous["source"], previous["shards"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise AdvcapError(f"{path} is not an advcap manifest; remove it or choose another --out") from None
    if previous_source != source:
        changed = [k for k in source if previous_source.get(k) != source[k]]
        raise AdvcapError(
            f"{out} holds shards made with different settings ({', '.join(changed)}); "
            "choose another --out or delete it"
        )
    entries = {}
    for entry in previous_shards:
        shard = out / entry["name"]
        if shard.is_file() and sha256_file(shard) == entry["sha256"]:
            entries[entry["name"]] = entry
    return entries


def _write_manifest(out: Path, source: dict, tasks: list[ShardTask], entries: dict, complete: bool) -> dict:
    shards = [entries[t.name] for t in tasks if t.name in entries]
    splits: dict[str, dict] = {}
    for entry in shards:
        stats = splits.setdefault(entry["split"], {"shards": 0, "samples": 0, "skipped": 0})
        stats["shards"] += 1
        stats["samples"] += entry["samples"]
        stats["skipped"] += len(entry["skipped"])
    manifest = {
        "version": MANIFEST_VERSION,
        "complete": complete,
        "source": source,
        "splits": splits,
        "shards": shards,
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest
