"""A deterministic synthetic dataset: one colored shape on a plain background.

Every caption states every attribute of its image ("a small red circle at the top left
on a white background"), and the attributes are kept as columns, so a model trained on
it can be checked against its prompt: :mod:`dalle2.eval.shapes_checker` reads the
attributes back from pixels (with this module's vocabulary), and recovers all of them from
the rendered training images. This module never imports the checker.

Row ``i`` depends only on ``(seed, i)``: the same seed gives the same rows and the same
file bytes, and a larger ``count`` only appends rows.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from dalle2.data.schema import ShardWriter, with_extra_columns

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 230),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
# Center of each named position as (x, y) fractions of the image side, and its phrase.
POSITIONS = {
    "top left": ((0.25, 0.25), "at the top left"),
    "top": ((0.5, 0.25), "at the top"),
    "top right": ((0.75, 0.25), "at the top right"),
    "left": ((0.25, 0.5), "on the left"),
    "center": ((0.5, 0.5), "in the center"),
    "right": ((0.75, 0.5), "on the right"),
    "bottom left": ((0.25, 0.75), "at the bottom left"),
    "bottom": ((0.5, 0.75), "at the bottom"),
    "bottom right": ((0.75, 0.75), "at the bottom right"),
}
SIZES = {"small": 0.16, "large": 0.32}  # diameter of the equal-area circle, as a fraction of the side
# Prompts as people write them (issue 22): every attribute has several phrasings, and captions
# several word orders. The first form of each is the plain caption ("a small red circle at the top
# left on a white background": the demo's prompts). Some phrasings never appear in training (HELD_OUT
# below) although every word in them does: only the order or the combination is new, so
# `dalle2 eval --phrasing held-out` asks whether the models read a caption or memorised its forms.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
ARTICLES = ("a", "one")
BACKGROUND_WORDS = {"white": ("white",), "black": ("black",), "gray": ("gray", "grey")}
BACKGROUND_PHRASES = ("on a {} background", "against a {} background", "with a {} background", "on {}")
BACKGROUND_NOUNS = ("a {} background", "a plain {} background")  # "a white background with ..."


def _position_phrases(position: str) -> tuple[tuple[str, ...], str]:
    """(seen phrasings, the held-out one) of a named position; the first seen is the plain one."""
    words = position.split()
    if len(words) == 2:  # a corner: "top left"
        vertical, horizontal = words
        upper = {"top": "upper", "bottom": "lower"}[vertical]
        seen = (f"at the {position}", f"in the {position} corner", f"in the {upper} {horizontal}")
        return seen, f"in the {upper} {horizontal} corner"
    if position in ("top", "bottom"):
        return (f"at the {position}", f"near the {position}", f"along the {position} edge"), f"at the {position} edge"
    if position in ("left", "right"):
        return (f"on the {position}", f"on the {position} side", f"at the {position} edge"), f"near the {position}"
    return ("in the center", "in the middle", "at the center"), "at the middle"


POSITION_PHRASES = {position: _position_phrases(position) for position in POSITIONS}
SEEN_TEMPLATES = (
    "{a} {size} {color} {shape} {where} {background}",
    "{where}, {a} {size} {color} {shape} {background}",
    "{background_noun} with {a} {size} {color} {shape} {where}",
    "{size} {color} {shape} {where} {background}",
    "there is {a} {size} {color} {shape} {where} {background}",
    "{a} {size} {shape} in {color} {where} {background}",
)
HELD_OUT_TEMPLATES = (
    "{background}, {a} {size} {color} {shape} {where}",
    "{where} there is {a} {size} {color} {shape} {background}",
    "{a} {size} {shape}, {color}, {where} {background}",
)
PHRASINGS = ("dataset", "plain", "held-out")  # `dalle2 eval --phrasing`: the rows' own captions, or rewritten


def caption(labels: dict[str, str], phrasing: str = "plain", rng: Optional[np.random.Generator] = None) -> str:
    """A caption stating every label. ``plain``: the first form of each; ``seen``: a random
    training phrasing; ``held-out``: a held-out word order, with the held-out phrasing of the
    position half the time (never in training)."""
    if phrasing == "plain":
        pick = lambda options: options[0]  # noqa: E731
    elif phrasing in ("seen", "held-out") and rng is not None:
        pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    else:
        raise ValueError(f"phrasing must be plain, seen or held-out (seen and held-out need an rng), got {phrasing!r}")
    seen_where, held_out_where = POSITION_PHRASES[labels["position"]]
    held_out = phrasing == "held-out"
    where = held_out_where if held_out and rng.random() < 0.5 else pick(seen_where)
    background = pick(BACKGROUND_WORDS[labels["background"]])
    template = pick(HELD_OUT_TEMPLATES if held_out else SEEN_TEMPLATES)
    return template.format(
        a=pick(ARTICLES), size=pick(SIZE_WORDS[labels["size"]]), color=labels["color"], shape=labels["shape"], where=where,
        background=pick(BACKGROUND_PHRASES).format(background), background_noun=pick(BACKGROUND_NOUNS).format(background),
    )  # fmt: skip


def held_out_caption(labels: dict[str, str], key: str, seed: int = 0) -> str:
    """The held-out phrasing of a row's labels, a function of (seed, key) only."""
    return caption(labels, "held-out", np.random.default_rng([seed, zlib.crc32(key.encode())]))


