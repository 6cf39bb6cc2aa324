"""Images at the door: every decoder failure is a BadImage (skipped and counted), and images larger
than max_pixels are refused from their header, before any pixel is decoded (decompression bombs)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap

import pytest
from PIL import Image, ImageFile

from advcap.data.images import DEFAULT_MAX_PIXELS, BadImage, open_rgb, to_square_pixels
from advcap.data.shardwriter import convert
from advcap.errors import AdvcapError
from conftest import make_karpathy
from shardtools import png_1bit, read_shards


def jpeg_bytes(size=(20, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(out, format="JPEG")
    return out.getvalue()


FAILURES = [
    SyntaxError("broken chunk"),
    struct.error("unpack requires a buffer of 4 bytes"),
    IndexError("list index out of range"),
    TypeError("unsupported operand"),
    Image.DecompressionBombError("too many pixels"),
    MemoryError(),
    ValueError("bad value"),
    OSError("image file is truncated"),
]


def _raise(err):
    def fail(*args, **kwargs):
        raise err

    return fail


@pytest.mark.parametrize("stage", ["open", "load"])
@pytest.mark.parametrize("err", FAILURES, ids=lambda e: type(e).__name__)
def test_every_decoder_failure_is_a_bad_image(monkeypatch, stage, err):
    target = (Image, "open") if stage == "open" else (ImageFile.ImageFile, "load")
    monkeypatch.setattr(*target, _raise(err))
    for decode in (lambda: open_rgb(jpeg_bytes()), lambda: to_square_pixels(jpeg_bytes(), 8)):
        with pytest.raises(BadImage, match=f"cannot decode: {type(err).__name__}"):
            decode()


def test_decoder_failures_of_any_type_are_skipped_and_counted(tmp_path, monkeypatch):
    annotations, images = make_karpathy(tmp_path / "src", 5)
    monkeypatch.setattr(ImageFile.ImageFile, "load", _raise(struct.error("unpack requires a buffer of 4 bytes")))
    manifest = convert("karpathy", annotations, images, tmp_path / "out")
    assert manifest["totals"]["skipped"] == 5 and manifest["totals"]["samples"] == 0
    reasons = {s["reason"] for e in manifest["shards"] for s in e["skipped"]}
    assert reasons == {"cannot decode: error: unpack requires a buffer of 4 bytes"}
    with pytest.raises(AdvcapError, match=r"img_000\d\.jpg: cannot decode: error: unpack.*--strict"):
        convert("karpathy", annotations, images, tmp_path / "strict", strict=True)


def test_eps_is_never_opened(tmp_path):
    # Pillow renders EPS with Ghostscript, an interpreter: an image file must never reach it.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(BadImage, match="cannot decode: UnidentifiedImageError"):
        open_rgb(eps)


@pytest.fixture
def load_spy(monkeypatch):
    """The sizes of all images whose pixels get decoded (ImageFile.load) while the test runs."""
    loaded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        loaded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return loaded


def test_a_bomb_above_the_default_limit_is_skipped_without_being_decoded(tmp_path, load_spy):
    annotations, images = make_karpathy(tmp_path / "src", 5)
    bomb = png_1bit(10_000, 6_000)  # 15 kB that decode to 60 Mpx (180 MB in RGB)
    assert len(bomb) < 30_000
    (images / "img_0003.jpg").write_bytes(bomb)  # a val image; Pillow goes by content, not name
    pillow_limit = Image.MAX_IMAGE_PIXELS
    manifest = convert("karpathy", annotations, images, tmp_path / "out")
    assert manifest["splits"]["val"]["skipped"] == 1 and manifest["splits"]["val"]["samples"] == 0
    [skip] = [s for e in manifest["shards"] for s in e["skipped"]]
    assert skip["filename"] == "img_0003.jpg"
    assert "10000×6000 px = 60000000 px exceeds the limit of 50000000 px" in skip["reason"]
    assert (10_000, 6_000) not in load_spy and len(set(load_spy)) == 4  # the four others were decoded
    assert manifest["source"]["max_pixels"] == DEFAULT_MAX_PIXELS == 50_000_000
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's global setting is left alone


def test_the_loader_decode_applies_the_same_limit(load_spy):
    with pytest.raises(BadImage, match="10000×6000 px .* exceeds the limit of 50000000 px"):
        to_square_pixels(png_1bit(10_000, 6_000), 24)
    assert load_spy == []
    assert to_square_pixels(png_1bit(300, 200), 24).shape == (24, 24, 3)  # a small PNG decodes
    with pytest.raises(BadImage, match="300×200 px = 60000 px exceeds the limit of 1000 px"):
        to_square_pixels(png_1bit(300, 200), 24, max_pixels=1000)


def test_max_pixels_must_not_be_negative(karpathy_set, tmp_path):
    annotations, images = karpathy_set
    with pytest.raises(AdvcapError, match="--max-pixels must be ≥ 0"):
        convert("karpathy", annotations, images, tmp_path / "out", max_pixels=-1)


# `advcap shards` in a subprocess that reports how much its peak memory grew during the conversion
# (imports excluded): Pillow allocates pixels outside Python's allocator, so only the OS can tell.
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would start at pytest's own peak.
MEASURED_CLI = textwrap.dedent(
    """
    import json, re, sys
    import advcap.data.shardwriter
    from advcap.cli import main

    def peak_kb():
        with open("/proc/self/status") as status:
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))

    before = peak_kb()
    main(sys.argv[1:])
    print(json.dumps({"grown_mb": (peak_kb() - before) / 1024}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak memory from /proc/self/status")
def test_max_pixels_on_the_command_line_skips_a_9000x9000_png_in_little_memory(tmp_path):
    annotations, images = make_karpathy(tmp_path / "src", 5)
    (images / "img_0003.jpg").write_bytes(png_1bit(9_000, 9_000))  # 21 kB; 81 Mpx, ~330 MB decoded

    def shards(out: str, max_pixels: str) -> tuple[dict, float]:
        args = ["shards", "--format", "karpathy", "--annotations", str(annotations), "--images", str(images),
                "--out", str(tmp_path / out), "--max-pixels", max_pixels]
        done = subprocess.run([sys.executable, "-c", MEASURED_CLI, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads((tmp_path / out / "manifest.json").read_text()), json.loads(done.stdout)["grown_mb"]

    manifest, grown_mb = shards("limited", "1000000")
    [skip] = [s for e in manifest["shards"] for s in e["skipped"]]
    assert skip["filename"] == "img_0003.jpg" and "9000×9000 px = 81000000 px exceeds the limit of 1000000 px" in skip["reason"]
    assert grown_mb < 40, f"the conversion grew by {grown_mb:.0f} MB: the bomb was decoded"
    # The control: without our limit (81 Mpx is below Pillow's own) the same image is decoded whole.
    manifest, grown_mb = shards("unlimited", "0")
    assert manifest["splits"]["val"]["samples"] == 1 and manifest["totals"]["skipped"] == 0
    assert grown_mb > 200
    meta = next(s["json"] for s in read_shards(tmp_path / "unlimited").values() if s["json"]["filename"] == "img_0003.jpg")
    assert (meta["width"], meta["height"]) == (9000, 9000)
