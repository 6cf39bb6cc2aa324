"""Caption text and the json member of a shard sample: what the converter writes, what readers accept.

Caption text. A caption goes into a shard only if it is valid Unicode text, i.e. encodable as UTF-8:
JSON may spell lone surrogates (`"\\ud800"`), which parse into a Python str that later breaks the
tokenizer and every UTF-8 file written from it (predictions.jsonl). Such a caption is rejected. The
rest is normalised: Unicode NFC, control characters (category Cc) to spaces, runs of white space
to one space, stripped. What is left empty is a blank caption and is dropped.

Sample json. `image_id` is a non-empty string and `captions` a list of captions. Readers (the
loaders, `advcap verify`) accept a sample whose json is an object with a valid string image_id and
at least one usable caption (a non-blank string of valid Unicode text); unusable captions are
dropped, and a sample with none left is bad.

Shards made by img2dataset are read as they are: such a sample has `jpg`, `txt` (its one caption)
and a `json` of img2dataset's own (`key`, `url`, `caption`, `status`, sizes, …) without `captions`.
Mapping: image_id = the json's `key` (else the tar key); captions = [the txt]. A json with a
`captions` list is advcap's and wins; a `txt` is only used when the json has no `captions`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


class BadSample(ValueError):
    """A shard sample whose json is missing, malformed, or holds no usable caption."""


def is_text(value: object) -> bool:
    """True if `value` is a str that encodes to UTF-8 (no lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def normalise_caption(text: str) -> str | None:
    """The caption normalised (NFC, controls → spaces, white space collapsed, stripped); '' if blank,
    None if it is not valid Unicode text (lone surrogates) and must be rejected."""
    if not is_text(text):
        return None
    return " ".join(_CONTROL.sub(" ", unicodedata.normalize("NFC", text)).split())


@dataclass(frozen=True)
class SampleMeta:
    """What a reader takes from a sample's json: the image id and its usable captions (≥ 1)."""

    image_id: str
    captions: list[str]
    raw: dict


def read_meta(data: bytes) -> SampleMeta:
    """Parse and check a sample's json member; raise BadSample saying what is wrong."""
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadSample(f"json does not parse ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict):
        raise BadSample(f"json is a {type(meta).__name__}, not an object")
    image_id = meta.get("image_id")
    if not is_text(image_id) or not image_id:
        raise BadSample(f"image_id is {_short(image_id)}, not a non-empty string of valid text")
    captions = meta.get("captions")
    if not isinstance(captions, list):
        raise BadSample(f"captions is {_short(captions)}, not a list")
    usable = [c for c in captions if is_text(c) and c.strip()]
    if not usable:
        raise BadSample(f"no usable caption (of {len(captions)}: blank, not strings, or not valid Unicode)")
    return SampleMeta(image_id, usable, meta)


MEMBERS = (".jpg", ".json", ".txt")  # the only tar members readers take (never a pickle)


def sample_meta(sample: dict) -> SampleMeta:
    """The image id and captions of a raw tar sample (members by extension), in advcap's layout or
    img2dataset's (see above); BadSample saying what is missing or wrong."""
    missing = [m for m, present in (("jpg", "jpg" in sample), ("json", "json" in sample or "txt" in sample)) if not present]
    if missing:
        raise BadSample(f"no .{' or .'.join(missing)} member")
    if img2dataset_layout(sample):
        return _img2dataset_meta(sample)
    return read_meta(sample["json"])


def img2dataset_layout(sample: dict) -> bool:
    """True if the sample is laid out as img2dataset writes it (a txt caption; no advcap `captions` json)."""
    return "txt" in sample and not _advcap_json(sample.get("json"))


def _advcap_json(data: bytes | None) -> bool:
    """True if `data` is a json object with a `captions` key (advcap's layout, checked by read_meta)."""
    if data is None:
        return False
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        return True  # let read_meta name the error
    return not isinstance(meta, dict) or "captions" in meta


def _img2dataset_meta(sample: dict) -> SampleMeta:
    meta = json.loads(sample["json"]) if "json" in sample else {}
    image_id = meta.get("key", sample.get("__key__"))
    if not is_text(image_id) or not image_id:
        raise BadSample(f"img2dataset key is {_short(image_id)}, not a non-empty string of valid text")
    try:
        caption = normalise_caption(sample["txt"].decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadSample(f"txt caption is not UTF-8 ({err})") from None
    if not caption:
        raise BadSample("txt caption is blank")
    return SampleMeta(image_id, [caption], {**meta, "image_id": image_id, "captions": [caption]})


def _short(value: object) -> str:
    if value is None:
        return "missing or null"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'…' if len(text) > 40 else ''}"
