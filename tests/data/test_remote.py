"""Shards by URL over real transports: a `python -m http.server` process, `pipe:cat`, `file:`; a
manifest fetched from beside the shards or split sizes from the config; retried and failing fetches;
img2dataset's layout read as it is."""

from __future__ import annotations

import http.server
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import webdataset as wds

from advcap.data.loader import EvalStream, TrainStream, split_metadata
from advcap.data.manifest import check_shards, load_manifest, require_complete_shards
from advcap.data.shardwriter import convert
from advcap.data.verify import verify
from advcap.errors import AdvcapError
from conftest import caption, http_server, make_karpathy, write_image

IMAGE_SIZE = 24


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Shards in `root/shards` (4 per tar: 16 train, 8 val, 8 test samples of 40 images) served by a real
    `python -m http.server` process; yields (root, base URL)."""
    root = tmp_path_factory.mktemp("remote")
    annotations, images = make_karpathy(root / "src", 40)
    convert("karpathy", annotations, images, root / "shards", shard_size=4)
    with http_server(root) as base:
        yield root, base


def local(root: Path):
    return load_manifest(root / "shards")


def train_batches(manifest, tokenizer, rank=0, world=1, n=None):
    stream = TrainStream(manifest, tokenizer, IMAGE_SIZE, 8, 3, 0, rank, world, 0, shuffle_buffer=6)
    return list(stream)[:n]


def eval_ids(manifest, tokenizer, split="train", world=1) -> list[list[str]]:
    return [
        [i for batch in EvalStream(manifest, split, tokenizer, IMAGE_SIZE, 8, 4, rank=rank, world_size=world)
         for i in batch["image_ids"]]
        for rank in range(world)
    ]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["image_ids"] == y["image_ids"]
        assert torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["input_ids"], y["input_ids"])


def shard_names(root: Path, split: str) -> list[str]:
    return sorted(p.name for p in (root / "shards").glob(f"{split}-*.tar"))


def brace(names: list[str]) -> str:
    """`train-{000000..000003}.tar` for consecutive names."""
    split = names[0].split("-")[0]
    return f"{split}-{{000000..{len(names) - 1:06d}}}.tar"


# ---------------------------------------------------------------- a manifest beside the shards


def test_a_url_folder_reads_the_manifest_and_shards_over_http(served, tokenizer):
    root, base = served
    remote = load_manifest(f"{base}/shards/")
    assert [s.url for s in remote.shards] == [f"{base}/shards/{s.name}" for s in local(root).shards]
    assert remote.sha256() == local(root).sha256()  # the same data provenance as the local copy
    assert_same_batches(train_batches(remote, tokenizer), train_batches(local(root), tokenizer))
    for world in (1, 2):
        assert eval_ids(remote, tokenizer, world=world) == eval_ids(local(root), tokenizer, world=world)
    assert require_complete_shards(remote) is None
    assert load_manifest(f"{base}/shards").shards == remote.shards  # the trailing slash is optional


def test_brace_patterns_joined_by_double_colon_through_pipe_cat(served, tokenizer):
    root, _ = served
    folder = root / "shards"
    source = "::".join(f"pipe:cat {folder}/{brace(shard_names(root, s))}" for s in ("train", "val", "test"))
    remote = load_manifest(source)  # the manifest from `pipe:cat <folder>/manifest.json`
    assert sorted((s.name, s.split, s.samples) for s in remote.shards) == sorted(
        (s.name, s.split, s.samples) for s in local(root).shards
    )
    assert_same_batches(train_batches(remote, tokenizer), train_batches(local(root), tokenizer))
    assert eval_ids(remote, tokenizer, "test", world=2) == eval_ids(local(root), tokenizer, "test", world=2)
    assert verify(source)


def test_file_urls_and_a_listed_subset(served, tokenizer):
    root, _ = served
    names = shard_names(root, "train")
    remote = load_manifest(f"file:{root}/shards/{brace(names)}")
    assert remote.samples("train") == local(root).samples("train")
    with pytest.raises(AdvcapError, match="no shards for split 'val'"):
        remote.split("val")


def test_a_shard_the_manifest_does_not_list_is_named(served):
    root, base = served
    with pytest.raises(AdvcapError, match=r"train-000099.tar is not listed in the manifest.json beside it"):
        load_manifest(f"{base}/shards/train-{{000000..000001}}.tar::{base}/shards/train-000099.tar")


# ---------------------------------------------------------------- no manifest: sizes from the config


@pytest.fixture
def unlisted(served, tmp_path):
    """The served shards copied without their manifest."""
    root, _ = served
    shutil.copytree(root / "shards", tmp_path / "bare", ignore=shutil.ignore_patterns("manifest.json"))
    return tmp_path / "bare"


def test_without_a_manifest_the_split_sizes_come_from_the_config(served, unlisted, tokenizer):
    root, _ = served
    source = f"pipe:cat {unlisted}/{brace(shard_names(root, 'train'))}::val=pipe:cat {unlisted}/val-{{000000..000001}}.tar"
    with pytest.raises(AdvcapError, match=r"no manifest.json beside the shards .*data\.samples\.train"):
        load_manifest(source)
    sizes = {"train": local(root).samples("train"), "val": local(root).samples("val")}
    bare = load_manifest(source, split_samples=sizes)
    assert all(s.samples is None and s.sha256 is None for s in bare.shards)
    assert {s.split for s in bare.shards} == {"train", "val"}
    # Equal batches per rank, sized from the configured count; exact-once evaluation over 2 ranks.
    assert len(train_batches(bare, tokenizer, rank=1, world=2)) == len(train_batches(local(root), tokenizer, rank=1, world=2))
    for world in (1, 2):
        assert eval_ids(bare, tokenizer, world=world) == eval_ids(local(root), tokenizer, world=world)
    assert verify(source, sizes)
    assert not verify(source, {**sizes, "val": sizes["val"] + 1})  # a wrong size is caught where it can be


def test_without_a_manifest_a_shard_of_unknown_split_is_named(unlisted):
    renamed = unlisted / "part-000000.tar"
    (unlisted / "train-000000.tar").rename(renamed)
    with pytest.raises(AdvcapError, match=r"part-000000.tar: cannot tell this shard's split"):
        load_manifest(f"pipe:cat {renamed}", split_samples={"train": 4})


# ---------------------------------------------------------------- failures


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, but answers the first `failures[path]` GETs of a path with 503."""

    failures: dict[str, int] = {}
    gets: dict[str, int] = {}

    def do_GET(self):
        self.gets[self.path] = self.gets.get(self.path, 0) + 1
        if self.failures.get(self.path, 0) > 0:
            self.failures[self.path] -= 1
            self.send_error(503, "busy")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky(served, monkeypatch):
    root, _ = served
    monkeypatch.setattr("advcap.data.location.FIRST_RETRY_PAUSE_S", 0.01)
    handler = lambda *a, **k: FlakyHandler(*a, directory=str(root), **k)  # noqa: E731
    FlakyHandler.failures, FlakyHandler.gets = {}, {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield FlakyHandler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_failed_fetch_is_retried_then_succeeds(served, flaky, tokenizer, caplog):
    root, _ = served
    handler, base = flaky
    first = shard_names(root, "test")[0]
    handler.failures = {f"/shards/{first}": 2, "/shards/manifest.json": 1}
    remote = load_manifest(f"{base}/shards/", retries=2)
    with caplog.at_level(logging.WARNING):
        got = eval_ids(remote, tokenizer, "test")
    assert got == eval_ids(local(root), tokenizer, "test")  # nothing lost
    assert handler.gets[f"/shards/{first}"] == 3
    assert "HTTP 503" in caplog.text and "retrying" in caplog.text


def test_a_fetch_that_keeps_failing_is_named_and_handled_like_a_corrupt_shard(served, flaky, tokenizer, caplog):
    root, _ = served
    handler, base = flaky
    first = shard_names(root, "test")[0]
    handler.failures = {f"/shards/{first}": 100}
    remote = load_manifest(f"{base}/shards/", retries=1)
    with caplog.at_level(logging.WARNING):
        got = eval_ids(remote, tokenizer, "test")[0]
    assert handler.gets[f"/shards/{first}"] == 2  # one try and one retry
    assert len(got) == local(root).samples("test") - 4  # that shard's 4 images missing, the rest evaluated
    assert f"{base}/shards/{first}: HTTP 503" in caplog.text and "tried 2 times" in caplog.text
    assert "skipping the rest of corrupt shard" in caplog.text


def test_missing_and_truncated_remote_shards_are_found_before_a_run(served, tmp_path):
    root, _ = served
    copy = tmp_path / "served" / "shards"
    shutil.copytree(root / "shards", copy)
    with http_server(copy.parent) as server:
        base = f"{server}/shards/"
        names = shard_names(root, "train")
        (copy / names[0]).unlink()
        (copy / names[1]).write_bytes((copy / names[1]).read_bytes()[:1000])
        problems = check_shards(load_manifest(base))
        assert problems == [f"{base}{names[0]}: HTTP 404 File not found",
                            f"{base}{names[1]}: 1000 bytes, the manifest says {(root / 'shards' / names[1]).stat().st_size} (truncated)"]
        assert not verify(base)


def test_a_failing_pipe_command_is_named(served, tmp_path):
    root, _ = served
    with pytest.raises(AdvcapError, match=r"pipe:cat /nonexistent/manifest.json: command exited with status 1: .*No such file"):
        load_manifest("pipe:cat /nonexistent/train-000000.tar", split_samples={}, retries=0)
    assert not verify(f"pipe:cat {root}/shards/train-000000.tar::pipe:cat /nonexistent/train-000001.tar",
                      {"train": 8}, retries=0)


def test_a_stalled_pipe_command_is_stopped_and_its_shard_handled_like_a_corrupt_one(served, tokenizer, tmp_path,
                                                                                     monkeypatch, caplog):
    """A command that writes half a shard and then hangs (a stalled object store) does not hang the reader:
    after FETCH_TIMEOUT_S without a byte it is stopped, with what it started, and the shard's rest skipped."""
    import os
    import time

    from advcap.data import location

    root, _ = served
    pid_file = tmp_path / "sleep.pid"
    script = tmp_path / "stall.sh"
    script.write_text(f"""case "$1" in
  *.tar) head -c $(( $(wc -c < "$1") / 2 )) "$1"; sleep 600 & echo $! > {pid_file}; wait;;
  *) cat "$1";;
esac
""")
    first, second = shard_names(root, "test")[:2]
    source = f"pipe:sh {script} {root}/shards/{first}::pipe:cat {root}/shards/{second}"
    monkeypatch.setattr(location, "FETCH_TIMEOUT_S", 2.0)  # generous: the suite may share the cores
    remote = load_manifest(source)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        got = eval_ids(remote, tokenizer, "test")[0]
    assert time.monotonic() - started < 30
    assert 4 <= len(got) < 8  # the second shard whole, the first up to where its command stalled
    assert f"{first}: the command wrote nothing for 2 s: stopped it" in caplog.text
    assert "skipping the rest of corrupt shard" in caplog.text
    sleeper = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the command's own child was stopped with it
        for _ in range(50):
            os.kill(sleeper, 0)
            time.sleep(0.1)


def test_closing_a_pipe_shard_early_stops_its_command_and_what_it_started(served, tmp_path):
    """A reader done with a shard before its end (a run that stops mid-shard) closes it: the command and the
    processes it started stop then, not when they would have finished, and no error is raised for them."""
    import os
    import time

    from advcap.data.location import open_url

    root, _ = served
    pid_file = tmp_path / "helper.pid"
    shard = root / "shards" / shard_names(root, "train")[0]
    # The shard, then a helper process that would hold the pipe open for ten minutes.
    command = f"pipe:sh -c 'cat {shard}; sleep 600 & echo $! > {pid_file}; wait'"
    stream = open_url(command, retries=0)
    assert stream.read(512) == shard.read_bytes()[:512]
    for _ in range(100):  # the helper starts once cat has written the whole (small) shard
        if pid_file.is_file() and pid_file.read_text().strip():
            break
        time.sleep(0.1)
    helper = int(pid_file.read_text())
    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < 10
    assert stream.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(helper, 0)
            time.sleep(0.1)


# ---------------------------------------------------------------- img2dataset's layout


def write_img2dataset_shards(out: Path, n_images: int, per_shard: int) -> dict[str, str]:
    """Shards laid out as img2dataset writes them: `{shard:05d}.tar` with `{key}.jpg`, `{key}.txt` (the
    caption) and `{key}.json` (its own metadata), plus `{shard:05d}_stats.json`. Returns key → caption."""
    import random

    rng = random.Random(3)
    out.mkdir(parents=True)
    captions = {}
    for shard in range(0, n_images // per_shard):
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                image = out / "tmp.jpg"
                write_image(image, 40, 30, shard * 100 + i)
                text = caption(rng)
                captions[key] = text
                meta = {"url": f"https://example.org/{key}.jpg", "key": key, "status": "success", "caption": text,
                        "error_message": None, "width": 40, "height": 30, "original_width": 80,
                        "original_height": 60, "exif": "{}", "sha256": "0" * 64}
                sink.write({"__key__": key, "jpg": image.read_bytes(), "txt": text, "json": meta})
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    (out / "tmp.jpg").unlink()
    return captions


def test_img2dataset_shards_are_read_as_they_are(tmp_path, tokenizer):
    captions = write_img2dataset_shards(tmp_path / "i2d", 12, 4)
    source = f"train=pipe:cat {tmp_path}/i2d/{{00000..00002}}.tar::val=file:{tmp_path}/i2d/00002.tar"
    manifest = load_manifest(source, split_samples={"train": 12, "val": 4})
    assert load_manifest(f"val=file:{tmp_path}/i2d/00002.tar", split_samples={"val": 4}).samples("val") == 4
    metas = list(split_metadata(manifest, "train"))
    assert {m.image_id: m.captions for m in metas} == {k: [c] for k, c in captions.items()}
    batches = train_batches(manifest, tokenizer)
    assert len(batches) == 4 and all(i in captions for b in batches for i in b["image_ids"])
    assert sorted(eval_ids(manifest, tokenizer, "train")[0]) == sorted(captions)
    assert verify(source, {"train": 12, "val": 4})
