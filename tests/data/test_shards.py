"""Conversion of the three source formats to shards, resumption, bad input, and `advcap verify`."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from advcap.cli import main
from advcap.data import shardwriter
from advcap.data.shardwriter import convert
from advcap.data.verify import verify
from advcap.errors import AdvcapError
from conftest import make_karpathy, write_image
from shardtools import make_flickr8k, read_shards, tree_bytes


def test_karpathy_flickr_style_round_trip(karpathy_set, tmp_path):
    annotations, images = karpathy_set
    manifest = convert("karpathy", annotations, images, tmp_path / "out", resize=32, shard_size=5)
    samples = read_shards(tmp_path / "out")
    source = json.loads(annotations.read_text())["images"]
    assert len(samples) == 24 and any(e["split"] == "restval" for e in source)
    assert manifest["splits"]["train"]["samples"] == sum(e["split"] in ("train", "restval") for e in source)
    by_id = {s["json"]["image_id"]: s for s in samples.values()}
    for entry in source:
        sample = by_id[Path(entry["filename"]).stem]  # Flickr-style: the file name stem
        meta = sample["json"]
        assert meta["captions"] == [s["raw"].strip() for s in entry["sentences"]]
        assert meta["split"] == ("train" if entry["split"] == "restval" else entry["split"])
        assert sample["shard"].startswith(meta["split"] + "-")
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert (meta["width"], meta["height"]) == Image.open(images / entry["filename"]).size
        assert min(image.size) == min(meta["width"], meta["height"], 32)  # shorter side down to 32, never up
    names = [s["name"] for s in manifest["shards"]]
    assert names == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert sum(s["samples"] for s in manifest["shards"]) == 24


def test_karpathy_coco_style_uses_filepath_and_cocoid(tmp_path):
    annotations, images = make_karpathy(tmp_path / "src", 10, with_filepath=True)
    convert("karpathy", annotations, images, tmp_path / "out", resize=0)
    samples = read_shards(tmp_path / "out")
    ids = sorted(s["json"]["image_id"] for s in samples.values())
    assert ids == [str(1000 + i) for i in range(10)]
    # --resize 0 keeps the original JPEG bytes
    for sample in samples.values():
        folder = "train2014" if int(sample["json"]["image_id"]) % 2 else "val2014"
        assert sample["jpg"] == (images / folder / sample["json"]["filename"]).read_bytes()


def test_coco_raw_captions_keep_every_caption(tmp_path):
    images = tmp_path / "val2014"
    for i in range(3):
        write_image(images / f"COCO_val2014_{i:012d}.jpg", 50, 40, i)
    annotations = tmp_path / "captions_val2014.json"
    anns = [{"id": 10 * i + k, "image_id": i, "caption": f"caption {k} of image {i} "} for i in range(3) for k in range(5)]
    anns += [{"id": 99, "image_id": 1, "caption": "a sixth"}, {"id": 98, "image_id": 1, "caption": "a seventh"}]
    annotations.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(3)],
        "annotations": anns,
    }))
    with pytest.raises(AdvcapError, match="--split"):
        convert("coco", annotations, images, tmp_path / "out")
    convert("coco", annotations, images, tmp_path / "out", split="val")
    by_id = {s["json"]["image_id"]: s["json"] for s in read_shards(tmp_path / "out").values()}
    assert sorted(by_id) == ["0", "1", "2"]
    assert len(by_id["1"]["captions"]) == 7 and by_id["1"]["captions"][0] == "caption 0 of image 1"
    assert all(m["split"] == "val" for m in by_id.values())


def test_flickr8k_text_files_with_a_missing_image(tmp_path, caplog):
    annotations, images = make_flickr8k(tmp_path)
    with caplog.at_level(logging.WARNING):
        manifest = convert("flickr8k", annotations, images, tmp_path / "out")
    samples = read_shards(tmp_path / "out")
    assert sorted(s["json"]["image_id"] for s in samples.values()) == [f"{1000 + i}_abc{i}" for i in range(5)]
    assert {s["json"]["split"] for s in samples.values()} == {"train", "val", "test"}
    assert manifest["splits"]["train"] == {"samples": 3, "shards": 1, "skipped": 1, "no_caption": 0, "rejected_captions": 0}
    assert "1005_abc5.jpg" in caplog.text  # the missing image is named
    with pytest.raises(AdvcapError, match="missing"):
        convert("flickr8k", annotations, images, tmp_path / "strict", strict=True)


def test_flickr8k_without_split_lists_says_what_it_expected(tmp_path):
    annotations, images = make_flickr8k(tmp_path)
    (annotations.parent / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(AdvcapError, match="Flickr_8k.devImages.txt"):
        convert("flickr8k", annotations, images, tmp_path / "out")


def test_undecodable_image_is_skipped_and_counted(karpathy_set, tmp_path):
    annotations, images = karpathy_set
    (images / "img_0003.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    manifest = convert("karpathy", annotations, images, tmp_path / "out")
    assert manifest["splits"]["val"]["skipped"] == 1
    skipped = [s for e in manifest["shards"] for s in e["skipped"]]
    assert skipped[0]["filename"] == "img_0003.jpg" and "decode" in skipped[0]["reason"]
    with pytest.raises(AdvcapError, match="img_0003.jpg"):
        convert("karpathy", annotations, images, tmp_path / "strict", strict=True)


@pytest.mark.parametrize(
    "content, message",
    [("not json", "not a JSON file"), ('{"foo": 1}', "Karpathy split"), ('{"images": [{"filename": "x.jpg"}]}', r"images\[0\]")],
)
def test_malformed_annotations_error_without_traceback(tmp_path, capsys, content, message):
    annotations = tmp_path / "bad.json"
    annotations.write_text(content)
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "--format", "karpathy", "--annotations", str(annotations), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    import re

    assert re.search(message, err)


def test_shards_identical_for_one_and_two_workers_and_reruns(karpathy_set, tmp_path):
    annotations, images = karpathy_set
    convert("karpathy", annotations, images, tmp_path / "w1", shard_size=4, workers=1)
    convert("karpathy", annotations, images, tmp_path / "w2", shard_size=4, workers=2)
    first = tree_bytes(tmp_path / "w1")
    assert len(first) > 5 and first == tree_bytes(tmp_path / "w2")
    convert("karpathy", annotations, images, tmp_path / "w3", shard_size=4, workers=1)
    assert first == tree_bytes(tmp_path / "w3")


def test_interrupted_conversion_resumes_writing_only_what_is_missing(karpathy_set, tmp_path, monkeypatch):
    annotations, images = karpathy_set
    convert("karpathy", annotations, images, tmp_path / "whole", shard_size=3)
    real_write = shardwriter.write_shard
    written = []

    def write_then_die(task, out):
        if len(written) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-conversion
        written.append(task.name)
        return real_write(task, out)

    monkeypatch.setattr(shardwriter, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert("karpathy", annotations, images, tmp_path / "out", shard_size=3)
    partial = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert partial["complete"] is False and len(partial["shards"]) == 3
    with pytest.raises(AdvcapError, match="did not finish"):
        from advcap.data.manifest import load_manifest

        load_manifest(tmp_path / "out")

    written.clear()
    monkeypatch.setattr(shardwriter, "write_shard", lambda task, out: written.append(task.name) or real_write(task, out))
    convert("karpathy", annotations, images, tmp_path / "out", shard_size=3)
    total = len(json.loads((tmp_path / "whole" / "manifest.json").read_text())["shards"])
    assert len(written) == total - 3
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "whole")


def test_rerun_with_other_settings_is_refused(karpathy_set, tmp_path):
    annotations, images = karpathy_set
    convert("karpathy", annotations, images, tmp_path / "out", shard_size=5)
    with pytest.raises(AdvcapError, match="shard_size"):
        convert("karpathy", annotations, images, tmp_path / "out", shard_size=6)


def test_verify_passes_clean_shards_and_names_a_flipped_byte(karpathy_set, tmp_path, caplog, capsys):
    annotations, images = karpathy_set
    out = tmp_path / "out"
    convert("karpathy", annotations, images, out, shard_size=5)
    assert verify(out)
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside some member's JPEG bytes
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        assert not verify(out)
    assert "train-000001.tar" in caplog.text and "sha256" in caplog.text
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(out)])
    assert exit_info.value.code == 1


def test_verify_catches_a_truncated_shard(karpathy_set, tmp_path, caplog):
    annotations, images = karpathy_set
    out = tmp_path / "out"
    convert("karpathy", annotations, images, out, shard_size=5)
    shard = out / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with caplog.at_level(logging.ERROR):
        assert not verify(out)
    assert "val-000000.tar" in caplog.text and "samples, manifest says" in caplog.text
