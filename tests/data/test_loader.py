"""The streaming loaders: batch contract, determinism and resume, equal batches per rank,
exact-once evaluation over ranks and workers, corrupt shards, and no unpickling."""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from advcap.data.loader import EvalStream, TrainStream, make_loader
from advcap.data.manifest import load_manifest
from advcap.data.shardwriter import convert
from conftest import make_karpathy

IMAGE_SIZE = 24


@pytest.fixture
def shards(tmp_path):
    annotations, images = make_karpathy(tmp_path / "src", 40)
    convert("karpathy", annotations, images, tmp_path / "shards", shard_size=4)
    return load_manifest(tmp_path / "shards")


def train_stream(manifest, tokenizer, rank=0, world=1, workers=0, seed=0, max_tokens=8, batch=3):
    return TrainStream(manifest, tokenizer, IMAGE_SIZE, max_tokens, batch, seed, rank, world, workers, shuffle_buffer=6)


def batches(stream, workers):
    return list(make_loader(stream, workers))


def test_train_batch_contract(shards, tokenizer):
    batch = next(iter(train_stream(shards, tokenizer, max_tokens=5)))
    pixels, ids, labels = batch["pixels"], batch["input_ids"], batch["labels"]
    assert pixels.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and pixels.dtype == torch.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and pixels.std() > 0
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert ids.shape == labels.shape and ids.shape[1] <= 5  # truncated to max_tokens
    for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
        end = row_ids.index(eos)  # every caption ends in EOS, even when truncated
        assert row_labels[: end + 1] == row_ids[: end + 1]
        assert all(x == -100 for x in row_labels[end + 1 :]) and all(x == pad for x in row_ids[end + 1 :])
    assert len(batch["image_ids"]) == 3 and all(isinstance(i, str) for i in batch["image_ids"])


