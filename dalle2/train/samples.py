"""Pictures written at validation: grids of images and a similarity heatmap, as PNG bytes."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

GAP = 2  # pixels between grid cells
MIN_CELL = 64  # smaller images are enlarged (nearest) to at least this size, to be seen
CELL = 16  # heatmap pixels per similarity entry


def image_grid(rows: list[Tensor]) -> Image.Image:
    """One grid row per tensor [N, 3, h, w] in [-1, 1]; smaller images are enlarged (nearest)
    to the largest size, so a low-resolution input lines up with its upsampled result."""
    if not rows:
        raise ValueError("no rows to draw")
    count = min(row.shape[0] for row in rows)
    size = max(row.shape[-1] for row in rows)
    size *= max(1, MIN_CELL // size)
    cells = []
    for row in rows:
        row = row[:count].detach().float().cpu().clamp(-1, 1)
        if row.shape[-1] != size:
            row = F.interpolate(row, size=(size, size), mode="nearest")
        cells.append(row)
    grid = torch.ones(3, len(rows) * (size + GAP) + GAP, count * (size + GAP) + GAP)  # white background
    for r, row in enumerate(cells):
        for c in range(count):
            top, left = GAP + r * (size + GAP), GAP + c * (size + GAP)
            grid[:, top : top + size, left : left + size] = row[c]
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels, mode="RGB")


def similarity_image(similarity: Tensor) -> Image.Image:
    """A grayscale heatmap of a [N, M] matrix of cosine similarities (-1 black, 1 white)."""
    values = ((similarity.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return Image.fromarray(np.kron(values, np.ones((CELL, CELL), dtype=np.uint8)), mode="L")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
