"""Readers for the three annotation formats, as their public releases ship them.

Each reader turns an annotation file into `ImageRecord`s: one per image, with all of its captions.
- karpathy: `dataset_coco.json` / `dataset_flickr8k.json` / the demo set's `captions.json`
  (image at IMAGES/filepath/filename when `filepath` is present, else IMAGES/filename; restval → train)
- coco: raw caption annotations (`captions_train2014.json`, …); the file has no split, `--split` names it
- flickr8k: `Flickr8k.token.txt` with `Flickr_8k.{train,dev,test}Images.txt` beside it (dev → val)
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FORMATS = ("karpathy", "coco", "flickr8k")


@dataclass(frozen=True)
class ImageRecord:
    """One source image and all of its reference captions."""

    image_id: str  # COCO id / cocoid, else the file name stem; always a string
    path: Path  # where the image file should be
    filename: str  # the source file name, kept in the shard's json
    split: str  # train | val | test
    captions: tuple[str, ...] = field(default_factory=tuple)


def read_records(fmt: str, annotations: str | Path, images: str | Path, split: str | None = None) -> list[ImageRecord]:
    """Read an annotation file of format `fmt` into records sorted by (split, image_id)."""
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise AdvcapError(f"annotation file not found: {annotations}")
    if not images.is_dir():
        raise AdvcapError(f"image directory not found: {images}")
    if fmt == "karpathy":
        records = _read_karpathy(annotations, images)
    elif fmt == "coco":
        records = _read_coco(annotations, images, split)
    elif fmt == "flickr8k":
        records = _read_flickr8k(annotations, images)
    else:
        raise AdvcapError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not records:
        raise AdvcapError(f"{annotations}: no images with captions found")
    return sorted(records, key=lambda r: (r.split, r.image_id))


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdvcapError(f"{path}: not a JSON file ({err})") from None


def _clean(captions) -> tuple[str, ...]:
    """Captions as written, trimmed of surrounding white space; empty ones dropped."""
    return tuple(c.strip() for c in captions if isinstance(c, str) and c.strip())


def _read_karpathy(path: Path, images: Path) -> list[ImageRecord]:
    data = _load_json(path)
    expected = "a Karpathy split file: {'images': [{'filename', 'split', 'sentences': [{'raw'}]}]}"
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AdvcapError(f"{path}: expected {expected}")
    records = []
    for index, entry in enumerate(data["images"]):
        try:
            filename = entry["filename"]
            split = {"restval": "train"}.get(entry["split"], entry["split"])
            captions = _clean(s["raw"] for s in entry["sentences"])
        except (KeyError, TypeError):
            raise AdvcapError(f"{path}: images[{index}] is malformed; expected {expected}") from None
        if split not in SPLITS:
            raise AdvcapError(f"{path}: images[{index}] has split {split!r}; expected train, val, test or restval")
        image_id = str(entry["cocoid"]) if "cocoid" in entry else Path(filename).stem
        folder = images / entry["filepath"] if entry.get("filepath") else images
        records.append(ImageRecord(image_id, folder / filename, filename, split, captions))
    return records


def _read_coco(path: Path, images: Path, split: str | None) -> list[ImageRecord]:
    if split not in SPLITS:
        raise AdvcapError(
            f"raw COCO caption files carry no split: pass --split train, val or test (got {split!r})"
        )
    data = _load_json(path)
    expected = "COCO captions: {'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'caption'}]}"
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise AdvcapError(f"{path}: expected {expected}")
    captions: dict[int, list[str]] = defaultdict(list)
    # Sorting by annotation id keeps each image's captions in release order whatever the file order.
    for index, ann in enumerate(sorted(data["annotations"], key=lambda a: a.get("id", 0) if isinstance(a, dict) else 0)):
        try:
            captions[ann["image_id"]].append(ann["caption"])
        except (KeyError, TypeError):
            raise AdvcapError(f"{path}: annotations[{index}] is malformed; expected {expected}") from None
    records = []
    for index, image in enumerate(data["images"]):
        try:
            image_id, filename = image["id"], image["file_name"]
        except (KeyError, TypeError):
            raise AdvcapError(f"{path}: images[{index}] is malformed; expected {expected}") from None
        caps = _clean(captions.get(image_id, ()))
        if caps:
            records.append(ImageRecord(str(image_id), images / filename, filename, split, caps))
    return records


FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _read_flickr8k(path: Path, images: Path) -> list[ImageRecord]:
    split_of: dict[str, str] = {}
    for split, name in FLICKR8K_SPLIT_FILES.items():
        split_file = path.parent / name
        if not split_file.is_file():
            raise AdvcapError(
                f"Flickr8k split list {split_file} not found: expected "
                f"{', '.join(FLICKR8K_SPLIT_FILES.values())} beside {path.name}"
            )
        for line in split_file.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                split_of[line.strip()] = split
    captions: dict[str, list[str]] = defaultdict(list)
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab or "#" not in name:
            raise AdvcapError(
                f"{path}:{number}: expected 'IMAGE.jpg#N<TAB>caption' (Flickr8k.token.txt), got {line[:60]!r}"
            )
        captions[name.rsplit("#", 1)[0]].append(caption)
    unlisted = sorted(set(captions) - set(split_of))
    if unlisted:
        log.warning("%d captioned images are in no Flickr8k split list and are left out (e.g. %s)", len(unlisted), unlisted[0])
    return [
        ImageRecord(Path(filename).stem, images / filename, filename, split_of[filename], _clean(caps))
        for filename, caps in captions.items()
        if filename in split_of and _clean(caps)
    ]
