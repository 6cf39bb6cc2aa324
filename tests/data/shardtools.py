"""Helpers shared by the data tests: source sets, reading shards back, crafted images, the CLI."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

from conftest import write_image

ADVCAP = Path(sys.executable).with_name("advcap")  # the console script of this virtualenv


def read_shards(out: Path) -> dict[str, dict]:
    """All samples of all shards in `out`: key → {'json': dict, 'jpg': bytes, 'shard': name}."""
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                value = tar.extractfile(member).read()
                entry = samples.setdefault(key, {"shard": shard.name})
                entry[ext] = json.loads(value) if ext == "json" else value
    return samples


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every file of a folder (hidden ones too) by name → its bytes."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def make_flickr8k(root: Path) -> tuple[Path, Path]:
    images = root / "Flicker8k_Dataset"
    names = [f"{1000 + i}_abc{i}.jpg" for i in range(6)]
    for i, name in enumerate(names[:5]):  # the sixth image is listed but missing: a Flickr8k quirk
        write_image(images / name, 60, 45, i)
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    lines = [f"{n}#{k}\tA caption {k} for {n} ." for n in names for k in range(5)]
    lines.append("2258277193_586949ec62.jpg.1#0\tAn entry whose image is in no split list .")
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:3] + names[5:]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text(names[3] + "\n")
    (text / "Flickr_8k.testImages.txt").write_text(names[4] + "\n")
    return text / "Flickr8k.token.txt", images


def png_1bit(width: int, height: int) -> bytes:
    """A valid, all-white 1-bit PNG of width×height: a few kB on disk however large it claims to be
    (a 9000×9000 one is ~21 kB and decodes to ~330 MB in RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\xff" * ((width + 7) // 8)  # filter byte 0, then the packed pixels
    deflate = zlib.compressobj(9)
    body = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def run_advcap(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the installed `advcap` console script in a subprocess; text output captured."""
    return subprocess.run([str(ADVCAP), *args], capture_output=True, text=True, env=env, timeout=timeout)
