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
from dataclasses import dataclass

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
CAPTION_TEMPLATES = (
    "a {size} {color} {shape} {where} on a {background} background",
    "{where}, a {size} {color} {shape} on a {background} background",
    "a {background} background with a {size} {color} {shape} {where}",
)
LABEL_COLUMNS = ("shape", "color", "size", "position", "background")
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
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    (x, y), where = POSITIONS[position]
    dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    scale = rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    caption = template.format(size=size, color=color, shape=shape, where=where, background=background)
    return Scene(shape, color, size, position, background, caption, (x + dx, y + dy), SIZES[size] * scale)


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

