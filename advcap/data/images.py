"""Image decoding and resizing, with Pillow only (torchvision does not run beside the CPU torch here).

Two resizes with different jobs:
- `shard_jpeg`: what goes into a shard — shorter side down to `resize` px, never up, re-encoded as JPEG.
- `to_square_pixels`: what the model sees — exactly S×S with PIL's bilinear filter, which is what
  `ViTImageProcessor` does (resample=BILINEAR on the uint8 image), so an exported processor
  reproduces training preprocessing. Normalisation is the model's job, not the loader's.

Bad input stops here. Every failure to read or decode one image, whatever Pillow raises for it
(OSError, SyntaxError, struct.error, IndexError, DecompressionBombError, MemoryError, ...), becomes a
`BadImage`, which the converter counts as a skipped image and the loader as a bad sample. An image
whose header claims more than `max_pixels` pixels is refused before its pixels are decoded (the
header is read lazily by `Image.open`; `load()` is what allocates and decodes), so a tiny file that
expands to gigabytes costs nothing. The limit is an argument, never `PIL.Image.MAX_IMAGE_PIXELS`
(global state); Pillow's own bomb check still applies on top of it. Only common raster formats are
opened: never EPS, which Pillow decodes by running Ghostscript.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

JPEG_QUALITY = 95  # fixed, so shards are byte-identical across runs
# COCO and Flickr images are below 1 Mpx; 50 Mpx leaves room for any photo dataset while a
# decoded RGB image stays below 150 MB.
DEFAULT_MAX_PIXELS = 50_000_000
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


class BadImage(ValueError):
    """An image file that is missing, does not decode, or is larger than allowed."""


def open_rgb(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image (bytes or path) fully and return it in RGB; raise BadImage if it cannot.

    `max_pixels` > 0: an image whose header claims more than that many pixels (width × height) is
    refused before decoding; 0 leaves only Pillow's own decompression-bomb limit.
    """
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source, formats=FORMATS)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is a property of this one file
        raise BadImage(f"cannot decode: {_describe(err)}") from None
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        image.close()
        raise BadImage(
            f"{width}×{height} px = {width * height} px exceeds the limit of {max_pixels} px "
            "(--max-pixels; a decompression bomb or a huge scan)"
        )
    try:
        image.load()  # force the full decode now: a truncated file fails here, not later
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # noqa: BLE001
        raise BadImage(f"cannot decode: {_describe(err)}") from None


def shard_jpeg(path: Path, resize: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, int, int]:
    """Return (jpeg bytes, original width, original height) for one source image.

    `resize` > 0: the shorter side is scaled down to `resize` px (never upscaled) and re-encoded.
    `resize` == 0: the original bytes are kept when the file is a JPEG (still decoded once, to
    reject broken files); other formats are re-encoded so that every `.jpg` member is a JPEG.
    `max_pixels`: as in `open_rgb`. Raises BadImage for anything wrong with this one image.
    """
    raw = _read_bytes(path)
    image = open_rgb(raw, max_pixels)
    width, height = image.size
    if resize == 0 and _is_jpeg(raw):
        return raw, width, height
    try:
        if resize and min(width, height) > resize:
            scale = resize / min(width, height)
            new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = image.resize(new_size, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
    except Exception as err:  # noqa: BLE001
        raise BadImage(f"cannot re-encode: {_describe(err)}") from None
    return out.getvalue(), width, height


def to_square_pixels(jpeg: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode and resize to exactly size×size (bilinear, as ViTImageProcessor). Returns uint8 (S,S,3).

    Raises BadImage for an image that does not decode or exceeds `max_pixels` (see `open_rgb`).
    """
    image = open_rgb(jpeg, max_pixels)
    try:
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image)
    except Exception as err:  # noqa: BLE001
        raise BadImage(f"cannot resize: {_describe(err)}") from None


def _describe(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the name
        raise BadImage(f"cannot read: {err}") from None


def _is_jpeg(raw: bytes) -> bool:
    return raw[:3] == b"\xff\xd8\xff"
