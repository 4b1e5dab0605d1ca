"""Turn a batch of dataset rows into model inputs: plain functions, no Ray.

The Ray Data pipeline (:mod:`.pipeline`) calls :func:`preprocess_batch` in each map
task; tests and single-process tools call it directly. A batch is a dict of numpy
arrays (Ray Data's ``numpy`` batch format): ``key``, ``caption`` and ``image`` (encoded
bytes) in, and out::

    key      object [N]           the row ids
    caption  object [N]           the captions, stripped
    image    uint8  [N, S, S, 3]  RGB, resized so the short side is S, then center-cropped
    tokens   int64  [N, L]        BPE ids of the caption (open_clip's tokenizer), 0-padded;
                                  only when a ``context_length`` is given

plus the input columns named in ``carry``, copied unchanged for the rows kept (the encoded
image bytes that ``dalle2 data embed`` writes out again; the precomputed ``image_embed``
that the decoder reads from those rows). Rows that cannot be used are dropped and counted
by reason; they never raise.

The module imports neither torch nor open_clip until it tokenizes: a decode worker process
that only decodes (training streams leave the tokens to the training worker, which has the
tokenizer loaded anyway) starts without them, see :mod:`dalle2.data.ray_reader`.
"""

from __future__ import annotations

import collections
import enum
import io
import zlib
from typing import TYPE_CHECKING, Literal, Mapping, Optional

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

Split = Literal["train", "validation"]
DROP_REASONS = ("missing_key", "missing_image", "undecodable_image", "empty_caption")
SPLIT_BUCKETS = 10_000  # validation membership resolution: fractions in steps of 0.01%


class Flip(str, enum.Enum):
    """Horizontal flip augmentation. Off by default: a mirrored image no longer matches
    captions that say "left" or "right" (the synthetic shapes say so in most captions)."""

    NONE = "none"
    HORIZONTAL = "horizontal"  # each training image mirrored with probability 1/2


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image -> uint8 [S, S, 3]: short side resized to S (bicubic, antialiased),
    then center-cropped. Transparent pixels are composited onto white. Raises on bad bytes."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale when much larger
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        rgb = ImageOps.fit(image.convert("RGB"), (image_size, image_size), method=Image.Resampling.BICUBIC)
    return np.asarray(rgb)


def in_validation(keys: np.ndarray, fraction: float) -> np.ndarray:
    """bool [N]: which keys belong to the validation split. A stable hash of the key
    decides (crc32, not Python's salted ``hash``), so every process, epoch and re-run
    agrees, and adding rows to a dataset never moves old rows between splits."""
    buckets = np.fromiter((zlib.crc32(str(k).encode("utf-8")) % SPLIT_BUCKETS for k in keys), np.int64, len(keys))
    return buckets < round(fraction * SPLIT_BUCKETS)


def _drop_reason(key, caption, image) -> Optional[str]:
    if key is None:
        return "missing_key"
    if image is None or len(image) == 0:
        return "missing_image"
    if caption is None or not str(caption).strip():
        return "empty_caption"
    return None


def preprocess_batch(
    batch: dict[str, np.ndarray],
    *,
    image_size: int,
    context_length: Optional[int],
    split: Split = "train",
    validation_fraction: float = 0.0,
    flip: Flip = Flip.NONE,
    rng: Optional[np.random.Generator] = None,
    carry: Mapping[str, str] | None = None,
) -> tuple[dict[str, np.ndarray], collections.Counter]:
    """Keep the rows of ``split``, decode (and tokenize) them; returns (batch, drops by reason).
    ``carry`` maps input columns to output columns copied unchanged for the kept rows
    (``{"image": "image_bytes"}`` keeps the encoded image beside the decoded one).
    ``context_length=None`` leaves the captions untokenized (no ``tokens`` column).

    Rows without a key cannot be assigned a split; the train split keeps (and counts)
    them, so each bad row is counted exactly once."""
    keys, captions, images = batch["key"], batch["caption"], batch["image"]
    has_key = np.array([k is not None for k in keys], dtype=bool)
    validation = np.zeros(len(keys), dtype=bool)
    validation[has_key] = in_validation(keys[has_key], validation_fraction)
    selected = np.flatnonzero(validation if split == "validation" else ~validation)

    drops: collections.Counter = collections.Counter()
    kept, kept_keys, kept_captions, pixels = [], [], [], []
    for index in selected:
        reason = _drop_reason(keys[index], captions[index], images[index])
        if reason is None:
            try:
                pixels.append(decode_image(images[index], image_size))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # Pillow's "not an image"
                reason = "undecodable_image"
        if reason is not None:
            drops[reason] += 1
            continue
        kept.append(index)
        kept_keys.append(keys[index])
        kept_captions.append(str(captions[index]).strip())

    image_array = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), np.uint8)
    if flip == Flip.HORIZONTAL and len(pixels):
        rng = rng if rng is not None else np.random.default_rng()
        mirrored = rng.random(len(pixels)) < 0.5
        image_array[mirrored] = image_array[mirrored, :, ::-1]
    out = {
        "key": np.array(kept_keys, dtype=object),
        "caption": np.array(kept_captions, dtype=object),
        "image": image_array,
    }
    if context_length is not None:
        out["tokens"] = tokenize_captions(kept_captions, context_length)
    rows = np.array(kept, dtype=np.int64)
    for source, name in (carry or {}).items():
        out[name] = np.asarray(batch[source])[rows]  # [N, ...]: tensors keep their shape
    return out, drops


def tokenize_captions(captions: list[str], context_length: int) -> np.ndarray:
    """int64 [N, context_length]: CLIP's BPE ids (imports torch and open_clip on first use)."""
    if not captions:
        return np.zeros((0, context_length), np.int64)
    from dalle2.clip import tokenize

    return tokenize(captions, context_length).numpy()


def to_model_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] (what the pipeline delivers) -> float [N, 3, H, W] in [-1, 1],
    the range the diffusion models work in (Ho et al. 2020, section 3.3)."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
