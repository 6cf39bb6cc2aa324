"""Readers for the three annotation formats, as their public releases ship them.

Each reader turns an annotation file into `ImageRecord`s: one per image, with all of its captions.
- karpathy: `dataset_coco.json` / `dataset_flickr8k.json` / the demo set's `captions.json`
  (image at IMAGES/filepath/filename when `filepath` is present, else IMAGES/filename; restval → train)
- coco: raw caption annotations (`captions_train2014.json`, …); the file has no split, `--split` names it
- flickr8k: `Flickr8k.token.txt` with `Flickr_8k.{train,dev,test}Images.txt` beside it (dev → val)

Bad input is stopped here, at the door:
- A malformed entry is an AdvcapError naming the file and the entry (`images[3]`,
  `annotations[17]`, `Flickr8k.token.txt:12`): a file name that is not a non-empty string,
  `sentences` that is not a list of {'raw': str}, an id that is not an integer or a string, ids of
  mixed types within one file (COCO), an image id repeated within a split, a Flickr8k image named in
  two split lists. A file that is not UTF-8 is an error naming the line and byte offset.
- Captions follow `advcap.data.samples`: a caption that is not valid Unicode text is rejected
  (counted per split and logged naming file and entry), the others are normalised, blank ones dropped.
- An image left with no caption is not a record: it is counted per split as "no caption" (this
  includes a Flickr8k image that is in a split list but has no caption line, and a COCO image no
  annotation refers to). `advcap.data.shardwriter` records both counts in manifest.json.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from advcap.data.samples import is_text, normalise_caption
from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FORMATS = ("karpathy", "coco", "flickr8k")
LOGGED_REJECTIONS = 10  # rejected captions logged one by one; the rest only counted


@dataclass(frozen=True)
class ImageRecord:
    """One source image and all of its reference captions."""

    image_id: str  # COCO id / cocoid, else the file name stem; always a string
    path: Path  # where the image file should be
    filename: str  # the source file name, kept in the shard's json
    split: str  # train | val | test
    captions: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Source:
    """What an annotation file yields: the usable records and what was left out, per split."""

    records: list[ImageRecord]  # sorted by (split, image_id); every record has ≥ 1 caption
    no_caption: dict[str, int]  # split → images left out because no usable caption remained
    rejected_captions: dict[str, int]  # split → captions rejected as not valid Unicode text


def read_source(fmt: str, annotations: str | Path, images: str | Path, split: str | None = None) -> Source:
    """Read an annotation file of format `fmt`; records sorted by (split, image_id)."""
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise AdvcapError(f"annotation file not found: {annotations}")
    if not images.is_dir():
        raise AdvcapError(f"image directory not found: {images}")
    tally = _Tally(annotations)
    if fmt == "karpathy":
        _read_karpathy(annotations, images, tally)
    elif fmt == "coco":
        _read_coco(annotations, images, split, tally)
    elif fmt == "flickr8k":
        _read_flickr8k(annotations, images, tally)
    else:
        raise AdvcapError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return tally.finish()


class _Tally:
    """Collects records, checks image ids are unique per split, counts what is left out."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[ImageRecord] = []
        self.first_seen: dict[tuple[str, str], str] = {}  # (split, image_id) → where
        self.no_caption: Counter[str] = Counter()
        self.no_caption_example = ""
        self.rejected: Counter[str] = Counter()

    def add(self, where: str, image_id: str, path: Path, filename: str, split: str, texts: list[tuple[str, str]]) -> None:
        """One image at `where` with its raw captions as (where, text) pairs."""
        key = (split, image_id)
        if key in self.first_seen:
            raise AdvcapError(f"{where}: image id {image_id!r} repeats {self.first_seen[key]} within split {split!r}")
        self.first_seen[key] = where
        captions = []
        for caption_where, text in texts:
            clean = normalise_caption(text)
            if clean is None:
                self.rejected[split] += 1
                if sum(self.rejected.values()) <= LOGGED_REJECTIONS:
                    log.warning("%s: caption rejected: not valid Unicode text (lone surrogate) %r", caption_where, text[:60])
            elif clean:
                captions.append(clean)
        if captions:
            self.records.append(ImageRecord(image_id, path, filename, split, tuple(captions)))
        else:
            self.no_caption[split] += 1
            self.no_caption_example = self.no_caption_example or f"{where} ({filename})"

    def finish(self) -> Source:
        n_rejected, n_empty = sum(self.rejected.values()), sum(self.no_caption.values())
        if n_rejected:
            log.warning("%s: %d caption(s) rejected as not valid Unicode text", self.path, n_rejected)
        if n_empty:
            log.warning(
                "%s: %d image(s) have no usable caption and are left out (%s), e.g. %s",
                self.path, n_empty, _per_split(self.no_caption), self.no_caption_example,
            )
        if not self.records:
            raise AdvcapError(
                f"{self.path}: no images with captions found"
                + (f" ({n_empty} image(s) without a usable caption)" if n_empty else "")
            )
        return Source(
            sorted(self.records, key=lambda r: (r.split, r.image_id)), dict(self.no_caption), dict(self.rejected)
        )


