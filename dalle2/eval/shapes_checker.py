"""Read shape, color, size, position and background back from a shapes image, with pixel
statistics only (no learned model), so it can judge whether a generated image follows
its caption without sharing a model's blind spots.

Generated images are not the clean renders of :mod:`dalle2.data.shapes`: their background
is tinted and noisy, their edges soft. So nothing assumes the exact colors:

1. background = median of the outermost ring of pixels (a shape rarely touches it, and
   the median ignores the few that do); noise = the ring's robust spread (percentiles).
2. foreground seed = pixels further from the background color than the noise allows;
   the shape = the largest 8-connected group of them (specks of noise are small).
3. shape color = median of the inner half of the shape's pixels (edges are blends);
   its name = the named color that, blended with the background, comes nearest.
4. each pixel's coverage = its position between background and shape color (0..1), so
   anti-aliased and blurred edges count fractionally and the measures are sub-pixel;
   the shape proper is the largest group of pixels at least half covered, plus the ring
   of edge pixels around it (noise that touched the seed falls away here).
5. from the coverage-weighted moments: area -> size, centroid -> position, and the shape
   from rotation-invariant complex moments: a triangle has a 3-fold harmonic (c30), an
   axis-aligned square a 4-fold one (c40), a circle neither. Moments average over every
   edge pixel, which is what works on a 5-pixel shape at 32 px where corner counting and
   perimeters do not.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from dalle2.data.shapes import BACKGROUNDS, COLORS, LABEL_COLUMNS, POSITIONS, SIZES

MIN_CONTRAST = 20.0  # RGB distance (0-255 scale) below which a pixel is never foreground
NOISE_MULTIPLE = 4.5  # seed threshold in noise sigmas: P(chi_3 > 4.5) ~ 1.5e-4 per background pixel
MIN_BLEND = 0.5  # least share of its own color a shape's inner pixels are assumed to have
MIN_AREA = 2.0  # pixels of coverage; less is a speck, not a shape
# Harmonic strengths (see ShapeFeatures) of the ideal shapes: triangle h3 = 0.80, square
# h4 = 0.60, circle 0 for both. Blur shrinks them toward 0; noise and coarse pixels give a
# small circle up to ~0.25 (measured at 32 px with noise and blur, see tests/test_eval.py).
TRIANGLE_H3 = 0.35
SQUARE_H4 = 0.28


@dataclass(frozen=True)
class ShapeFeatures:
    """What the checker measured; the labels are read from these."""

    background_rgb: tuple[float, float, float]
    noise: float  # per-channel sigma of the background, 0-255 scale
    color_rgb: tuple[float, float, float]
    area: float  # fraction of the image covered by the shape
    centroid: tuple[float, float]  # (x, y) fractions of the side, coverage-weighted
    h3: float  # |c30| sqrt(c00) / c11^1.5: 3-fold symmetry (triangle)
    h4: float  # |c40| c00 / c11^2: 4-fold symmetry (axis-aligned or rotated square)


def _nearest(rgb, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], np.float64) - np.asarray(rgb, np.float64), axis=1)
    return names[int(distances.argmin())]


def _border(image: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels [4(S-1), 3]."""
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])


def named_color(features: ShapeFeatures) -> str:
    """The named color whose blend with the measured background explains the shape's color
    best. Soft edges and blur mix the background into small shapes (the yellow of a
    5-pixel shape on black reads as a dark yellow, nearer orange than yellow): each name
    is matched as the segment from a half-and-half blend (MIN_BLEND) to the pure color."""
    color, background = np.asarray(features.color_rgb), np.asarray(features.background_rgb)
    best, best_distance = "", math.inf
    for name, rgb in COLORS.items():
        direction = np.asarray(rgb, np.float64) - background
        blend = np.clip((color - background) @ direction / max(direction @ direction, 1e-9), MIN_BLEND, 1.0)
        distance = float(np.linalg.norm(background + blend * direction - color))
        if distance < best_distance:
            best, best_distance = name, distance
    return best


def _noise_sigma(border: np.ndarray, background: np.ndarray) -> float:
    """Per-channel noise sigma of the background ring, as one number (RMS over channels).

    Each side of the median separately (median to the 16th / 84th percentile is one sigma
    of a Gaussian), taking the wider: a tinted white or black background is clipped at
    255 or 0, which flattens one side of its noise but leaves the other intact. Clean
    renders give 0, hence MIN_CONTRAST."""
    low, high = np.percentile(border, [15.87, 84.13], axis=0)
    sigma = np.maximum(background - low, high - background)
    return float(np.sqrt(np.mean(sigma**2)))


