"""The built-in demo caption set: rendered scenes of shapes, five varied captions each.

`generate(out, n_images, seed, size)` writes

    OUT/images/scene_000000.jpg …   RGB JPEG, size×size pixels
    OUT/captions.json               Karpathy split format (as `dataset_flickr8k.json`: no `filepath`),
                                    plus a `scene` entry per image: the ground-truth objects and background

A scene holds 1–3 objects (shape × colour × size × position) on a tinted background. Its five captions are
written the way five annotators would describe it: different templates, synonyms, word orders, counts and
spatial relations, but always naming every object's colour and shape, so a captioner has to look at the
image to score well on BLEU, while one that always says the most common phrase does clearly worse.

Everything is drawn from seeded NumPy generators, one per (seed, image, purpose): the same seed gives
byte-identical files, scene i does not depend on how many scenes are rendered, and changing the caption
templates never changes the pictures.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

DATASET_NAME = "advcap-demo"
CAPTIONS_FILE = "captions.json"
IMAGE_DIR = "images"
CAPTIONS_PER_IMAGE = 5
MIN_SIZE, MAX_SIZE = 16, 224  # image side in pixels
JPEG_QUALITY = 95
MIN_WORDS, MAX_WORDS = 5, 16  # caption length in tokens

SHAPES = ("circle", "square", "triangle", "diamond", "star")
# Object colours: far apart in RGB (pairwise distance ≥ 90) and from every background (≥ 80), so they stay
# nameable after JPEG, resizing to 32 px and ±OBJECT_JITTER.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 125, 20),
    "yellow": (240, 220, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "purple": (135, 50, 175),
    "pink": (250, 140, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 235),
    "grey": (125, 125, 125),
    "black": (25, 25, 28),
    "navy": (20, 30, 75),
}
# Side of an object's bounding box as a fraction of the image side: survives resizing to 32 px (small ≥ 5 px).
SIZES: dict[str, tuple[float, float]] = {"small": (0.18, 0.22), "large": (0.32, 0.38)}
OBJECT_COUNT_WEIGHTS = {1: 0.3, 2: 0.4, 3: 0.3}

BACKGROUND_JITTER = 10  # ± levels per channel, per image
GRADIENT_MAX = 16  # levels between opposite corners of the background, at most
OBJECT_JITTER = 12  # ± levels per channel, per object
NOISE_STD = 3.0  # levels of Gaussian pixel noise over the whole image
SUPERSAMPLE = 4  # shapes are drawn at 4× and box-filtered down: anti-aliased edges without blur
MARGIN = 0.03  # objects keep this fraction of the side away from the border
OVERLAP = 0.9  # bounding boxes shrunk to 90% may not intersect: corners may touch, centres stay uncovered
PLACEMENT_TRIES = 100

# Random streams: each purpose gets its own generator so one never shifts another.
_STREAM_SCENE, _STREAM_RENDER, _STREAM_CAPTIONS, _STREAM_SPLIT = range(4)

# Annotator vocabulary: (word, weight). The first word is the usual one; synonyms are rarer, as in real data.
SHAPE_WORDS: dict[str, tuple[tuple[str, float], ...]] = {
    "circle": (("circle", 4.0), ("disc", 1.0)),
    "square": (("square", 4.0), ("box", 1.0)),
    "triangle": (("triangle", 1.0),),
    "diamond": (("diamond", 4.0), ("rhombus", 1.0)),
    "star": (("star", 1.0),),
}
SIZE_WORDS: dict[str, tuple[tuple[str, float], ...]] = {
    "large": (("large", 3.0), ("big", 2.0)),
    "small": (("small", 3.0), ("little", 1.0), ("tiny", 1.0)),
}
RELATION_WORDS: dict[str, tuple[tuple[str, float], ...]] = {
    "left of": (("left of", 2.0), ("to the left of", 1.0)),
    "right of": (("right of", 2.0), ("to the right of", 1.0)),
    "above": (("above", 1.0),),
    "below": (("below", 2.0), ("under", 1.0)),
}
PICTURE_WORDS = (("a picture of", 2.0), ("an image of", 1.0), ("a drawing of", 1.0))
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
GROUP_NOUNS = (("shapes", 3.0), ("objects", 1.0))
SIZE_WORD_PROBABILITY = 0.6  # how often an annotator mentions sizes


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. Positions are fractions of the image side (0 = left/top edge)."""

    shape: str
    color: str
    size: str  # "small" | "large"
    x: float  # centre of the bounding box, 0..1 from the left
    y: float  # centre of the bounding box, 0..1 from the top
    extent: float  # side of the bounding box, fraction of the image side

    def to_json(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "x": self.x,
            "y": self.y,
            "extent": self.extent,
        }


