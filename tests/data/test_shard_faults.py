"""`advcap shards` killed for real (SIGKILL at a failpoint) and run again: the result is byte-identical
to a conversion that was never interrupted, and no temporary file is left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from advcap.data.shardwriter import convert
from conftest import make_karpathy
from shardtools import run_advcap, tree_bytes


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes]]:
    """8 images (6 train, 1 val, 1 test) and their uninterrupted conversion into 5 shards of ≤ 2."""
    root = tmp_path_factory.mktemp("faults")
    annotations, images = make_karpathy(root / "src", 8)
    convert("karpathy", annotations, images, root / "reference", shard_size=2)
    reference = tree_bytes(root / "reference")
    assert len(reference) == 6  # test-0, train-0..2, val-0 and the manifest
    return annotations, images, reference


def shards_command(annotations: Path, images: Path, out: Path, workers: int) -> list[str]:
    return ["shards", "--format", "karpathy", "--annotations", str(annotations), "--images", str(images),
            "--out", str(out), "--shard-size", "2", "--workers", str(workers)]


def environment(faults: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ADVCAP_FAULTS"}
    return env if faults is None else {**env, "ADVCAP_FAULTS": faults}


def hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def listed(out: Path) -> list[str]:
    return [e["name"] for e in json.loads((out / "manifest.json").read_text())["shards"]]


# Shards are written in the order test-0 (1 sample), train-0 (2), train-1 (2), train-2 (2), val-0 (1).
@pytest.mark.slow
@pytest.mark.parametrize(
    "faults, workers, returncode",
    [
        # the 5th sample is the last one of train-1: killed before that tar is complete
        ("shards.mid_shard=kill@hit=5", 1, -9),
        # the 2nd shard (train-0) is in place, the manifest lists only test-0
        ("shards.before_manifest=kill@hit=2", 1, -9),
        # a worker process dies mid-shard: the run ends with an error instead of hanging
        ("shards.mid_shard=kill@hit=2", 2, 2),
    ],
)
def test_a_killed_conversion_resumes_to_identical_shards(source, tmp_path, faults, workers, returncode):
    annotations, images, reference = source
    out = tmp_path / "out"
    killed = run_advcap(*shards_command(annotations, images, out, workers), env=environment(faults))
    assert killed.returncode == returncode, killed.stderr
    if faults.startswith("shards.mid_shard") and workers == 1:
        assert listed(out) == ["test-000000.tar", "train-000000.tar"]
        assert hidden(out) and all(".train-000001.tar.tmp-" in name for name in hidden(out))  # the unfinished shard
        assert not (out / "train-000001.tar").exists()
    elif faults.startswith("shards.before_manifest"):
        assert listed(out) == ["test-000000.tar"] and (out / "train-000000.tar").is_file()
        assert json.loads((out / "manifest.json").read_text())["complete"] is False
    else:
        assert "a shard-writing worker process died" in killed.stderr and "Traceback" not in killed.stderr
    assert tree_bytes(out) != reference

    resumed = run_advcap(*shards_command(annotations, images, out, workers), env=environment(None))
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(out) == reference
    assert hidden(out) == []
