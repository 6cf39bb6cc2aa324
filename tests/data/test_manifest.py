"""manifest.json: shard sizes, the cheap completeness check before a job, `advcap verify` on sizes,
and resuming a shard set whose manifest predates the newer fields."""

from __future__ import annotations

import io
import json
from pathlib import Path
import logging
import tarfile

import pytest

from advcap.data.manifest import check_shards, load_manifest, require_complete_shards
from advcap.data.shardwriter import convert, sha256_file
from advcap.data.verify import verify
from advcap.errors import AdvcapError
from shardtools import tree_bytes


@pytest.fixture
def shard_set(karpathy_set, tmp_path):
    annotations, images = karpathy_set
    convert("karpathy", annotations, images, tmp_path / "out", shard_size=5)
    return tmp_path / "out"


def test_every_shard_entry_records_its_size(shard_set):
    raw = json.loads((shard_set / "manifest.json").read_text())
    assert len(raw["shards"]) == 5
    for entry in raw["shards"]:
        assert entry["bytes"] == (shard_set / entry["name"]).stat().st_size > 0
    manifest = load_manifest(shard_set)
    assert [s.bytes for s in manifest.shards] == [e["bytes"] for e in raw["shards"]]
    assert check_shards(manifest) == []
    require_complete_shards(manifest)  # no error


def test_check_shards_names_missing_and_truncated_shards(shard_set):
    manifest = load_manifest(shard_set)
    (shard_set / "test-000000.tar").unlink()
    truncated = shard_set / "train-000001.tar"
    size = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:1024])
    assert check_shards(manifest) == [
        "test-000000.tar: missing",
        f"train-000001.tar: 1024 bytes, the manifest says {size} (truncated)",
    ]
    assert check_shards(manifest, splits=["val"]) == []
    assert check_shards(manifest, splits=["test"]) == ["test-000000.tar: missing"]
    with pytest.raises(AdvcapError) as error:
        require_complete_shards(manifest)
    message = str(error.value)
    assert message.startswith(f"{shard_set}: 2 of 5 shards missing or truncated: test-000000.tar: missing; train-000001.tar: 1024 bytes")
    assert f"advcap verify {shard_set}" in message
    with pytest.raises(AdvcapError, match=r"1 of 1 shards missing or truncated: test-000000.tar: missing"):
        require_complete_shards(manifest, splits=["test"])
    require_complete_shards(manifest, splits=["val"])  # the val shard is intact


def test_check_shards_lists_a_few_by_name_and_counts_the_rest(shard_set):
    manifest = load_manifest(shard_set)
    for shard in manifest.shards:
        Path(shard.url).unlink()
    with pytest.raises(AdvcapError, match=r"5 of 5 shards .*train-000000.tar: missing; and 3 more"):
        require_complete_shards(manifest, shown=2)


def test_entries_without_a_size_from_older_manifests_are_checked_for_presence_only(shard_set):
    raw = json.loads((shard_set / "manifest.json").read_text())
    for entry in raw["shards"]:
        del entry["bytes"]
    (shard_set / "manifest.json").write_text(json.dumps(raw))
    manifest = load_manifest(shard_set)
    assert all(s.bytes is None for s in manifest.shards)
    (shard_set / "val-000000.tar").write_bytes(b"short")
    (shard_set / "test-000000.tar").unlink()
    assert check_shards(manifest) == ["test-000000.tar: missing"]


def test_a_malformed_size_in_the_manifest_is_an_error(shard_set):
    raw = json.loads((shard_set / "manifest.json").read_text())
    raw["shards"][0]["bytes"] = "12"
    (shard_set / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(AdvcapError, match="manifest.json is malformed"):
        load_manifest(shard_set)


def test_verify_reports_a_size_mismatch(shard_set, caplog):
    shard = shard_set / "val-000000.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + b"\0" * 512)  # one more block: still a readable tar
    with caplog.at_level(logging.ERROR):
        assert not verify(shard_set)
    assert f"val-000000.tar: {size + 512} bytes, the manifest says {size}" in caplog.text
    assert "val-000000.tar: sha256 differs" in caplog.text


def test_a_manifest_from_before_max_pixels_and_sizes_resumes_with_default_settings(karpathy_set, tmp_path):
    annotations, images = karpathy_set
    convert("karpathy", annotations, images, tmp_path / "fresh", shard_size=5)
    out = tmp_path / "old"
    convert("karpathy", annotations, images, out, shard_size=5)
    # What an interrupted run of the previous version left: no max_pixels, no sizes, two shards to go.
    raw = json.loads((out / "manifest.json").read_text())
    del raw["source"]["max_pixels"]
    for entry in raw["shards"]:
        del entry["bytes"]
    raw["complete"] = False
    for entry in raw["shards"][3:]:
        (out / entry["name"]).unlink()
    raw["shards"] = raw["shards"][:3]
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(AdvcapError, match=r"different settings \(max_pixels\)"):
        convert("karpathy", annotations, images, out, shard_size=5, max_pixels=1000)
    convert("karpathy", annotations, images, out, shard_size=5)
    assert tree_bytes(out) == tree_bytes(tmp_path / "fresh")


def test_verify_checks_each_sample_json_as_the_loaders_do(shard_set, caplog):
    shard = shard_set / "val-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    edits = iter([{"image_id": 5}, {"captions": [" ", "\ud800"]}, {"captions": ["fine", "\udc80"]}])
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.endswith(".json") and (edit := next(edits, None)):
                data = json.dumps({**json.loads(data), **edit}).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    raw = json.loads((shard_set / "manifest.json").read_text())
    entry = next(e for e in raw["shards"] if e["name"] == shard.name)
    entry.update(sha256=sha256_file(shard), bytes=shard.stat().st_size)  # only the samples are wrong
    (shard_set / "manifest.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.ERROR):
        assert not verify(shard_set)
    problems = [r.getMessage() for r in caplog.records if r.getMessage().startswith("val-000000.tar/")]
    assert len(problems) == 3
    assert "image_id is int 5" in problems[0]
    assert "no usable caption (of 2" in problems[1]
    assert "1 unusable caption(s)" in problems[2]