def _largest_component(mask: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The 8-connected group of True pixels with the largest total ``weight`` (flood fill;
    64x64 images are small enough for a plain queue)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, np.int32)
    best, best_weight, count = 0, -1.0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue, total = deque([start]), 0.0
        while queue:
            y, x = queue.popleft()
            total += weight[y, x]
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        queue.append((ny, nx))
        if total > best_weight:
            best, best_weight = count, total
    return labels == best if count else np.zeros_like(mask)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a mask by one pixel in all 8 directions."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    grown = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def measure(image: np.ndarray) -> Optional[ShapeFeatures]:
    """Features of the main shape in an RGB image [H, W, 3] (uint8 or 0-255 floats);
    None when nothing stands out from the background."""
    pixels = np.asarray(image, np.float64)[..., :3]
    height, width, _ = pixels.shape
    border = _border(pixels)
    background = np.median(border, axis=0)
    noise = _noise_sigma(border, background)
    offset = pixels - background  # [H, W, 3]
    distance = np.linalg.norm(offset, axis=2)
    seed = distance > max(MIN_CONTRAST, NOISE_MULTIPLE * noise)
    if not seed.any():
        return None
    component = _largest_component(seed, distance)
    inner = component & (distance >= np.median(distance[component]))
    color = np.median(pixels[inner], axis=0)
    contrast = color - background
    contrast_sq = float(contrast @ contrast)
    if contrast_sq <= MIN_CONTRAST**2:
        return None
    # Coverage: where each pixel lies between background (0) and the shape color (1).
    coverage = np.clip(offset @ contrast / contrast_sq, 0.0, 1.0)
    # Noise pixels next to the shape can join the seed; the shape proper is the group of
    # pixels at least half covered, and its edge the ring of pixels around it.
    core = _largest_component(component & (coverage > 0.5), coverage)
    coverage = coverage * _dilate(core)
    area = coverage.sum()
    if area < MIN_AREA:
        return None
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centers
    cx, cy = (coverage * xs).sum() / area, (coverage * ys).sum() / area
    z = (xs - cx) + 1j * (ys - cy)
    c11 = (coverage * np.abs(z) ** 2).sum()
    c30 = (coverage * z**3).sum()
    c40 = (coverage * z**4).sum()
    return ShapeFeatures(
        background_rgb=tuple(background.tolist()),
        noise=noise,
        color_rgb=tuple(color.tolist()),
        area=float(area / (height * width)),
        centroid=(float(cx / width), float(cy / height)),
        h3=float(abs(c30) * math.sqrt(area) / c11**1.5),
        h4=float(abs(c40) * area / c11**2),
    )


def classify_shape(features: ShapeFeatures) -> str:
    """Triangle if the 3-fold harmonic is strong (and stronger, relative to its threshold,
    than the 4-fold one: a blob can show a little of both), else square if the 4-fold
    harmonic is, else circle."""
    if features.h3 > TRIANGLE_H3 and features.h3 / TRIANGLE_H3 > features.h4 / SQUARE_H4:
        return "triangle"
    return "square" if features.h4 > SQUARE_H4 else "circle"


def named_position(features: ShapeFeatures, shape: str) -> str:
    x, y = features.centroid
    if shape == "triangle":
        # shapes.py centers a triangle's bounding box on the named position; its centroid
        # (= circumcenter, apex up) lies a quarter circumradius R below: area = 3 sqrt(3)/4 R^2.
        y -= math.sqrt(4 * features.area / (3 * math.sqrt(3))) / 4
    return min(POSITIONS, key=lambda name: math.dist(POSITIONS[name][0], (x, y)))


def named_size(features: ShapeFeatures) -> str:
    # Diameter of the equal-area circle, split at the geometric mean of the two sizes.
    diameter = 2 * math.sqrt(features.area / math.pi)
    return "large" if diameter > math.sqrt(SIZES["small"] * SIZES["large"]) else "small"


def read_attributes(image: np.ndarray) -> dict[str, Optional[str]]:
    """The labels of :data:`dalle2.data.shapes.LABEL_COLUMNS` read from an image [H, W, 3]:
    shape, color, size, position and background; all but background are None when no
    shape stands out."""
    features = measure(image)
    if features is None:
        background = _nearest(np.median(_border(np.asarray(image, np.float64)[..., :3]), axis=0), BACKGROUNDS)
        return {**{name: None for name in LABEL_COLUMNS}, "background": background}
    shape = classify_shape(features)
    return {
        "shape": shape,
        "color": named_color(features),
        "size": named_size(features),
        "position": named_position(features, shape),
        "background": _nearest(features.background_rgb, BACKGROUNDS),
    }
