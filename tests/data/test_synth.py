"""The demo caption set: determinism, Karpathy schema, captions that match the pictures, BLEU that rewards looking."""

from __future__ import annotations

import collections
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from nltk.translate.bleu_score import corpus_bleu
from PIL import Image

from advcap.cli import main as cli_main
from advcap.data import synth
from advcap.errors import AdvcapError

N_IMAGES = 40
SIZE = 64

# The vocabulary a reader of the captions would expect, written out here rather than read from the module,
# so a wrong synonym table in synth.py fails these tests.
SHAPE_SYNONYMS = {
    "circle": {"circle", "disc"},
    "square": {"square", "box"},
    "triangle": {"triangle"},
    "diamond": {"diamond", "rhombus"},
    "star": {"star"},
}
SHAPE_OF_WORD = {word: shape for shape, words in SHAPE_SYNONYMS.items() for word in words}
COLOR_NAMES = {"red", "orange", "yellow", "green", "blue", "purple", "pink"}
SIZE_SYNONYMS = {"large": {"large", "big"}, "small": {"small", "little", "tiny"}}
SIZE_OF_WORD = {word: size for size, words in SIZE_SYNONYMS.items() for word in words}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """One demo set shared by the read-only tests."""
    out = tmp_path_factory.mktemp("demo")
    synth.generate(out, n_images=N_IMAGES, seed=0, size=SIZE)
    return out


def _load(out: Path) -> dict:
    return json.loads((out / "captions.json").read_text(encoding="utf-8"))


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _objects(entry: dict) -> list[dict]:
    return entry["scene"]["objects"]


def _mentions(tokens: list[str]) -> list[tuple[int, str, str]]:
    """(index of the shape word, colour, shape) for every 'colour shape-word' in a caption."""
    return [
        (i, tokens[i - 1], SHAPE_OF_WORD[word])
        for i, word in enumerate(tokens)
        if word in SHAPE_OF_WORD and i > 0 and tokens[i - 1] in COLOR_NAMES
    ]


def _find(entry: dict, color: str, shape: str) -> dict:
    matches = [o for o in _objects(entry) if o["color"] == color and o["shape"] == shape]
    assert len(matches) == 1, f"{color} {shape} is not exactly one object of {entry['scene']}"
    return matches[0]


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files(tmp_path, demo):
    synth.generate(tmp_path, n_images=N_IMAGES, seed=0, size=SIZE)
    again, first = _files(tmp_path), _files(demo)
    assert sorted(again) == sorted(first)
    assert len(again) == N_IMAGES + 1  # images + captions.json, no leftover temporary file
    for name in first:
        assert again[name] == first[name], f"{name} differs between two runs with the same seed"


def test_different_seed_gives_a_different_set(tmp_path, demo):
    synth.generate(tmp_path, n_images=N_IMAGES, seed=1, size=SIZE)
    other, first = _files(tmp_path), _files(demo)
    assert other["captions.json"] != first["captions.json"]
    differing = sum(other[name] != first[name] for name in first if name.endswith(".jpg"))
    assert differing == N_IMAGES
    scenes = [e["scene"] for e in _load(demo)["images"]]
    assert scenes != [e["scene"] for e in _load(tmp_path)["images"]]


def test_scene_i_does_not_depend_on_the_number_of_images(tmp_path, demo):
    synth.generate(tmp_path, n_images=10, seed=0, size=SIZE)
    small, large = _load(tmp_path)["images"], _load(demo)["images"][:10]
    for a, b in zip(small, large):
        assert (a["scene"], a["sentences"]) == (b["scene"], b["sentences"])
        assert (tmp_path / "images" / a["filename"]).read_bytes() == (demo / "images" / b["filename"]).read_bytes()


# ---------------------------------------------------------------------------------------------- schema


def test_captions_json_follows_the_karpathy_split_format(demo):
    data = _load(demo)
    assert set(data) == {"dataset", "images"}
    assert data["dataset"] == "advcap-demo"
    images = data["images"]
    assert len(images) == N_IMAGES
    assert [e["imgid"] for e in images] == list(range(N_IMAGES))  # unique, in file order
    all_sentids = []
    for entry in images:
        assert set(entry) == {"filename", "imgid", "split", "sentences", "sentids", "scene"}  # no filepath
        assert entry["filename"] == f"scene_{entry['imgid']:06d}.jpg"
        assert (demo / "images" / entry["filename"]).is_file()
        assert entry["split"] in {"train", "val", "test"}
        assert len(entry["sentences"]) == 5
        assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        all_sentids += entry["sentids"]
        for sentence in entry["sentences"]:
            assert set(sentence) == {"raw", "tokens", "imgid", "sentid"}
            assert sentence["imgid"] == entry["imgid"]
            assert sentence["tokens"] == re.findall(r"[a-z]+", sentence["raw"].lower())
            assert " ".join(sentence["tokens"]) == re.sub(r"[^a-z ]", "", sentence["raw"].lower())
            assert 5 <= len(sentence["tokens"]) <= 16, sentence["raw"]
        scene = entry["scene"]
        assert scene["background"] in {"white", "grey", "black", "navy"}
        assert 1 <= len(scene["objects"]) <= 3
        for obj in scene["objects"]:
            assert obj["shape"] in SHAPE_SYNONYMS and obj["color"] in COLOR_NAMES and obj["size"] in SIZE_SYNONYMS
            assert 0 < obj["x"] < 1 and 0 < obj["y"] < 1
    assert len(set(all_sentids)) == len(all_sentids)
    assert collections.Counter(e["split"] for e in images) == {"train": 32, "val": 4, "test": 4}