def test_pixels_match_vit_image_processor(shards, tokenizer):
    from transformers import ViTImageProcessor

    stream = EvalStream(shards, "test", tokenizer, IMAGE_SIZE, 8, batch_size=4)
    batch = next(iter(stream))
    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_normalize=False)
    with tarfile.open(Path(shards.split("test")[0].url)) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")][:4]
    expected = processor([Image.open(io.BytesIO(j)).convert("RGB") for j in jpgs], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixels"], expected, atol=1e-6, rtol=0)


def test_training_order_is_a_function_of_seed_epoch_rank(shards, tokenizer):
    def ids(**kw):
        return [b["image_ids"] for b in train_stream(shards, tokenizer, **kw)]

    assert ids(rank=0) == ids(rank=0)
    assert ids(rank=0) != ids(rank=1)
    assert ids(seed=0) != ids(seed=1)
    stream = train_stream(shards, tokenizer)
    stream.set_position(epoch=1)
    assert [b["image_ids"] for b in stream] != ids()


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_the_same_number_of_batches(shards, tokenizer, workers):
    counts = [len(batches(train_stream(shards, tokenizer, rank=r, world=2, workers=workers), workers)) for r in range(2)]
    train_images = shards.samples("train")
    assert counts[0] == counts[1] >= -(-train_images // (3 * 2))  # an epoch covers the split at least once


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_to_exactly_where_it_stopped(shards, tokenizer, workers):
    whole = batches(train_stream(shards, tokenizer, workers=workers), workers)
    for skip in (1, 3, 4):
        stream = train_stream(shards, tokenizer, workers=workers)
        stream.set_position(epoch=0, skip_batches=skip)
        tail = batches(stream, workers)
        assert [b["image_ids"] for b in tail] == [b["image_ids"] for b in whole[skip:]]
        assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(tail, whole[skip:]))


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_sees_every_image_exactly_once(shards, tokenizer, world, workers):
    seen: dict[str, int] = {}
    batch_of: dict[str, int] = {}
    per_rank = []
    for rank in range(world):
        stream = EvalStream(shards, "train", tokenizer, IMAGE_SIZE, 8, batch_size=4, rank=rank, world_size=world)
        ids = []
        for batch in batches(stream, workers):
            ids += batch["image_ids"]
            batch_of.update({i: batch["batch_index"] for i in batch["image_ids"]})
            assert len(batch["references"]) == len(batch["image_ids"]) == batch["pixels"].shape[0]
        per_rank.append(set(ids))
        for i in ids:
            seen[i] = seen.get(i, 0) + 1
    assert all(n == 1 for n in seen.values())
    assert len(seen) == shards.samples("train")
    if world == 2:
        assert not per_rank[0] & per_rank[1]
    # the same image lands in the same global batch whatever the world size and workers
    single = EvalStream(shards, "train", tokenizer, IMAGE_SIZE, 8, batch_size=4)
    reference = {i: b["batch_index"] for b in single for i in b["image_ids"]}
    assert batch_of == reference


def test_evaluation_limit_takes_the_first_images_in_global_order(shards, tokenizer):
    full = [i for b in EvalStream(shards, "train", tokenizer, IMAGE_SIZE, 8, batch_size=4) for i in b["image_ids"]]
    limited = [
        i
        for rank in range(2)
        for b in EvalStream(shards, "train", tokenizer, IMAGE_SIZE, 8, batch_size=4, rank=rank, world_size=2, limit=7)
        for i in b["image_ids"]
    ]
    assert sorted(limited) == sorted(full[:7])


def _epochs(stream, n, skip=0):
    """n epochs of a stream as one list (pixels, ids and image ids of each batch), from batch `skip` of epoch 0."""
    out = []
    for epoch in range(n):
        stream.set_position(epoch, skip if epoch == 0 else 0)
        out += [(b["pixels"], b["input_ids"], b["image_ids"]) for b in stream]
    return out


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("skip", [0, 4])
def test_the_shard_cache_changes_no_batch(shards, tokenizer, skip):
    def stream(cache_mb):
        return TrainStream(shards, tokenizer, IMAGE_SIZE, 8, 3, 0, 0, 1, 0, shuffle_buffer=6, cache_mb=cache_mb)

    cached = stream(1)
    assert _same(_epochs(cached, 3, skip), _epochs(stream(0), 3, skip))
    assert cached.cache.shards  # it did keep shards


def test_a_cached_shard_is_neither_read_nor_decoded_again(shards, tokenizer, caplog):
    reference = TrainStream(shards, tokenizer, IMAGE_SIZE, 8, 3, 0, 0, 1, 0, shuffle_buffer=6)
    cached = TrainStream(shards, tokenizer, IMAGE_SIZE, 8, 3, 0, 0, 1, 0, shuffle_buffer=6, cache_mb=1)
    _epochs(cached, 1)
    kept = dict(cached.cache.shards)
    assert kept and all(s["__advcap_decoded__"] for samples in kept.values() for s in samples)
    # Remove the kept shards from disk: the next epoch is the same wherever it draws them.
    expected = _epochs(reference, 2)[len(_epochs(reference, 1)):]
    for url in kept:
        Path(url).unlink()
    kept_ids = {s["__advcap_decoded__"][1].image_id for samples in kept.values() for s in samples}
    cached.set_position(1)
    with caplog.at_level(logging.WARNING):
        got = [(b["pixels"], b["input_ids"], b["image_ids"]) for b in cached]
    drew_kept = kept_ids.intersection(i for batch in got for i in batch[2])
    assert drew_kept and _same(got, expected)
    assert "corrupt shard" not in caplog.text


def test_a_shard_read_with_an_error_is_not_cached_and_the_budget_holds(shards, tokenizer, caplog):
    from advcap.data.loader import ShardCache

    victim = shards.split("train")[1].url
    Path(victim).write_bytes(Path(victim).read_bytes()[:1500])  # truncated mid-member
    stream = TrainStream(shards, tokenizer, IMAGE_SIZE, 8, 3, 0, 0, 1, 0, shuffle_buffer=6, cache_mb=1)
    with caplog.at_level(logging.WARNING):
        _epochs(stream, 4)
    assert caplog.text.count(f"corrupt shard {victim}") >= 2  # drawn, and read again: never kept
    assert stream.cache.shards and victim not in stream.cache.shards
    caplog.clear()

    one = stream.cache.shards[next(iter(stream.cache.shards))]
    cache = ShardCache(budget_bytes=1, image_size=IMAGE_SIZE)
    with caplog.at_level(logging.INFO):
        cache.offer("a.tar", one)
        cache.offer("b.tar", one)
    assert not cache.shards and cache.used == 0
    assert caplog.text.count("data cache full") == 1


def test_corrupt_shard_is_skipped_with_a_warning_and_training_goes_on(shards, tokenizer, caplog):
    victim = Path(shards.split("train")[1].url)
    victim.write_bytes(victim.read_bytes()[:1500])  # truncated mid-member
    with caplog.at_level(logging.WARNING):
        got = list(train_stream(shards, tokenizer))
    assert len(got) == train_stream(shards, tokenizer).batches_per_epoch
    assert victim.name in caplog.text and "corrupt shard" in caplog.text
    assert max(b["bad_shards"] for b in got) >= 1
    stream = EvalStream(shards, "train", tokenizer, IMAGE_SIZE, 8, batch_size=4)
    evaluated = sum(len(b["image_ids"]) for b in stream)
    assert shards.samples("train") - 4 <= evaluated < shards.samples("train")


def test_pickle_members_are_never_loaded(shards, tokenizer, tmp_path):
    canary = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (canary,))

    shard = Path(shards.split("test")[0].url)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    key = members[0][0].name.partition(".")[0]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
        payload = pickle.dumps(Exploit())
        info = tarfile.TarInfo(f"{key}.pyd")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    got = list(EvalStream(shards, "test", tokenizer, IMAGE_SIZE, 8, batch_size=4))
    assert not canary.exists()
    assert sum(len(b["image_ids"]) for b in got) == shards.samples("test")
    assert set(got[0]) == {"pixels", "input_ids", "labels", "batch_index", "image_ids", "references"}


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _meta(**fields) -> bytes:
    return json.dumps({"image_id": "good", "captions": ["a red circle"], "split": "train", **fields}).encode()


