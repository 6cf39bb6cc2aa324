"""Reading `manifest.json`: the list of shards with their sample counts, sizes and sha256.

Loaders size their epochs from it and evaluation checks exact-once coverage against it, so a
manifest from an unfinished conversion is refused rather than silently used.

`check_shards` / `require_complete_shards` are the cheap check a job runs before it starts: every
listed shard file is there with the listed size (one `stat` per shard, no reading). `advcap verify`
is the full check (hashes, every sample decoded). The manifest's fields are described in
`advcap.data.shardwriter`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from advcap.data.location import FetchError, beside, expand_shard_urls, fetch, is_remote, is_url_folder, shard_name, size_of, split_of
from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    url: str  # a local path, or a URL (advcap.data.location)
    split: str
    samples: int | None  # None: shards without a manifest (counts come from the config, per split)
    sha256: str | None
    bytes: int | None = None  # file size; None where unknown (no manifest, or one older than sizes)


@dataclass(frozen=True)
class Manifest:
    root: str  # the source as given: a folder, a URL folder, or shard URLs/patterns
    shards: tuple[ShardInfo, ...]
    raw: dict
    split_samples: Mapping[str, int] = field(default_factory=dict)  # per-split counts when shards have none
    retries: int = 3  # times readers retry a failed shard fetch (data.fetch_retries)

    def split(self, split: str) -> tuple[ShardInfo, ...]:
        """The shards of one split, in order; an error if the split has none."""
        shards = tuple(s for s in self.shards if s.split == split)
        if not shards:
            have = sorted({s.split for s in self.shards})
            raise AdvcapError(f"{self.root}: no shards for split {split!r} (have: {', '.join(have) or 'none'})")
        return shards

    def samples(self, split: str) -> int:
        """Samples in `split`: the manifest's sum, or for shards without one the configured count."""
        shards = self.split(split)
        if all(s.samples is not None for s in shards):
            return sum(s.samples for s in shards)
        if split not in self.split_samples:
            raise AdvcapError(
                f"{self.root}: no manifest.json beside the shards, so the {split} split's size must be given: "
                f"set data.samples.{split} (the number of samples in its shards)"
            )
        return self.split_samples[split]

    def sha256(self) -> str:
        """A hash of the manifest itself, recorded as the data's provenance in run directories."""
        import hashlib

        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()


def data_manifest(data: Any) -> Manifest:
    """The manifest of a run's shards (`data` is the config's DataConfig)."""
    counts = {split: n for split, n in vars(data.samples).items() if n is not None}
    return load_manifest(data.shards, split_samples=counts, retries=data.fetch_retries)


def load_manifest(source: str | Path, split_samples: Mapping[str, int] | None = None, retries: int = 3) -> Manifest:
    """The manifest of a shard source (forms: advcap.data.location). Without a manifest beside remote
    shards, `split_samples` gives each split's size; an error if neither is there. `retries`: for the
    manifest's fetch now and the shards' later."""
    return replace(_load(str(source), split_samples, retries), retries=retries)


def _load(source: str, split_samples: Mapping[str, int] | None, retries: int) -> Manifest:
    if not is_remote(source):
        return _local_manifest(Path(source))
    if is_url_folder(source):
        folder = source.rstrip("/") + "/"
        raw = _parse(folder + MANIFEST, fetch(folder + MANIFEST, retries))
        return _from_raw(source, folder + MANIFEST, raw, lambda name: folder + name)
    urls = expand_shard_urls(source)
    where = beside(urls[0][1], MANIFEST)
    try:
        raw = _parse(where, fetch(where, retries))
    except FetchError as err:
        if not split_samples:
            raise AdvcapError(
                f"no {MANIFEST} beside the shards ({err}); put the {MANIFEST} that `advcap shards` wrote "
                f"there, or give each split's size in the config (data.samples.train, data.samples.val, …)"
            ) from None
        log.info("%s: no manifest (%s); using the configured split sizes %s", source, err.error, dict(split_samples))
        return _without_manifest(source, urls, split_samples)
    return _listed(source, where, urls, raw)


def _local_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not path.is_file():
        raise AdvcapError(f"no {MANIFEST} in {root}: convert a dataset there with `advcap shards`")
    return _from_raw(str(root), str(path), _parse(str(path), path.read_bytes()), lambda name: str(root / name))


