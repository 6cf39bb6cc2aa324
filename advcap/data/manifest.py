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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from advcap.errors import AdvcapError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    path: Path
    split: str
    samples: int
    sha256: str
    bytes: int | None = None  # file size; None in manifests written before sizes were recorded


@dataclass(frozen=True)
class Manifest:
    root: Path
    shards: tuple[ShardInfo, ...]
    raw: dict

    def split(self, split: str) -> tuple[ShardInfo, ...]:
        """The shards of one split, in order; an error if the split has none."""
        shards = tuple(s for s in self.shards if s.split == split)
        if not shards:
            have = sorted({s.split for s in self.shards})
            raise AdvcapError(f"{self.root}: no shards for split {split!r} (have: {', '.join(have) or 'none'})")
        return shards

    def samples(self, split: str) -> int:
        return sum(s.samples for s in self.split(split))

    def sha256(self) -> str:
        """A hash of the manifest itself, recorded as the data's provenance in run directories."""
        import hashlib

        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()


def load_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise AdvcapError(f"no {MANIFEST} in {root}: convert a dataset there with `advcap shards`")
    try:
        raw = json.loads(path.read_text())
        entries = raw["shards"]
        complete = raw["complete"]
        shards = tuple(
            ShardInfo(e["name"], root / e["name"], e["split"], int(e["samples"]), e["sha256"], _size(e.get("bytes")))
            for e in entries
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise AdvcapError(f"{path} is malformed ({err!r}); re-run `advcap shards`") from None
    if not complete:
        raise AdvcapError(f"{path}: the conversion did not finish; re-run the same `advcap shards` command to resume it")
    return Manifest(root, shards, raw)


def _size(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"bytes must be a non-negative integer, got {value!r}")
    return value


def check_shards(manifest: Manifest, splits: Iterable[str] | None = None) -> list[str]:
    """Problems with the shard files of `manifest` (all splits, or only `splits`), one per shard,
    each naming the shard: missing, not a file, or a size other than the manifest's. Reads no shard
    content; entries without a size (older manifests) are only checked for presence."""
    wanted = None if splits is None else set(splits)
    problems = []
    for shard in manifest.shards:
        if wanted is not None and shard.split not in wanted:
            continue
        try:
            stat = shard.path.stat()
        except FileNotFoundError:
            problems.append(f"{shard.name}: missing")
            continue
        except OSError as err:
            problems.append(f"{shard.name}: cannot be read ({err.strerror or err})")
            continue
        if not shard.path.is_file():
            problems.append(f"{shard.name}: not a file")
        elif shard.bytes is not None and stat.st_size != shard.bytes:
            problems.append(
                f"{shard.name}: {stat.st_size} bytes, the manifest says {shard.bytes} "
                f"({'truncated' if stat.st_size < shard.bytes else 'changed'})"
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