@pytest.mark.parametrize("n_images", [1, 2, 3, 4, 7, 10, 14, 15, 1000])
def test_splits_are_80_10_10_and_never_empty_from_three_images(n_images):
    splits = synth.assign_splits(n_images, seed=0)
    counts = collections.Counter(splits)
    assert len(splits) == n_images and sum(counts.values()) == n_images
    if n_images >= 3:
        assert counts["train"] >= 1 and counts["val"] >= 1 and counts["test"] >= 1
    assert counts["test"] == max(int(n_images / 10 + 0.5), 1 if n_images >= 2 else 0)
    assert counts["val"] == max(int(n_images / 10 + 0.5), 1 if n_images >= 3 else 0)
    if n_images == 1000:
        assert counts == {"train": 800, "val": 100, "test": 100}


def test_split_assignment_is_seeded():
    assert synth.assign_splits(100, seed=3) == synth.assign_splits(100, seed=3)
    assert synth.assign_splits(100, seed=3) != synth.assign_splits(100, seed=4)


def test_object_sizes_follow_the_size_classes(demo):
    for entry in _load(demo)["images"]:
        for obj in _objects(entry):
            low, high = {"small": (0.18, 0.22), "large": (0.32, 0.38)}[obj["size"]]
            assert low <= obj["extent"] <= high


def test_objects_do_not_overlap_much(demo):
    for entry in _load(demo)["images"]:
        for a, b in itertools.combinations(_objects(entry), 2):
            reach = 0.9 * (a["extent"] + b["extent"]) / 2
            assert abs(a["x"] - b["x"]) >= reach or abs(a["y"] - b["y"]) >= reach, entry["scene"]


# ------------------------------------------------------------------------------------ captions vs scenes


def test_every_caption_names_exactly_the_scene_colours_and_shapes(demo):
    for entry in _load(demo)["images"]:
        objects = _objects(entry)
        for sentence in entry["sentences"]:
            tokens = sentence["tokens"]
            for obj in objects:
                assert obj["color"] in tokens, (sentence["raw"], entry["scene"])
                assert SHAPE_SYNONYMS[obj["shape"]] & set(tokens), (sentence["raw"], entry["scene"])
            # …and nothing that is not there: a caption must be read off this image.
            assert {t for t in tokens if t in COLOR_NAMES} == {o["color"] for o in objects}, sentence["raw"]
            assert {SHAPE_OF_WORD[t] for t in tokens if t in SHAPE_OF_WORD} == {o["shape"] for o in objects}
            assert {(c, s) for _, c, s in _mentions(tokens)} == {(o["color"], o["shape"]) for o in objects}


def test_single_object_captions_name_its_colour_and_shape(demo):
    singles = [e for e in _load(demo)["images"] if len(_objects(e)) == 1]
    assert singles, "the demo set should hold single-object scenes"
    for entry in singles:
        (obj,) = _objects(entry)
        for sentence in entry["sentences"]:
            mentions = _mentions(sentence["tokens"])
            assert [(c, s) for _, c, s in mentions] == [(obj["color"], obj["shape"])], sentence["raw"]


def test_size_words_match_the_objects(demo):
    checked = 0
    for entry in _load(demo)["images"]:
        for sentence in entry["sentences"]:
            tokens = sentence["tokens"]
            for i, color, shape in _mentions(tokens):
                if i >= 2 and tokens[i - 2] in SIZE_OF_WORD:
                    assert SIZE_OF_WORD[tokens[i - 2]] == _find(entry, color, shape)["size"], sentence["raw"]
                    checked += 1
    assert checked > 50  # sizes are mentioned often enough to matter