LABEL_COLUMNS = ("shape", "color", "size", "position", "background")
LABEL_VALUES = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "position": tuple(POSITIONS), "background": tuple(BACKGROUNDS)}
SHAPES_SCHEMA = with_extra_columns([pa.field(name, pa.string()) for name in LABEL_COLUMNS])

POSITION_JITTER = 0.02  # fraction of the side; keeps every shape inside its third of the image
SIZE_JITTER = 0.1  # relative
SUPERSAMPLE = 4  # draw 4x larger, then average 4x4 blocks: anti-aliased edges, same on every machine


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str
    background: str
    caption: str
    center: tuple[float, float]  # (x, y) fractions of the side, jitter included
    diameter: float  # fraction of the side, jitter included


def sample_scene(seed: int, index: int) -> Scene:
    """The scene of row ``index``; a function of ``(seed, index)`` only."""
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    labels = {"shape": shape, "color": color, "size": size, "position": position, "background": background}
    # The phrasing's own stream: the scenes (and so the images) do not depend on how they are said.
    text = caption(labels, "seen", np.random.default_rng([seed, index, 1]))
    return jittered_scene(labels, rng, text)


def jittered_scene(labels: dict[str, str], rng: np.random.Generator, text: str = "") -> Scene:
    """A scene of ``labels`` (LABEL_COLUMNS -> value) placed and sized with jitter from ``rng``:
    drawing twice gives two images the dataset could hold for one caption (what tells a
    generator's seeds apart from copies, dalle2.eval)."""
    (x, y), _ = POSITIONS[labels["position"]]
    dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    scale = rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    center, diameter = (x + dx, y + dy), SIZES[labels["size"]] * scale
    return Scene(labels["shape"], labels["color"], labels["size"], labels["position"], labels["background"], text, center, diameter)


def draw_twice(labels: list[dict[str, str]], image_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two images (uint8 [N, S, S, 3] each) the dataset could hold for each row's labels: what a
    generator's seeds for one caption are measured against (dalle2.eval.metrics.seed_spread)."""
    draws = [[np.asarray(render(jittered_scene(row, np.random.default_rng([seed, i, j])), image_size)) for i, row in enumerate(labels)] for j in (0, 1)]
    return np.stack(draws[0]), np.stack(draws[1])


def _polygon(scene: Scene, side: float) -> list[tuple[float, float]] | None:
    """Vertices of a square or triangle whose area equals the scene's circle, centered on
    its bounding box (so the box center is the named position); None for a circle."""
    cx, cy = scene.center[0] * side, scene.center[1] * side
    r = scene.diameter * side / 2
    if scene.shape == "square":
        half = r * math.sqrt(math.pi) / 2  # side r*sqrt(pi) has area pi r^2
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if scene.shape == "triangle":
        circumradius = r * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # equilateral, area pi r^2
        half_width, half_height = circumradius * math.sqrt(3) / 2, circumradius * 0.75
        return [(cx, cy - half_height), (cx + half_width, cy + half_height), (cx - half_width, cy + half_height)]
    return None


def render(scene: Scene, image_size: int) -> Image.Image:
    """The RGB image of a scene, ``image_size`` pixels square."""
    side = image_size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLORS[scene.color]
    polygon = _polygon(scene, side)
    if polygon is None:
        cx, cy, r = scene.center[0] * side, scene.center[1] * side, scene.diameter * side / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)
    return image.reduce(SUPERSAMPLE)  # mean of each 4x4 block


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def shapes_table(start: int, stop: int, image_size: int = 64, seed: int = 0) -> pa.Table:
    """Rows ``start..stop-1`` of the shapes dataset, in :data:`SHAPES_SCHEMA`."""
    scenes = [sample_scene(seed, index) for index in range(start, stop)]
    columns = {
        "key": [f"shapes/{index:06d}" for index in range(start, stop)],
        "caption": [s.caption for s in scenes],
        "image": [encode_png(render(s, image_size)) for s in scenes],
        "width": [image_size] * len(scenes),
        "height": [image_size] * len(scenes),
    }
    columns.update({name: [getattr(s, name) for s in scenes] for name in LABEL_COLUMNS})
    return pa.table(columns, schema=SHAPES_SCHEMA)


def write_shapes_dataset(
    out_uri: str, count: int = 4096, image_size: int = 64, seed: int = 0, rows_per_file: int = 1024
) -> list[str]:
    """Write ``count`` rows as Parquet shards under ``out_uri``; returns the file URIs."""
    if count < 1 or image_size < 8:
        raise ValueError(f"need count >= 1 and size >= 8, got count={count}, size={image_size}")
    from dalle2.progress_bars import Bar

    with ShardWriter(out_uri, SHAPES_SCHEMA, rows_per_file=rows_per_file) as writer, Bar(count, "data: rendering", "img") as bar:
        for start in range(0, count, rows_per_file):
            stop = min(start + rows_per_file, count)
            writer.write(shapes_table(start, stop, image_size, seed))
            bar.update(stop - start)
    return writer.files

