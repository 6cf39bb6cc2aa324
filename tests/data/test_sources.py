"""Bad annotation input at the door: images without captions, malformed entries, captions that are
not valid Unicode text, and annotation files that are not UTF-8 — for all three source formats."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from advcap.cli import main
from advcap.data.shardwriter import convert
from conftest import make_karpathy, write_image
from shardtools import make_flickr8k, read_shards


def cli_error(capsys, *args: str) -> str:
    """Run `advcap ARGS` in-process, expect exit code 2 and return its one-line error (no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"advcap {args[0]}: error: ")
    return last


def karpathy_entries(annotations: Path) -> list[dict]:
    return json.loads(annotations.read_text())["images"]


def write_karpathy(annotations: Path, entries: list[dict]) -> None:
    annotations.write_text(json.dumps({"images": entries}))  # ensure_ascii: "\ud800" stays an escape


def make_coco(root: Path, n: int = 4) -> tuple[Path, Path, dict]:
    images = root / "val2014"
    for i in range(n):
        write_image(images / f"COCO_val2014_{i:012d}.jpg", 50, 40, i)
    data = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(n)],
        "annotations": [{"id": 10 * i + k, "image_id": i, "caption": f"caption {k} of image {i}"} for i in range(n) for k in range(3)],
    }
    annotations = root / "captions_val2014.json"
    annotations.write_text(json.dumps(data))
    return annotations, images, data


# ----- images without a usable caption: skipped and counted, in every format

def test_karpathy_images_without_a_usable_caption_are_left_out_and_counted(tmp_path, caplog):
    annotations, images = make_karpathy(tmp_path / "src", 10)
    entries = karpathy_entries(annotations)
    entries[0]["sentences"] = []  # train
    entries[1]["sentences"] = [{"raw": "   "}, {"raw": "\t\n"}]  # train: blank only
    entries[3]["sentences"] = [{"raw": "\ud800 half a surrogate pair"}]  # val: not valid text
    write_karpathy(annotations, entries)
    with caplog.at_level(logging.WARNING):
        manifest = convert("karpathy", annotations, images, tmp_path / "out", shard_size=3)
    ids = {s["json"]["image_id"] for s in read_shards(tmp_path / "out").values()}
    assert ids == {f"img_{i:04d}" for i in range(10)} - {"img_0000", "img_0001", "img_0003"}
    assert manifest["splits"]["train"]["no_caption"] == 2 and manifest["splits"]["val"]["no_caption"] == 1
    assert manifest["splits"]["val"]["rejected_captions"] == 1 and manifest["splits"]["train"]["rejected_captions"] == 0
    assert manifest["totals"] == {"samples": 7, "skipped": 0, "no_caption": 3, "rejected_captions": 1}
    assert "3 image(s) have no usable caption" in caplog.text and "images[0]" in caplog.text
    assert f"{annotations}: images[3].sentences[0]: caption rejected" in caplog.text


def test_coco_images_without_a_usable_caption_are_left_out_and_counted(tmp_path):
    annotations, images, data = make_coco(tmp_path)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1]  # image 1: no annotation
    for ann in data["annotations"]:
        if ann["image_id"] == 2:
            ann["caption"] = " \n "  # image 2: blank captions only
    data["annotations"].append({"id": 999, "image_id": 77, "caption": "refers to no image"})
    annotations.write_text(json.dumps(data))
    manifest = convert("coco", annotations, images, tmp_path / "out", split="val")
    assert sorted(s["json"]["image_id"] for s in read_shards(tmp_path / "out").values()) == ["0", "3"]
    assert manifest["splits"]["val"]["no_caption"] == 2 and manifest["totals"]["no_caption"] == 2


def test_flickr8k_images_without_a_usable_caption_are_left_out_and_counted(tmp_path):
    annotations, images = make_flickr8k(tmp_path)
    lines = annotations.read_text().split("\n")
    # 1000_abc0 (train) loses its caption lines; 1003_abc3 (val) keeps only blank ones
    lines = [line for line in lines if not line.startswith("1000_abc0.jpg#")]
    lines = [line.split("\t")[0] + "\t  " if line.startswith("1003_abc3.jpg#") else line for line in lines]
    annotations.write_text("\n".join(lines))
    manifest = convert("flickr8k", annotations, images, tmp_path / "out")
    ids = sorted(s["json"]["image_id"] for s in read_shards(tmp_path / "out").values())
    assert ids == ["1001_abc1", "1002_abc2", "1004_abc4"]
    assert manifest["splits"]["train"]["no_caption"] == 1 and manifest["splits"]["val"]["no_caption"] == 1
    assert manifest["splits"]["val"]["shards"] == 0  # its one image had no caption
    assert manifest["splits"]["train"]["skipped"] == 1  # 1005_abc5.jpg: missing file, as before


