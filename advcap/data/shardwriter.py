"""Convert annotation files + images into WebDataset tar shards with a manifest.

Layout: OUT/{split}-{000000..}.tar and OUT/manifest.json. Each sample is `<key>.jpg` + `<key>.json`
(image_id as a string, all captions, split, source filename, original width/height).

manifest.json (`advcap.data.manifest` reads it):
    version, complete   false until every shard is written (loaders refuse an unfinished set)
    source              the settings that made the shards: format, annotations (name and sha256),
                        resize, shard_size, split, max_pixels. A re-run into the same folder resumes
                        only with equal settings; a manifest from before `max_pixels` was recorded
                        resumes as if made with the default.
    splits              per split: shards, samples, and what was left out —
                          skipped            images missing, undecodable or above max_pixels
                                             (named with their reason in the shard entries)
                          no_caption         images of the annotation file with no usable caption
                          rejected_captions  captions that are not valid Unicode text
    totals              samples, skipped, no_caption, rejected_captions summed over the splits
    shards              in order, one entry per shard: name, split, samples, bytes (file size),
                        sha256, skipped ([{filename, path, reason}])

Why the shards are byte-identical for any number of workers and across re-runs: records are sorted,
shard i of a split always holds records [i·size, (i+1)·size), every tar member has fixed metadata
(mtime 0, fixed owner and mode), JPEG re-encoding uses a fixed quality, and each shard is written
whole by one process.

Durability: a shard is written under a temporary name, fsynced, renamed into place and its folder
fsynced (`advcap.atomic`); only then does the manifest, rewritten atomically after every finished
shard, list it. A run killed at any point therefore leaves listed shards complete, and re-running
the same command resumes by writing only the shards the manifest does not list (temporary files of
the killed run are removed first). Failpoints for the tests (`advcap.faults`): "shards.mid_shard"
after each sample written into an unfinished shard, "shards.before_manifest" after a shard is in
place and before the manifest lists it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from advcap import faults
from advcap.atomic import atomic_path, remove_stale_temporaries, write_text
from advcap.data.images import DEFAULT_MAX_PIXELS, BadImage, shard_jpeg
from advcap.data.manifest import MANIFEST
from advcap.data.sources import ImageRecord, Source, read_source
from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
# Settings that older manifests do not record, with the value a resumed run assumes for them.
UNRECORDED_SETTING_DEFAULTS = {"max_pixels": DEFAULT_MAX_PIXELS}
LEFT_OUT = ("skipped", "no_caption", "rejected_captions")


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its file name and the records that go into it."""

    name: str
    split: str
    first_index: int  # index of the first record within its split: sample keys are stable
    records: tuple[ImageRecord, ...]
    resize: int
    strict: bool
    max_pixels: int = DEFAULT_MAX_PIXELS


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plan_shards(
    records: list[ImageRecord], shard_size: int, resize: int, strict: bool, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[ShardTask]:
    """Cut the sorted records of each split into consecutive shards of `shard_size`."""
    tasks = []
    for split in sorted({r.split for r in records}):
        in_split = [r for r in records if r.split == split]
        for number, start in enumerate(range(0, len(in_split), shard_size)):
            chunk = tuple(in_split[start : start + shard_size])
            tasks.append(ShardTask(shard_name(split, number), split, start, chunk, resize, strict, max_pixels))
    return tasks


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    # mtime 0.0, a float, exactly as webdataset's TarWriter (used before) sets it: shards keep the bytes
    # earlier versions wrote, so a conversion resumed across versions is byte-identical too.
    info.size, info.mtime, info.mode = len(data), 0.0, 0o444
    info.uname = info.gname = "advcap"
    tar.addfile(info, io.BytesIO(data))


def write_shard(task: ShardTask, out: Path) -> dict:
    """Write one shard atomically and durably; return its manifest entry (skipped images listed by name)."""
    final = out / task.name
    skipped = []
    samples = 0
    with atomic_path(final) as tmp, open(tmp, "wb") as stream:
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            for offset, record in enumerate(task.records):
                try:
                    jpeg, width, height = shard_jpeg(record.path, task.resize, task.max_pixels)
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
                _add_member(tar, f"{key}.jpg", jpeg)
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                samples += 1
                faults.point("shards.mid_shard")
    return {
        "name": task.name,
        "split": task.split,
        "samples": samples,
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
        "skipped": skipped,
    }


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
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict:
    """Convert a dataset to shards in `out`; returns the manifest. Resumes an interrupted run.

    `max_pixels`: images whose header claims more pixels (width × height) are skipped without being
    decoded (an error under `strict`); 0 leaves only Pillow's own decompression-bomb limit.
    """
    if shard_size < 1:
        raise AdvcapError(f"--shard-size must be ≥ 1, got {shard_size}")
    if resize < 0:
        raise AdvcapError(f"--resize must be ≥ 0 (0 keeps the original bytes), got {resize}")
    if workers < 1:
        raise AdvcapError(f"--workers must be ≥ 1, got {workers}")
    if max_pixels < 0:
        raise AdvcapError(f"--max-pixels must be ≥ 0 (0: only Pillow's own limit), got {max_pixels}")
    out = Path(out)
    source_data = read_source(fmt, annotations, images, split)
    records = source_data.records
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
        "max_pixels": max_pixels,
    }
    out.mkdir(parents=True, exist_ok=True)
    done = _resumable_entries(out, source)
    tasks = plan_shards(records, shard_size, resize, strict, max_pixels)
    todo = [t for t in tasks if t.name not in done]
    if done:
        log.info("resuming: %d of %d shards already written in %s", len(tasks) - len(todo), len(tasks), out)
    for leftover in remove_stale_temporaries(out):
        log.info("removed %s, left by an interrupted run", leftover.name)

    entries = dict(done)
    with tqdm(total=sum(len(t.records) for t in todo), unit="img", desc="shards", disable=None) as bar:
        for entry in _run(todo, out, workers):
            faults.point("shards.before_manifest")
            entries[entry["name"]] = entry
            for skip in entry["skipped"]:
                log.warning("skipped %s: %s", skip["path"], skip["reason"])
            bar.update(entry["samples"] + len(entry["skipped"]))
            _write_manifest(out, source, tasks, entries, source_data, complete=False)
    manifest = _write_manifest(out, source, tasks, entries, source_data, complete=True)
    totals = manifest["totals"]
    log.info(
        "wrote %d samples in %d shards to %s (left out: %d images skipped, %d without a usable caption; "
        "%d captions rejected)",
        totals["samples"], len(entries), out, totals["skipped"], totals["no_caption"], totals["rejected_captions"],
    )
    return manifest


