"""Image decoding and resizing, with Pillow only (torchvision does not run beside the CPU torch here).

Two resizes with different jobs:
- `shard_jpeg`: what goes into a shard — shorter side down to `resize` px, never up, re-encoded as JPEG.
- `to_square_pixels`: what the model sees — exactly S×S with PIL's bilinear filter, which is what
  `ViTImageProcessor` does (resample=BILINEAR on the uint8 image), so an exported processor
  reproduces training preprocessing. Normalisation is the model's job, not the loader's.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

JPEG_QUALITY = 95  # fixed, so shards are byte-identical across runs


class BadImage(ValueError):
    """An image file that is missing or does not decode."""


def open_rgb(source: bytes | str | Path) -> Image.Image:
    """Decode an image (bytes or path) fully and return it in RGB; raise BadImage if it cannot."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        image.load()  # force the full decode now: a truncated file fails here, not later
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(f"cannot decode: {err}") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def shard_jpeg(path: Path, resize: int) -> tuple[bytes, int, int]:
    """Return (jpeg bytes, original width, original height) for one source image.

    `resize` > 0: the shorter side is scaled down to `resize` px (never upscaled) and re-encoded.
    `resize` == 0: the original bytes are kept when the file is a JPEG (still decoded once, to
    reject broken files); other formats are re-encoded so that every `.jpg` member is a JPEG.
    """
    raw = _read_bytes(path)
    image = open_rgb(raw)
    width, height = image.size
    if resize == 0 and _is_jpeg(raw):
        return raw, width, height
    if resize and min(width, height) > resize:
        scale = resize / min(width, height)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), width, height


def to_square_pixels(jpeg: bytes, size: int) -> np.ndarray:
    """Decode and resize to exactly size×size (bilinear, as ViTImageProcessor). Returns uint8 (S,S,3)."""
    image = open_rgb(jpeg)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except OSError as err:
        raise BadImage(f"cannot read: {err}") from None


def _is_jpeg(raw: bytes) -> bool:
    return raw[:3] == b"\xff\xd8\xff"