def test_a_file_with_no_usable_caption_at_all_is_an_error(tmp_path, capsys):
    annotations, images = make_karpathy(tmp_path / "src", 3)
    entries = karpathy_entries(annotations)
    for entry in entries:
        entry["sentences"] = [{"raw": " "}]
    write_karpathy(annotations, entries)
    err = cli_error(capsys, "shards", "--format", "karpathy", "--annotations", str(annotations),
                    "--images", str(images), "--out", str(tmp_path / "out"))
    assert "no images with captions found (3 image(s) without a usable caption)" in err


# ----- caption text: normalised, or rejected when not valid Unicode

def test_captions_are_normalised_and_invalid_unicode_is_rejected(tmp_path, caplog):
    annotations, images = make_karpathy(tmp_path / "src", 5)
    entries = karpathy_entries(annotations)
    entries[0]["sentences"] = [
        {"raw": " A\u0301 man\tin  a\r\nhat\x00 with\u3000a\x85dog\u0007. "},  # NFD accent, controls, odd spaces
        {"raw": "lone surrogate \udc80 here"},
        {"raw": "a fine caption"},
    ]
    write_karpathy(annotations, entries)
    with caplog.at_level(logging.WARNING):
        manifest = convert("karpathy", annotations, images, tmp_path / "out")
    samples = read_shards(tmp_path / "out")
    meta = next(s["json"] for s in samples.values() if s["json"]["image_id"] == "img_0000")
    assert meta["captions"] == ["\u00c1 man in a hat with a dog .", "a fine caption"]
    assert manifest["splits"]["train"]["rejected_captions"] == 1
    assert "images[0].sentences[1]: caption rejected" in caplog.text
    for sample in samples.values():  # every caption survives a strict UTF-8 round trip
        for caption in sample["json"]["captions"]:
            assert caption.encode("utf-8").decode("utf-8") == caption and caption == caption.strip()


# ----- malformed entries: one error naming the file and the entry

KARPATHY_DEFECTS = {
    "filename not a string": (lambda e: e[1].update(filename=42), r"images\[1\]: filename is int 42"),
    "empty filename": (lambda e: e[1].update(filename="  "), r"images\[1\]: filename is str '  '"),
    "entry not an object": (lambda e: e.__setitem__(2, ["img_0002.jpg"]), r"images\[2\] is list"),
    "sentences not a list": (lambda e: e[1].update(sentences="a dog"), r"images\[1\]: sentences is str 'a dog'"),
    "sentence without raw": (lambda e: e[1]["sentences"].__setitem__(2, {"tokens": []}), r"images\[1\]\.sentences\[2\] is dict"),
    "raw not a string": (lambda e: e[1]["sentences"].__setitem__(0, {"raw": None}), r"images\[1\]\.sentences\[0\] is dict"),
    "unknown split": (lambda e: e[4].update(split="dev"), r"images\[4\] has split 'dev'"),
    "split not a string": (lambda e: e[4].update(split=["train"]), r"images\[4\] has split \['train'\]"),
    "unhashable cocoid": (lambda e: e[1].update(cocoid=[1]), r"images\[1\]\.cocoid is list \[1\]"),
    "repeated cocoid": (lambda e: (e[0].update(cocoid=7), e[2].update(cocoid="7")), r"images\[2\]: image id '7' repeats .*images\[0\] within split 'train'"),
    "repeated file name": (lambda e: e[2].update(filename="img_0000.jpg"), r"images\[2\]: image id 'img_0000' repeats .*images\[0\]"),
}


@pytest.mark.parametrize("defect", KARPATHY_DEFECTS)
def test_malformed_karpathy_entries_are_named(tmp_path, capsys, defect):
    annotations, images = make_karpathy(tmp_path / "src", 5)
    entries = karpathy_entries(annotations)
    mutate, message = KARPATHY_DEFECTS[defect]
    mutate(entries)
    write_karpathy(annotations, entries)
    err = cli_error(capsys, "shards", "--format", "karpathy", "--annotations", str(annotations),
                    "--images", str(images), "--out", str(tmp_path / "out"))
    assert str(annotations) in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def _coco_image_id(data, index, value):
    data["images"][index]["id"] = value


