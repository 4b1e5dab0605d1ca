"""Images in and out of the models: PIL <-> [-1, 1] tensors, edit masks, PNG grids.

Conversions are documented behaviour, not errors: non-RGB images are converted to RGB
(transparency composited on white), and images of another size are resized on their
shorter side and center-cropped to the square the model works at.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image


class InvalidInput(ValueError):
    """A request that can't be served; ``param`` names the offending field (OpenAI's error shape)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# The formats an upload may be in, decoded by Pillow's own pure plugins only: ``Image.open``
# with no ``formats`` tries every plugin, and some hand the bytes to other programs (EPS starts
# Ghostscript where it is installed) or parse rarely used, complex formats (TIFF, GIF, PSD...).
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_IMAGE_SIDE = 4096  # a 4 MB PNG of one colour can hold a huge image: refuse before decoding it


def open_image(
    data: bytes | Image.Image, param: str = "image", formats: Sequence[str] = UPLOAD_FORMATS, max_side: int = MAX_IMAGE_SIDE
) -> Image.Image:
    """Decode image bytes of one of ``formats``; the size is read from the header and checked
    against ``max_side`` before any pixel is decoded (a decompression bomb is refused unread)."""
    if isinstance(data, Image.Image):
        return data
    names = ", ".join(formats[:-1]) + (f" or {formats[-1]}" if len(formats) > 1 else formats[0])
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))  # reads the header only
    except Exception:
        raise InvalidInput(f"could not decode the image: send a {names} file", param) from None
    width, height = image.size
    if max(width, height) > max_side:
        raise InvalidInput(f"the image is {width}x{height}; sides of at most {max_side} pixels are accepted", param)
    try:
        image.load()
    except Exception:
        raise InvalidInput(f"could not decode the image: send a {names} file", param) from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency on white (so RGBA / LA / P images are accepted)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def center_square(image: Image.Image, size: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Resize the shorter side to ``size`` and center-crop to ``size`` x ``size``."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), resample)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> [1, 3, size, size] float in [-1, 1]."""
    pixels = np.asarray(center_square(to_rgb(image), size), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> N PIL RGB images."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def edit_mask(mask: Image.Image, image: Image.Image, size: int) -> torch.Tensor:
    """The area to repaint, as OpenAI's edits endpoint defines it: the mask's fully transparent
    pixels (alpha 0). A mask without alpha is read as greyscale: black (0) = repaint. Returns
    [1, 1, size, size] with 1 = keep the image's pixel, 0 = repaint."""
    if mask.size != image.size:
        raise InvalidInput(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}", "mask")
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        keep = mask.convert("RGBA").getchannel("A")
    else:
        keep = mask.convert("L")
    keep = center_square(keep, size, resample=Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(keep) > 0).astype(np.float32))[None, None]


def make_grid(images: Sequence[Image.Image], columns: int | None = None, padding: int = 2) -> Image.Image:
    """Tile images (same size) into one grid image, row-major."""
    if not images:
        raise ValueError("no images to tile")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding), (255, 255, 255))
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        grid.paste(image.resize((width, height)), (padding + column * (width + padding), padding + row * (height + padding)))
    return grid


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
