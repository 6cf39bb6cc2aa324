"""Reading `manifest.json`: the list of shards with their sample counts and sha256.

Loaders size their epochs from it and evaluation checks exact-once coverage against it, so a
manifest from an unfinished conversion is refused rather than silently used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from advcap.errors import AdvcapError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    path: Path
    split: str
    samples: int
    sha256: str


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
            ShardInfo(e["name"], root / e["name"], e["split"], int(e["samples"]), e["sha256"]) for e in entries
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise AdvcapError(f"{path} is malformed ({err!r}); re-run `advcap shards`") from None
    if not complete:
        raise AdvcapError(f"{path}: the conversion did not finish; re-run the same `advcap shards` command to resume it")
    return Manifest(root, shards, raw)
