"""Shared fixtures: tiny image sets in the three source formats, written by the tests themselves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

WORDS = ["red", "blue", "green", "circle", "square", "small", "large", "left", "of", "a", "the", "shape"]


def write_image(path: Path, width: int, height: int, seed: int) -> None:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(3):
        x, y = rng.randrange(width), rng.randrange(height)
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(width, x + 9), min(height, y + 7)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9)))


def make_karpathy(root: Path, n_images: int, with_filepath: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """A Karpathy-split file over `n_images` small JPEGs (COCO style with filepath/cocoid if asked)."""
    rng = random.Random(seed)
    images_dir = root / "images"
    entries = []
    for i in range(n_images):
        split = ["train", "train", "restval", "val", "test"][i % 5]
        name = f"img_{i:04d}.jpg"
        folder = ("train2014" if i % 2 else "val2014") if with_filepath else ""
        write_image(images_dir / folder / name, 40 + i % 7, 30 + i % 5, seed * 1000 + i)
        entry = {
            "filename": name,
            "imgid": i,
            "split": split,
            "sentences": [{"raw": f"  {caption(rng)} ", "tokens": []} for _ in range(5)],
        }
        if with_filepath:
            entry.update(filepath=folder, cocoid=1000 + i)
        entries.append(entry)
    annotations = root / "captions.json"
    annotations.write_text(json.dumps({"images": entries, "dataset": "test"}))
    return annotations, images_dir


@pytest.fixture
def karpathy_set(tmp_path):
    return make_karpathy(tmp_path / "src", 24)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from advcap.tokenizer import train_tokenizer

    rng = random.Random(0)
    return train_tokenizer([caption(rng) for _ in range(300)], tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine extra threads
    fight other processes for the cores (a micro ablation ran 10× slower with the default)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