def _parse(where: str, data: bytes) -> dict:
    try:
        raw = json.loads(data)
        complete = raw["complete"]
        if not isinstance(raw["shards"], list):
            raise TypeError("shards is not a list")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise AdvcapError(f"{where} is malformed ({err!r}); re-run `advcap shards`") from None
    if not complete:
        raise AdvcapError(f"{where}: the conversion did not finish; re-run the same `advcap shards` command to resume it")
    return raw


def _entries(where: str, raw: dict) -> list[ShardInfo]:
    try:
        return [
            ShardInfo(e["name"], e["name"], e["split"], int(e["samples"]), e["sha256"], _size(e.get("bytes")))
            for e in raw["shards"]
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise AdvcapError(f"{where} is malformed ({err!r}); re-run `advcap shards`") from None


def _size(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"bytes must be a non-negative integer, got {value!r}")
    return value


def _from_raw(root: str, where: str, raw: dict, url_of: Callable[[str], str]) -> Manifest:
    shards = tuple(replace(s, url=url_of(s.name)) for s in _entries(where, raw))
    return Manifest(root, shards, raw)


def _listed(source: str, where: str, urls: list[tuple[str | None, str]], raw: dict) -> Manifest:
    """The shards named by URL, each described by its entry in the manifest found beside them."""
    entries = {s.name: s for s in _entries(where, raw)}
    shards = []
    for given_split, url in urls:
        entry = entries.get(shard_name(url))
        if entry is None:
            raise AdvcapError(f"{url}: {shard_name(url)} is not listed in the {MANIFEST} beside it")
        if given_split is not None and given_split != entry.split:
            raise AdvcapError(f"{url}: given as {given_split}, but the manifest lists it in {entry.split}")
        shards.append(replace(entry, url=url))
    return Manifest(source, tuple(shards), {"source": source, "manifest": raw})


def _without_manifest(source: str, urls: list[tuple[str | None, str]], split_samples: Mapping[str, int]) -> Manifest:
    shards = []
    for given_split, url in urls:
        split = split_of(url, given_split)
        if split is None:
            raise AdvcapError(
                f"{url}: cannot tell this shard's split without a manifest: name the split in front of its "
                f"pattern (e.g. train=…), or name the shards {{split}}-NNNNNN.tar"
            )
        shards.append(ShardInfo(shard_name(url), url, split, None, None))
    raw = {"source": source, "split_samples": dict(split_samples), "shards": [s.url for s in shards]}
    return Manifest(source, tuple(shards), raw, dict(split_samples))


def check_shards(manifest: Manifest, splits: Iterable[str] | None = None) -> list[str]:
    """Problems with the shard files of `manifest` (all splits, or only `splits`), one per shard,
    each naming the shard: missing, not a file, or a size other than the manifest's. Reads no shard
    content (a `stat`, or an HTTP HEAD); `pipe:` shards cannot be asked and pass; entries without a
    size (no manifest, or an older one) are only checked for presence."""
    wanted = None if splits is None else set(splits)
    remote = is_remote(manifest.root)
    problems = []
    for shard in manifest.shards:
        if wanted is not None and shard.split not in wanted:
            continue
        label = shard.url if remote else shard.name
        try:
            size = size_of(shard.url)
        except FetchError as err:
            problems.append(f"{label}: {err.error}")
            continue
        if size is not None and shard.bytes is not None and size != shard.bytes:
            problems.append(
                f"{label}: {size} bytes, the manifest says {shard.bytes} "
                f"({'truncated' if size < shard.bytes else 'changed'})"
            )
    return problems


def require_complete_shards(manifest: Manifest, splits: Iterable[str] | None = None, shown: int = 10) -> None:
    """Raise one AdvcapError listing the problems `check_shards` finds (at most `shown` of them by name)."""
    splits = None if splits is None else tuple(splits)
    problems = check_shards(manifest, splits)
    if not problems:
        return
    checked = sum(1 for s in manifest.shards if splits is None or s.split in splits)
    listed = "; ".join(problems[:shown]) + (f"; and {len(problems) - shown} more" if len(problems) > shown else "")
    raise AdvcapError(
        f"{manifest.root}: {len(problems)} of {checked} shards missing or truncated: {listed}. "
        f"Restore them, or re-run the `advcap shards` command that made them (it rewrites what is missing); "
        f"`advcap verify {manifest.root}` checks every shard in full"
    )