def _per_split(counts: Counter[str]) -> str:
    return ", ".join(f"{split} {n}" for split, n in sorted(counts.items()))


def _read_text(path: Path) -> str:
    """A UTF-8 text file (a leading byte-order mark is allowed); an error naming line and byte otherwise."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AdvcapError(f"cannot read {path}: {err.strerror or err}") from None
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise AdvcapError(
            f"{path}: not UTF-8 text: byte 0x{data[offset]:02x} at line {line} (byte offset {offset}) is "
            f"{err.reason}; convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _load_json(path: Path) -> object:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AdvcapError(f"{path}: not a JSON file ({err})") from None
    except RecursionError:
        raise AdvcapError(f"{path}: not a JSON file we can read (nested too deeply)") from None


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'…' if len(text) > 40 else ''}"


def _filename(where: str, value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or not is_text(value) or "\x00" in value:
        shown = "missing or null" if value is None else _describe(value)
        raise AdvcapError(f"{where}: {key} is {shown}; expected a non-empty file name")
    return value


def _id(where: str, value: object) -> int | str:
    """An image or annotation id: an integer or a non-empty string of valid text (not a bool)."""
    if (isinstance(value, int) and not isinstance(value, bool)) or (is_text(value) and value.strip()):
        return value
    shown = "missing or null" if value is None else _describe(value)
    raise AdvcapError(f"{where} is {shown}; expected an integer or a non-empty string")


class _SameType:
    """Ids of one kind must all be integers or all strings: mixed types neither sort nor match."""

    def __init__(self, what: str):
        self.what = what
        self.first: tuple[type, str] | None = None

    def check(self, where: str, value: int | str) -> None:
        if self.first is None:
            self.first = (type(value), where)
        elif type(value) is not self.first[0]:
            kind, first_where = self.first
            raise AdvcapError(
                f"{where} is {_describe(value)} but {first_where} is {'an int' if kind is int else 'a str'}: "
                f"{self.what} must all be integers or all strings"
            )


def _read_karpathy(path: Path, images: Path, tally: _Tally) -> None:
    data = _load_json(path)
    expected = "a Karpathy split file: {'images': [{'filename', 'split', 'sentences': [{'raw'}]}]}"
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AdvcapError(f"{path}: expected {expected}")
    for index, entry in enumerate(data["images"]):
        where = f"{path}: images[{index}]"
        if not isinstance(entry, dict):
            raise AdvcapError(f"{where} is {_describe(entry)}; expected an object in {expected}")
        filename = _filename(where, entry.get("filename"), "filename")
        split = entry.get("split")
        if not isinstance(split, str) or split not in SPLITS + ("restval",):
            raise AdvcapError(f"{where} has split {split!r}; expected train, val, test or restval")
        split = {"restval": "train"}.get(split, split)
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise AdvcapError(f"{where}: sentences is {_describe(sentences)}; expected a list of {{'raw': caption}}")
        texts = []
        for number, sentence in enumerate(sentences):
            if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                raise AdvcapError(
                    f"{where}.sentences[{number}] is {_describe(sentence)}; expected {{'raw': caption string}}"
                )
            texts.append((f"{where}.sentences[{number}]", sentence["raw"]))
        image_id = str(_id(f"{where}.cocoid", entry["cocoid"])) if "cocoid" in entry else Path(filename).stem
        folder = images
        if entry.get("filepath"):
            folder = images / _filename(where, entry["filepath"], "filepath")
        tally.add(where, image_id, folder / filename, filename, split, texts)


def _read_coco(path: Path, images: Path, split: str | None, tally: _Tally) -> None:
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
    image_ids, annotation_ids = _SameType("image ids"), _SameType("annotation ids")
    files: dict[int | str, tuple[str, str]] = {}  # image id → (where, file name)
    for index, image in enumerate(data["images"]):
        where = f"{path}: images[{index}]"
        if not isinstance(image, dict):
            raise AdvcapError(f"{where} is {_describe(image)}; expected an object in {expected}")
        image_id = _id(f"{where}.id", image.get("id"))
        image_ids.check(f"{where}.id", image_id)
        filename = _filename(where, image.get("file_name"), "file_name")
        if image_id in files:
            raise AdvcapError(f"{where}: id {image_id!r} repeats {files[image_id][0]}")
        files[image_id] = (where, filename)

    annotations = []  # (sort key, where, image id, caption)
    seen_ids: dict[int | str, str] = {}
    for index, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        if not isinstance(ann, dict):
            raise AdvcapError(f"{where} is {_describe(ann)}; expected an object in {expected}")
        image_id = _id(f"{where}.image_id", ann.get("image_id"))
        image_ids.check(f"{where}.image_id", image_id)
        if not isinstance(ann.get("caption"), str):
            raise AdvcapError(f"{where}: caption is {_describe(ann.get('caption'))}; expected a string")
        ann_id = ann.get("id")
        if ann_id is not None:
            ann_id = _id(f"{where}.id", ann_id)
            annotation_ids.check(f"{where}.id", ann_id)
            if ann_id in seen_ids:
                raise AdvcapError(f"{where}: id {ann_id!r} repeats {seen_ids[ann_id]}")
            seen_ids[ann_id] = where
        elif seen_ids:
            raise AdvcapError(f"{where} has no id but earlier annotations do: give every annotation an id or none")
        annotations.append((ann_id, where, image_id, ann["caption"]))
    if seen_ids and len(seen_ids) != len(annotations):
        first = next(where for ann_id, where, _, _ in annotations if ann_id is None)
        raise AdvcapError(f"{first} has no id but later annotations do: give every annotation an id or none")
    if seen_ids:
        # Annotation id order is release order: each image's captions keep it whatever the file order.
        annotations.sort(key=lambda a: a[0])

    captions: dict[int | str, list[tuple[str, str]]] = {}
    orphans = []
    for _, where, image_id, caption in annotations:
        if image_id in files:
            captions.setdefault(image_id, []).append((where, caption))
        else:
            orphans.append(where)
    if orphans:
        log.warning("%d annotation(s) refer to no image in the file and are left out, e.g. %s", len(orphans), orphans[0])
    for image_id, (where, filename) in files.items():
        tally.add(where, str(image_id), images / filename, filename, split, captions.get(image_id, []))


FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _read_flickr8k(path: Path, images: Path, tally: _Tally) -> None:
    split_of: dict[str, tuple[str, str]] = {}  # file name → (split, where it is listed)
    for split, name in FLICKR8K_SPLIT_FILES.items():
        split_file = path.parent / name
        if not split_file.is_file():
            raise AdvcapError(
                f"Flickr8k split list {split_file} not found: expected "
                f"{', '.join(FLICKR8K_SPLIT_FILES.values())} beside {path.name}"
            )
        for number, line in enumerate(_read_text(split_file).split("\n"), start=1):
            filename = line.strip()
            if not filename:
                continue
            where = f"{split_file}:{number}"
            if filename in split_of:
                raise AdvcapError(f"{where}: {filename} is already listed at {split_of[filename][1]}")
            split_of[filename] = (split, where)
    captions: dict[str, list[tuple[str, str]]] = {}
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        filename = name.rsplit("#", 1)[0].strip()
        if not tab or "#" not in name or not filename:
            raise AdvcapError(
                f"{path}:{number}: expected 'IMAGE.jpg#N<TAB>caption' (Flickr8k.token.txt), got {line[:60]!r}"
            )
        captions.setdefault(filename, []).append((f"{path}:{number}", caption))
    unlisted = sorted(set(captions) - set(split_of))
    if unlisted:
        log.warning("%d captioned images are in no Flickr8k split list and are left out (e.g. %s)", len(unlisted), unlisted[0])
    for filename, (split, where) in split_of.items():
        tally.add(where, Path(filename).stem, images / filename, filename, split, captions.get(filename, []))