def _run(tasks: list[ShardTask], out: Path, workers: int):
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            yield write_shard(task, out)
        return
    # fork: workers start in milliseconds instead of re-importing everything; they only use PIL and
    # tarfile. An executor, not multiprocessing.Pool: a worker killed by the OS (out of memory on
    # some image) breaks the executor and ends the run with an error instead of hanging it.
    executor = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("fork"))
    try:
        for future in as_completed([executor.submit(write_shard, task, out) for task in tasks]):
            try:
                entry = future.result()
            except BrokenProcessPool:
                raise AdvcapError(
                    f"a shard-writing worker process died (killed by a signal; out of memory?) while converting "
                    f"into {out}: run the same command again to resume (shards the manifest lists are kept)"
                ) from None
            yield entry
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _resumable_entries(out: Path, source: dict) -> dict[str, dict]:
    """Entries of a previous run into `out` whose shard files are intact; error if settings differ."""
    path = out / MANIFEST
    if not path.exists():
        return {}
    not_ours = f"{path} is not an advcap manifest; remove it or choose another --out"
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        previous_source, previous_shards = previous["source"], previous["shards"]
        settings = {**UNRECORDED_SETTING_DEFAULTS, **previous_source}
        names = [(e, e["name"], e["sha256"]) for e in previous_shards]
    except (OSError, ValueError, KeyError, TypeError):
        raise AdvcapError(not_ours) from None
    if settings != source:
        changed = sorted(k for k in set(settings) | set(source) if settings.get(k) != source.get(k))
        raise AdvcapError(
            f"{out} holds shards made with different settings ({', '.join(changed)}); "
            "choose another --out or delete it"
        )
    entries = {}
    for entry, name, sha in names:
        shard = out / str(name)
        if not shard.is_file():
            continue
        size = shard.stat().st_size
        if entry.get("bytes", size) == size and sha256_file(shard) == sha:
            entries[name] = {**entry, "bytes": size}  # older manifests did not record the size
    return entries


def _write_manifest(
    out: Path, source: dict, tasks: list[ShardTask], entries: dict, source_data: Source, complete: bool
) -> dict:
    shards = [entries[t.name] for t in tasks if t.name in entries]
    names = sorted({t.split for t in tasks} | set(source_data.no_caption) | set(source_data.rejected_captions))
    splits = {
        split: {
            "shards": 0,
            "samples": 0,
            "skipped": 0,
            "no_caption": source_data.no_caption.get(split, 0),
            "rejected_captions": source_data.rejected_captions.get(split, 0),
        }
        for split in names
    }
    for entry in shards:
        stats = splits[entry["split"]]
        stats["shards"] += 1
        stats["samples"] += entry["samples"]
        stats["skipped"] += len(entry["skipped"])
    manifest = {
        "version": MANIFEST_VERSION,
        "complete": complete,
        "source": source,
        "splits": splits,
        "totals": {key: sum(s[key] for s in splits.values()) for key in ("samples",) + LEFT_OUT},
        "shards": shards,
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
