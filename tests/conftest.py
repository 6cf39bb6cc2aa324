"""Shared fixtures: tiny image sets in the three source formats, written by the tests themselves."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

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


def make_tiny_shards(root: Path, n_images: int = 30) -> Path:
    """`root/shards` (one shard per split: 12 train, 6 restval, 6 val, 6 test of 30 images) and `root/tok`, a
    tokenizer trained on the train captions. Returns root."""
    from advcap.data.manifest import load_manifest
    from advcap.data.shardwriter import convert
    from advcap.tokenizer import train_captions, train_tokenizer

    annotations, images = make_karpathy(root / "src", n_images)
    convert("karpathy", annotations, images, root / "shards", resize=0, shard_size=100)
    train_tokenizer(train_captions(load_manifest(root / "shards")), root / "tok", vocab_size=300)
    return root


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """A `python -m http.server` process serving `directory`; yields its base URL."""
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        port = re.search(r"port (\d+)", server.stdout.readline()).group(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def metrics_of(run: Path) -> dict:
    """{split: {condition: {...}}} of a run's evaluation record (metrics.json)."""
    return json.loads((Path(run) / "metrics.json").read_text())["metrics"]


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


# ----- SLURM test clusters (tests/slurm_cluster.py) -----

def _slurm_cluster(tmp_path_factory, name: str, nodes: int):
    """Start a session-wide cluster in its own folder (own ports, socket and state, so the 1-node
    and 2-node clusters can run side by side), or skip saying what is missing."""
    from slurm_cluster import SlurmCluster, missing_binaries

    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}): run `sh tests/install-slurm.sh` as root")
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (slurmd launches jobs; SlurmUser=root)")
    cluster = SlurmCluster(tmp_path_factory.mktemp(name), nodes=nodes)
    cluster.start(timeout=60)
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running 1-node SLURM cluster (SlurmCluster); stopped at the end of the session."""
    cluster = _slurm_cluster(tmp_path_factory, "slurm1", nodes=1)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster_2nodes(tmp_path_factory):
    """A running SLURM cluster of two emulated nodes (two slurmds on this host), for --nodes=2 jobs."""
    cluster = _slurm_cluster(tmp_path_factory, "slurm2", nodes=2)
    yield cluster
    cluster.stop()


# ----- CI strict mode: ADVCAP_STRICT_TESTS=1 turns every skip into a failed run -----

_SKIPPED: list[tuple[str, str]] = []


def _strict() -> bool:
    return os.environ.get("ADVCAP_STRICT_TESTS") == "1"


def _skip_reason(report) -> str:
    """The reason pytest stores for a skip: a (file, line, reason) tuple in longrepr."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_runtest_logreport(report):
    """Remember every skipped test (xfail is a result, not a skip, and is not counted)."""
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report):
    """A module skipped at collection (e.g. pytest.importorskip) counts as a skip too."""
    if report.skipped:
        _SKIPPED.append((report.nodeid, _skip_reason(report)))


def pytest_sessionfinish(session, exitstatus):
    """In CI a skip hides a missing install step (a green run that tested nothing of SLURM), so
    under ADVCAP_STRICT_TESTS=1 an otherwise passing session with skips fails."""
    if _strict() and _SKIPPED and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    """Say which tests were skipped and why, and that strict mode failed the run because of them."""
    if _strict() and _SKIPPED:
        terminalreporter.section("ADVCAP_STRICT_TESTS=1: skipped tests fail the run", red=True)
        for nodeid, reason in _SKIPPED:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}")