def _relation_holds(relation: str, a: dict, b: dict) -> bool:
    """True if `a` is `relation` `b` along the axis that separates them most."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    horizontal = abs(dx) >= abs(dy)
    return {
        "left": horizontal and dx < 0,
        "right": horizontal and dx > 0,
        "above": not horizontal and dy < 0,
        "below": not horizontal and dy > 0,
    }[relation]


def test_relations_follow_the_positions(demo):
    checked = 0
    for entry in _load(demo)["images"]:
        for sentence in entry["sentences"]:
            tokens = sentence["tokens"]
            mentions = _mentions(tokens)
            for i, word in enumerate(tokens):
                if word in ("left", "right") and i + 1 < len(tokens) and tokens[i + 1] == "of":
                    relation = word
                elif word in ("above", "below", "under"):
                    relation = "below" if word == "under" else word
                else:
                    continue
                # 'A <relation> B': A is the last object named before the relation, B the first after it.
                a = _find(entry, *[(c, s) for j, c, s in mentions if j < i][-1])
                b = _find(entry, *[(c, s) for j, c, s in mentions if j > i][0])
                assert _relation_holds(relation, a, b), (sentence["raw"], entry["scene"])
                checked += 1
    assert checked > 20


def test_left_right_and_top_bottom_phrases_follow_the_positions(demo):
    checked = 0
    for entry in _load(demo)["images"]:
        for sentence in entry["sentences"]:
            raw = sentence["raw"]
            named = [_find(entry, c, s) for _, c, s in _mentions(sentence["tokens"])]
            if "on the left and" in raw or "from left to right" in raw:
                assert [o["x"] for o in named] == sorted(o["x"] for o in named), raw
                checked += 1
            if "at the top and" in raw or "from top to bottom" in raw:
                assert [o["y"] for o in named] == sorted(o["y"] for o in named), raw
                checked += 1
    assert checked > 5


def test_a_lone_object_is_placed_where_the_caption_says(demo):
    for entry in _load(demo)["images"]:
        if len(_objects(entry)) != 1:
            continue
        (obj,) = _objects(entry)
        for sentence in entry["sentences"]:
            words = set(sentence["tokens"])
            assert ("left" in words) <= (obj["x"] < 1 / 3), sentence["raw"]
            assert ("right" in words) <= (obj["x"] > 2 / 3), sentence["raw"]
            assert ("top" in words) <= (obj["y"] < 1 / 3), sentence["raw"]
            assert ("bottom" in words) <= (obj["y"] > 2 / 3), sentence["raw"]
            assert ("middle" in words) <= (1 / 3 <= obj["x"] <= 2 / 3 and 1 / 3 <= obj["y"] <= 2 / 3)


def test_background_words_name_the_background(demo):
    mentioned = 0
    for entry in _load(demo)["images"]:
        for sentence in entry["sentences"]:
            if "background" in sentence["tokens"]:
                assert f"{entry['scene']['background']} background" in sentence["raw"]
                mentioned += 1
    assert 0 < mentioned < 5 * N_IMAGES / 2  # sometimes, not always


def test_relation_picks_the_axis_that_separates_most():
    def obj(x: float, y: float) -> synth.SceneObject:
        return synth.SceneObject("circle", "red", "small", x, y, 0.2)

    assert synth.relation(obj(0.2, 0.5), obj(0.8, 0.4)) == "left of"
    assert synth.relation(obj(0.8, 0.5), obj(0.2, 0.6)) == "right of"
    assert synth.relation(obj(0.5, 0.2), obj(0.4, 0.8)) == "above"
    assert synth.relation(obj(0.5, 0.9), obj(0.6, 0.3)) == "below"


# ---------------------------------------------------------------------------------------- captions vary


def test_the_five_captions_of_an_image_differ(demo):
    for entry in _load(demo)["images"]:
        raws = [s["raw"] for s in entry["sentences"]]
        assert len(set(raws)) == 5, raws


def test_the_set_uses_many_templates_and_synonyms(demo):
    skeletons, words = set(), collections.Counter()
    content = COLOR_NAMES | set(SHAPE_OF_WORD) | set(SIZE_OF_WORD) | {"white", "grey", "black", "navy"}
    for entry in _load(demo)["images"]:
        for sentence in entry["sentences"]:
            words.update(sentence["tokens"])
            skeletons.add(" ".join("_" if t in content else t for t in sentence["tokens"]))
    assert len(skeletons) >= 15
    for synonyms in [*SHAPE_SYNONYMS.values(), *SIZE_SYNONYMS.values()]:
        assert all(words[w] > 0 for w in synonyms), synonyms
    for phrase_word in ("two", "three", "shapes", "background", "picture"):
        assert words[phrase_word] > 0, phrase_word
    assert len(words) <= 80  # a small vocabulary: a tiny model trains on it on CPU


def test_a_caption_model_that_does_not_look_scores_clearly_lower():
    """BLEU-4 of one annotator against the other four, versus the best single caption said for every image."""
    references, hypotheses = [], []
    for i in range(300):  # captions only, no rendering: cheap
        scene = synth.sample_scene(np.random.default_rng([7, i, 0]))
        captions = [synth.tokenize(c) for c in synth.caption_scene(scene, np.random.default_rng([7, i, 2]))]
        hypotheses.append(captions[0])
        references.append(captions[1:])
    looking = corpus_bleu(references, hypotheses)
    common = collections.Counter(tuple(c) for refs in references for c in refs).most_common(30)
    blind = max(corpus_bleu(references, [list(c)] * len(references)) for c, _ in common)
    assert looking > 0.35
    assert looking > 1.8 * blind, (looking, blind)


# -------------------------------------------------------------------------------------- pictures vs scenes


def _nearest(pixel: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((pixel - np.array(palette[name])) ** 2)))


def test_images_are_rgb_jpegs_of_the_requested_size(demo):
    for entry in _load(demo)["images"]:
        with Image.open(demo / "images" / entry["filename"]) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))


def test_pixels_show_the_objects_and_background_of_the_scene(demo):
    # A coarse grid of points; those outside every object's box must show the background.
    grid = [(gx + 0.5) / 16 for gx in range(16)]
    for entry in _load(demo)["images"]:
        pixels = np.asarray(Image.open(demo / "images" / entry["filename"]).convert("RGB"), dtype=np.float32)
        for obj in _objects(entry):
            centre = pixels[int(obj["y"] * SIZE), int(obj["x"] * SIZE)]
            assert _nearest(centre, synth.COLORS) == obj["color"], (obj, centre)
            assert np.abs(centre - np.array(synth.COLORS[obj["color"]])).max() < 40, (obj, centre)
        free = [
            (x, y)
            for x, y in itertools.product(grid, grid)
            if all(max(abs(x - o["x"]), abs(y - o["y"])) > o["extent"] / 2 + 2 / SIZE for o in _objects(entry))
        ]
        assert free
        for x, y in free[:: max(1, len(free) // 8)]:
            pixel = pixels[int(y * SIZE), int(x * SIZE)]
            assert _nearest(pixel, synth.BACKGROUNDS) == entry["scene"]["background"], (x, y, pixel)
            assert np.abs(pixel - np.array(synth.BACKGROUNDS[entry["scene"]["background"]])).max() < 40


def test_colours_are_far_apart_in_rgb():
    colors = {k: np.array(v, dtype=float) for k, v in synth.COLORS.items()}
    backgrounds = {k: np.array(v, dtype=float) for k, v in synth.BACKGROUNDS.items()}
    assert set(colors) == COLOR_NAMES
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(colors.values(), 2)) >= 90
    assert min(np.linalg.norm(a - b) for a in colors.values() for b in backgrounds.values()) >= 80


# ------------------------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": 15}, "--size"),
        ({"size": 225}, "--size"),
        ({"size": 64.0}, "--size"),
        ({"n_images": 0}, "--images"),
        ({"n_images": -3}, "--images"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_invalid_arguments_raise_advcap_error(tmp_path, kwargs, message):
    args = {"n_images": 2, "seed": 0, "size": 64} | kwargs
    with pytest.raises(AdvcapError, match=message):
        synth.generate(tmp_path / "out", **args)
    assert not (tmp_path / "out" / "captions.json").exists()


def test_out_must_not_be_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdvcapError, match="not a directory"):
        synth.generate(tmp_path / "file", n_images=1)


def test_an_interrupted_run_leaves_no_captions_json(tmp_path, monkeypatch):
    synth.generate(tmp_path, n_images=3, seed=0, size=SIZE)  # an older, complete set in the same place
    real_render, calls = synth.render_scene, []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synth, "render_scene", failing_render)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(tmp_path, n_images=5, seed=1, size=SIZE)
    assert not (tmp_path / "captions.json").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_writes_the_set_and_reports_bad_sizes(tmp_path, capsys):
    cli_main(["synth", "--out", str(tmp_path / "cli"), "--images", "3", "--size", "32", "--seed", "5"])
    data = _load(tmp_path / "cli")
    assert len(data["images"]) == 3
    assert {e["split"] for e in data["images"]} == {"train", "val", "test"}
    with Image.open(tmp_path / "cli" / "images" / "scene_000000.jpg") as image:
        assert image.size == (32, 32)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["synth", "--out", str(tmp_path / "bad"), "--size", "8"])
    assert exit_info.value.code == 2
    assert "--size" in capsys.readouterr().err


@pytest.mark.parametrize("size", [16, 224])
def test_the_smallest_and_largest_sizes_render(tmp_path, size):
    synth.generate(tmp_path, n_images=2, seed=0, size=size)
    for entry in _load(tmp_path)["images"]:
        with Image.open(tmp_path / "images" / entry["filename"]) as image:
            assert (image.mode, image.size) == ("RGB", (size, size))