@pytest.fixture
def bad_samples(shards, tmp_path):
    """A one-shard train set in which 12 of 14 samples are bad in a different way each."""
    with tarfile.open(Path(shards.split("train")[0].url)) as tar:
        jpg = next(tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg"))
    samples = [
        ("ok_first", {"jpg": jpg, "json": _meta(image_id="first")}),
        ("no_json", {"jpg": jpg}),
        ("no_jpg", {"json": _meta()}),
        ("json_list", {"jpg": jpg, "json": b'["a red circle"]'}),
        ("no_captions", {"jpg": jpg, "json": json.dumps({"image_id": "x"}).encode()}),
        ("empty_captions", {"jpg": jpg, "json": _meta(captions=[])}),
        ("captions_str", {"jpg": jpg, "json": _meta(captions="a red circle")}),
        ("blank_captions", {"jpg": jpg, "json": _meta(captions=["  ", 5, None])}),
        ("surrogate_only", {"jpg": jpg, "json": _meta(captions=["\ud800 a lone half"])}),
        ("int_image_id", {"jpg": jpg, "json": _meta(image_id=17)}),
        ("json_not_utf8", {"jpg": jpg, "json": b'{"image_id": "\xff\xfe", "captions": ["x"]}'}),
        ("jpg_corrupt", {"jpg": jpg[:40], "json": _meta()}),
        ("ok_mixed", {"jpg": jpg, "json": _meta(image_id="mixed", captions=["\udc80 bad", " ", "a good one"])}),
        ("json_too_deep", {"jpg": jpg, "json": b"[" * 100_000 + b"]" * 100_000}),
    ]
    root = tmp_path / "bad"
    root.mkdir()
    shard = root / "train-000000.tar"
    _tar(shard, [(f"{key}.{ext}", data) for key, sample in samples for ext, data in sorted(sample.items())])
    entry = {"name": shard.name, "split": "train", "samples": len(samples), "sha256": "-", "bytes": shard.stat().st_size}
    (root / "manifest.json").write_text(json.dumps({"complete": True, "shards": [entry]}))
    return load_manifest(root)


BAD_KEYS = ["no_json", "no_jpg", "json_list", "no_captions", "empty_captions", "captions_str", "blank_captions",
            "surrogate_only", "int_image_id", "json_not_utf8", "jpg_corrupt", "json_too_deep"]


def test_bad_samples_are_skipped_and_counted_in_training(bad_samples, tokenizer, caplog):
    # One batch of exactly the shard's 14 samples in file order (a shuffle buffer of 1 keeps the order).
    stream = TrainStream(bad_samples, tokenizer, IMAGE_SIZE, 16, 14, 0, 0, 1, 0, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING):
        [batch] = list(stream)
    assert batch["image_ids"] == ["first", "mixed"]
    assert batch["bad_samples"] == 12 and batch["bad_shards"] == 0
    assert batch["pixels"].shape[0] == 2
    mixed = batch["input_ids"][1].tolist()
    assert tokenizer.decode(mixed[: mixed.index(tokenizer.eos_token_id)]).strip() == "a good one"
    warned = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert len(warned) == 12
    for key, message in zip(BAD_KEYS, warned):
        assert f"skipping bad sample {key} in {bad_samples.shards[0].url}" in message


def test_bad_samples_are_skipped_in_evaluation(bad_samples, tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        batches = list(EvalStream(bad_samples, "train", tokenizer, IMAGE_SIZE, 8, batch_size=4))
    assert [i for b in batches for i in b["image_ids"]] == ["first", "mixed"]
    assert [r for b in batches for r in b["references"]] == [["a red circle"], ["a good one"]]
    assert caplog.text.count("skipping bad sample") == 12
    assert "no .json member" in caplog.text and "no .jpg member" in caplog.text
    assert "image_id is int 17" in caplog.text and "json is a list" in caplog.text