@dataclass(frozen=True)
class Scene:
    """A background name and 1–3 objects, ordered left to right."""

    background: str
    objects: tuple[SceneObject, ...]

    def to_json(self) -> dict:
        return {"background": self.background, "objects": [o.to_json() for o in self.objects]}


# ---------------------------------------------------------------------------------------------- entry point


def generate(out: str | Path, n_images: int = 1000, seed: int = 0, size: int = 64) -> Path:
    """Render `n_images` scenes of `size`×`size` pixels into `out` and return the path of captions.json.

    Splits are 80/10/10 train/val/test by a seeded permutation (every split non-empty from 3 images on).
    The output is byte-identical for the same arguments; captions.json is written last and atomically, so an
    interrupted run leaves none.
    """
    _check_args(n_images, seed, size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdvcapError(f"--out {out} exists and is not a directory")
    image_dir = out / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    captions_path = out / CAPTIONS_FILE
    # An older captions.json would describe images this run is about to overwrite.
    captions_path.unlink(missing_ok=True)

    log.info("rendering %d demo scenes of %d×%d px (seed %d) into %s", n_images, size, size, seed, out)
    splits = assign_splits(n_images, seed)
    entries = []
    for imgid in tqdm(range(n_images), desc="synth", unit="img", disable=None):
        scene = sample_scene(_rng(seed, imgid, _STREAM_SCENE))
        filename = f"scene_{imgid:06d}.jpg"
        image = render_scene(scene, size, _rng(seed, imgid, _STREAM_RENDER))
        image.save(image_dir / filename, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        captions = caption_scene(scene, _rng(seed, imgid, _STREAM_CAPTIONS))
        entries.append(_image_entry(imgid, filename, splits[imgid], scene, captions))

    _write_json_atomic(captions_path, {"dataset": DATASET_NAME, "images": entries})
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    log.info("wrote %s: %d images (train %d, val %d, test %d)", captions_path, n_images, *counts.values())
    return captions_path


def _check_args(n_images: int, seed: int, size: int) -> None:
    def is_int(value: object) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not is_int(n_images) or n_images < 1:
        raise AdvcapError(f"--images must be a whole number ≥ 1 (got {n_images!r})")
    if not is_int(size) or not MIN_SIZE <= size <= MAX_SIZE:
        raise AdvcapError(f"--size must be a whole number of pixels in {MIN_SIZE}..{MAX_SIZE} (got {size!r})")
    if not is_int(seed) or seed < 0:
        raise AdvcapError(f"--seed must be a whole number ≥ 0 (got {seed!r})")


def _rng(seed: int, imgid: int, stream: int) -> np.random.Generator:
    """An independent generator per (seed, image, purpose)."""
    return np.random.default_rng([int(seed), int(imgid), stream])


def assign_splits(n_images: int, seed: int) -> list[str]:
    """Split name per imgid: 10% test and 10% val (rounded half up) by a seeded permutation, the rest train.

    From 2 images on, test gets at least one; from 3 on, val too.
    """
    n_test = max(int(0.1 * n_images + 0.5), 1 if n_images >= 2 else 0)
    n_val = max(int(0.1 * n_images + 0.5), 1 if n_images >= 3 else 0)
    order = np.random.default_rng([int(seed), _STREAM_SPLIT]).permutation(n_images)
    splits = ["train"] * n_images
    for rank, imgid in enumerate(order[: n_test + n_val]):
        splits[int(imgid)] = "test" if rank < n_test else "val"
    return splits


def _image_entry(imgid: int, filename: str, split: str, scene: Scene, captions: Sequence[str]) -> dict:
    """One `images[]` entry of a Karpathy split file, plus the ground-truth `scene`."""
    sentids = [imgid * CAPTIONS_PER_IMAGE + k for k in range(len(captions))]
    return {
        "filename": filename,
        "imgid": imgid,
        "split": split,
        "sentences": [
            {"raw": raw, "tokens": tokenize(raw), "imgid": imgid, "sentid": sentid}
            for raw, sentid in zip(captions, sentids)
        ],
        "sentids": sentids,
        "scene": scene.to_json(),
    }


def tokenize(raw: str) -> list[str]:
    """Karpathy-style tokens: lowercase words, punctuation dropped."""
    return re.findall(r"[a-z]+", raw.lower())


def _write_json_atomic(path: Path, data: dict) -> None:
    # A reader sees either no captions.json or a complete one, never a half-written file.
    from advcap import atomic

    atomic.write_text(path, json.dumps(data, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------- scenes


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a background and 1–3 objects with distinct (shape, colour) that barely overlap.

    Distinct pairs keep every caption unambiguous ("the red circle" names exactly one object).
    """
    background = str(rng.choice(list(BACKGROUNDS)))
    counts = list(OBJECT_COUNT_WEIGHTS)
    weights = np.array(list(OBJECT_COUNT_WEIGHTS.values()))
    n_objects = int(rng.choice(counts, p=weights / weights.sum()))
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    chosen = rng.choice(len(pairs), size=n_objects, replace=False)
    objects: list[SceneObject] = []
    for index in chosen:
        shape, color = pairs[int(index)]
        placed = _place(rng, shape, color, str(rng.choice(list(SIZES))), objects)
        if placed is None:  # rare crowded layout: a small object fits more easily
            placed = _place(rng, shape, color, "small", objects)
        if placed is not None:  # else the scene simply has one object fewer
            objects.append(placed)
    return Scene(background, tuple(sorted(objects, key=lambda o: (o.x, o.y))))


def _place(
    rng: np.random.Generator, shape: str, color: str, size: str, others: Sequence[SceneObject]
) -> SceneObject | None:
    """Rejection-sample a position that keeps clear of `others`; None after PLACEMENT_TRIES failures."""
    for _ in range(PLACEMENT_TRIES):
        extent = round(float(rng.uniform(*SIZES[size])), 3)
        low, high = MARGIN + extent / 2, 1 - MARGIN - extent / 2
        # Rounded here so that the metadata is exactly what gets drawn.
        x, y = (round(float(v), 3) for v in rng.uniform(low, high, size=2))
        candidate = SceneObject(shape, color, size, x, y, extent)
        if all(not _too_close(candidate, other) for other in others):
            return candidate
    return None


def _too_close(a: SceneObject, b: SceneObject) -> bool:
    reach = OVERLAP * (a.extent + b.extent) / 2
    return abs(a.x - b.x) < reach and abs(a.y - b.y) < reach


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where `a` is relative to `b` along the axis that separates them most: left of | right of | above | below."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


# ----------------------------------------------------------------------------------------------- pictures


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` as an RGB image of `size`×`size` pixels (tint, gradient and noise from `rng`)."""
    canvas = size * SUPERSAMPLE
    image = Image.fromarray(_background(scene.background, canvas, rng))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        jitter = rng.integers(-OBJECT_JITTER, OBJECT_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLORS[obj.color]) + jitter, 0, 255))
        _draw_shape(draw, obj, canvas, fill)
    image = image.resize((size, size), Image.Resampling.BOX)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, NOISE_STD, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mode="RGB")


def _background(name: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """A (side, side, 3) uint8 background: the named tint, jittered, with a faint linear gradient."""
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    base += rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(0, GRADIENT_MAX)
    ramp = np.linspace(-0.5, 0.5, side, dtype=np.float32)
    # Projection of each pixel on the gradient direction, in -0.7..0.7 (half the diagonal).
    along = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    pixels = base[None, None, :] + (amplitude / np.sqrt(2)) * along[:, :, None]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, canvas: int, fill: tuple[int, ...]) -> None:
    """Fill `obj`'s shape inside its bounding box; every shape covers the box centre (x, y)."""
    cx, cy, r = obj.x * canvas, obj.y * canvas, obj.extent * canvas / 2
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        s = 0.9 * r  # a full-box square looks bigger than the other shapes of the same extent
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif obj.shape == "star":
        # A fat five-pointed star (inner radius ½): its arms stay visible at 32 px. Shifted down so that
        # its extent is centred on the box (the lower tips reach only cos 36° · r).
        shift = r * (1 - np.cos(np.pi / 5)) / 2
        points = []
        for k in range(10):  # alternate outer tips and inner corners, starting from the top tip
            angle, radius = -np.pi / 2 + k * np.pi / 5, (r if k % 2 == 0 else r / 2)
            points.append((cx + radius * np.cos(angle), cy + shift + radius * np.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


# ----------------------------------------------------------------------------------------------- captions


class _Annotator:
    """One annotator's word choices for one caption: synonyms, and whether sizes get mentioned."""

    def __init__(self, scene: Scene, rng: np.random.Generator, with_size: bool):
        self.scene, self.rng, self.with_size = scene, rng, with_size

    def pick(self, options: Sequence[tuple[str, float]]) -> str:
        weights = np.array([w for _, w in options])
        return options[int(self.rng.choice(len(options), p=weights / weights.sum()))][0]

    def bare(self, obj: SceneObject) -> str:
        """'large red circle' / 'red disc': the noun phrase without its article."""
        words = [self.pick(SIZE_WORDS[obj.size])] if self.with_size else []
        return " ".join(words + [obj.color, self.pick(SHAPE_WORDS[obj.shape])])

    def phrase(self, obj: SceneObject) -> str:
        """'a large red circle' / 'an orange box'."""
        bare = self.bare(obj)
        return ("an " if bare[0] in "aeiou" else "a ") + bare

    def listing(self, objects: Sequence[SceneObject]) -> str:
        """'a red circle and a blue square' / 'a red circle, a blue square and a green star'."""
        phrases = [self.phrase(o) for o in objects]
        return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]

    def order(self) -> list[SceneObject]:
        """The objects in mention order: mostly left to right, as people read a picture, else shuffled."""
        objects = list(self.scene.objects)  # already left to right
        if self.rng.random() < 0.4:
            objects = [objects[int(i)] for i in self.rng.permutation(len(objects))]
        return objects

    def relation(self, a: SceneObject, b: SceneObject) -> str:
        return self.pick(RELATION_WORDS[relation(a, b)])

    def count(self) -> str:
        """'two shapes' / 'three objects' / 'one shape'."""
        n = len(self.scene.objects)
        noun = self.pick(GROUP_NOUNS)
        return f"{COUNT_WORDS[n]} {noun if n > 1 else noun[:-1]}"

    def picture(self) -> str:
        return self.pick(PICTURE_WORDS)

    def background(self) -> str:
        return f"on a {self.scene.background} background"


def _region(obj: SceneObject) -> str:
    """Where a lone object sits, by thirds of the image."""
    column = "left" if obj.x < 1 / 3 else "right" if obj.x > 2 / 3 else ""
    row = "top" if obj.y < 1 / 3 else "bottom" if obj.y > 2 / 3 else ""
    if row and column:
        return f"in the {row} {column} corner"
    if row:
        return f"at the {row}"
    if column:
        return f"on the {column}"
    return "in the middle"


def _extreme_pair(scene: Scene) -> tuple[SceneObject, SceneObject, SceneObject] | None:
    """(a, b, c) with a in the same relation to both b and c, so 'a left of b and c' is true; else None."""
    for a in scene.objects:
        b, c = [o for o in scene.objects if o is not a]
        if relation(a, b) == relation(a, c):
            return a, b, c
    return None


def _axis_order(scene: Scene) -> tuple[str, list[SceneObject]] | None:
    """('left to right' | 'top to bottom', objects in that order) when the objects are clearly spread out."""
    min_gap = 0.12  # closer centres would make the order a matter of opinion
    for words, key in (("left to right", lambda o: o.x), ("top to bottom", lambda o: o.y)):
        ordered = sorted(scene.objects, key=key)
        if all(key(b) - key(a) >= min_gap for a, b in zip(ordered, ordered[1:])):
            return words, ordered
    return None


@dataclass(frozen=True)
class _Template:
    """A caption pattern for scenes with `n_objects` objects (`applies` filters the scenes it fits)."""

    name: str
    n_objects: int
    write: Callable[[_Annotator], str]
    applies: Callable[[Scene], bool] = lambda scene: True


def _one(d: _Annotator) -> SceneObject:
    return d.scene.objects[0]


def _write_relation(d: _Annotator, prefix: str = "") -> str:
    a, b = d.order()
    return f"{prefix}{d.phrase(a)} {d.relation(a, b)} {d.phrase(b)}"


def _write_sides(d: _Annotator) -> str:
    """'X on the left and Y on the right' (or at the top / at the bottom), along the pair's main axis."""
    a, b = d.scene.objects
    first, second = (a, b) if relation(a, b) in ("left of", "above") else (b, a)
    ends = ("on the left", "on the right") if relation(first, second) == "left of" else ("at the top", "at the bottom")
    return f"{d.phrase(first)} {ends[0]} and {d.phrase(second)} {ends[1]}"


def _write_three_relation(d: _Annotator) -> str:
    a, b, c = d.order()
    return f"{d.phrase(a)} {d.relation(a, b)} {d.phrase(b)} with {d.phrase(c)} nearby"


def _write_extreme(d: _Annotator) -> str:
    a, b, c = _extreme_pair(d.scene)
    if d.rng.random() < 0.5:
        b, c = c, b
    return f"{d.phrase(a)} {d.relation(a, b)} {d.phrase(b)} and {d.phrase(c)}"


def _write_axis_order(d: _Annotator) -> str:
    words, ordered = _axis_order(d.scene)
    return f"from {words}: {d.listing(ordered)}"


TEMPLATES: tuple[_Template, ...] = (
    # one object
    _Template("background", 1, lambda d: f"{d.phrase(_one(d))} {d.background()}"),
    _Template("region", 1, lambda d: f"{d.phrase(_one(d))} {_region(_one(d))}"),
    _Template("single", 1, lambda d: f"a single {d.bare(_one(d))} {_region(_one(d))}"),
    _Template("picture", 1, lambda d: f"{d.picture()} {d.phrase(_one(d))}"),
    _Template("count", 1, lambda d: f"{d.count()}: {d.phrase(_one(d))}"),
    _Template("region background", 1, lambda d: f"{d.phrase(_one(d))} {_region(_one(d))} {d.background()}"),
    # two objects
    _Template("relation", 2, _write_relation),
    _Template("count", 2, lambda d: f"{d.count()}: {d.listing(d.order())}"),
    _Template("background", 2, lambda d: f"{d.listing(d.order())} {d.background()}"),
    _Template("sides", 2, _write_sides),
    _Template("picture", 2, lambda d: f"{d.picture()} {d.listing(d.order())}"),
    _Template("count relation", 2, lambda d: _write_relation(d, prefix=f"{d.count()}, ")),
    # three objects
    _Template("count", 3, lambda d: f"{d.count()}: {d.listing(d.order())}"),
    _Template("background", 3, lambda d: f"{d.listing(d.order())} {d.background()}"),
    _Template("picture", 3, lambda d: f"{d.picture()} {d.listing(d.order())}"),
    _Template("relation", 3, _write_three_relation),
    _Template("extreme", 3, _write_extreme, applies=lambda s: _extreme_pair(s) is not None),
    _Template("axis order", 3, _write_axis_order, applies=lambda s: _axis_order(s) is not None),
)


def caption_scene(scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """`n` captions of `scene`, each from a different template where possible, each MIN..MAX_WORDS tokens.

    Every caption names every object's colour and shape (or a shape synonym); relations and regions follow
    the objects' positions.
    """
    fitting = [t for t in TEMPLATES if t.n_objects == len(scene.objects) and t.applies(scene)]
    # Distinct templates first, as five annotators would rarely phrase alike; repeats only if too few fit.
    picks = [fitting[int(i)] for i in rng.permutation(len(fitting))]
    picks += [fitting[int(i)] for i in rng.integers(0, len(fitting), size=max(0, n - len(picks)))]
    captions: list[str] = []
    for template in picks[:n]:
        for _ in range(10):  # a repeated template may come out word for word the same: reroll it
            caption = _write_caption(template, scene, rng)
            if caption not in captions:
                break
        captions.append(caption)
    return captions


def _write_caption(template: _Template, scene: Scene, rng: np.random.Generator) -> str:
    caption = template.write(_Annotator(scene, rng, with_size=rng.random() < SIZE_WORD_PROBABILITY))
    if len(tokenize(caption)) > MAX_WORDS:  # crowded scenes: annotators drop the sizes
        caption = template.write(_Annotator(scene, rng, with_size=False))
    n_words = len(tokenize(caption))
    if not MIN_WORDS <= n_words <= MAX_WORDS:
        raise RuntimeError(f"template {template.name!r} wrote {n_words} words: {caption!r}")
    return caption