COCO_DEFECTS = {
    "image ids of mixed types": (
        lambda d: [a.update(image_id=str(a["image_id"])) for a in d["annotations"] if a["image_id"] == 2],
        r"annotations\[6\]\.image_id is str '2' but .*images\[0\]\.id is an int: image ids must all be integers or all strings",
    ),
    "unhashable image id": (lambda d: _coco_image_id(d, 1, [1]), r"images\[1\]\.id is list \[1\]"),
    "bool image id": (lambda d: _coco_image_id(d, 1, True), r"images\[1\]\.id is bool True"),
    "annotation ids of mixed types": (
        lambda d: d["annotations"][4].update(id="x4"),
        r"annotations\[4\]\.id is str 'x4' but .*annotations\[0\]\.id is an int: annotation ids must all",
    ),
    "repeated image id": (lambda d: _coco_image_id(d, 3, 1), r"images\[3\]: id 1 repeats .*images\[1\]"),
    "repeated annotation id": (lambda d: d["annotations"][5].update(id=0), r"annotations\[5\]: id 0 repeats .*annotations\[0\]"),
    "some annotations without id": (lambda d: d["annotations"][2].pop("id"), r"annotations\[2\] has no id but"),
    "caption not a string": (lambda d: d["annotations"][7].update(caption=None), r"annotations\[7\]: caption is NoneType"),
    "no file name": (lambda d: d["images"][2].pop("file_name"), r"images\[2\]: file_name is missing"),
    "annotation not an object": (lambda d: d["annotations"].__setitem__(1, "a dog"), r"annotations\[1\] is str"),
}


@pytest.mark.parametrize("defect", COCO_DEFECTS)
def test_malformed_coco_entries_are_named(tmp_path, capsys, defect):
    annotations, images, data = make_coco(tmp_path)
    mutate, message = COCO_DEFECTS[defect]
    mutate(data)
    annotations.write_text(json.dumps(data))
    err = cli_error(capsys, "shards", "--format", "coco", "--split", "val", "--annotations", str(annotations),
                    "--images", str(images), "--out", str(tmp_path / "out"))
    assert str(annotations) in err
    assert re.search(message, err), err


def test_coco_string_ids_and_annotations_without_ids_are_fine(tmp_path):
    annotations, images, data = make_coco(tmp_path, n=2)
    for image in data["images"]:
        image["id"] = f"img{image['id']}"
    for ann in data["annotations"]:
        ann["image_id"] = f"img{ann['image_id']}"
        del ann["id"]
    data["annotations"].reverse()  # without ids, file order is caption order
    annotations.write_text(json.dumps(data))
    convert("coco", annotations, images, tmp_path / "out", split="val")
    by_id = {s["json"]["image_id"]: s["json"]["captions"] for s in read_shards(tmp_path / "out").values()}
    assert by_id == {f"img{i}": [f"caption {k} of image {i}" for k in (2, 1, 0)] for i in range(2)}


def test_flickr8k_image_in_two_split_lists_is_named(tmp_path, capsys):
    annotations, images = make_flickr8k(tmp_path)
    test_list = annotations.parent / "Flickr_8k.testImages.txt"
    test_list.write_text(test_list.read_text() + "1001_abc1.jpg\n")
    err = cli_error(capsys, "shards", "--format", "flickr8k", "--annotations", str(annotations),
                    "--images", str(images), "--out", str(tmp_path / "out"))
    assert f"{test_list}:2: 1001_abc1.jpg is already listed at" in err and "Flickr_8k.trainImages.txt:2" in err


# ----- annotation files that are not UTF-8

def test_flickr8k_token_file_in_latin1_names_line_and_byte(tmp_path, capsys):
    annotations, images = make_flickr8k(tmp_path)
    lines = annotations.read_text().split("\n")
    lines[2] = lines[2].replace("A caption", "A caf\u00e9 caption")
    data = "\n".join(lines).encode("latin-1")
    annotations.write_bytes(data)
    err = cli_error(capsys, "shards", "--format", "flickr8k", "--annotations", str(annotations),
                    "--images", str(images), "--out", str(tmp_path / "out"))
    offset = data.index(b"\xe9")
    assert f"{annotations}: not UTF-8 text: byte 0xe9 at line 3 (byte offset {offset})" in err


def test_json_annotation_file_with_invalid_bytes_names_line_and_byte(tmp_path, capsys):
    annotations, images = make_karpathy(tmp_path / "src", 3)
    text = json.dumps({"images": karpathy_entries(annotations)}, indent=1).encode()
    where = text.index(b"img_0001.jpg")
    annotations.write_bytes(text[:where] + b"\xff\xfe" + text[where:])
    err = cli_error(capsys, "shards", "--format", "karpathy", "--annotations", str(annotations),
                    "--images", str(images), "--out", str(tmp_path / "out"))
    line = text[:where].count(b"\n") + 1
    assert f"not UTF-8 text: byte 0xff at line {line} (byte offset {where})" in err


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    annotations, images = make_flickr8k(tmp_path)
    annotations.write_bytes(b"\xef\xbb\xbf" + annotations.read_bytes())
    manifest = convert("flickr8k", annotations, images, tmp_path / "out")
    assert manifest["totals"]["samples"] == 5 and manifest["totals"]["no_caption"] == 0


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path, capsys):
    annotations = tmp_path / "deep.json"
    annotations.write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "images").mkdir()
    err = cli_error(capsys, "shards", "--format", "karpathy", "--annotations", str(annotations),
                    "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"))
    assert f"{annotations}: not a JSON file" in err
