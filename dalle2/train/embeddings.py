"""The prior and the decoder trained from precomputed CLIP embeddings (``dalle2 data embed``).

DALL-E 2 trains both on a frozen CLIP (sections 2.1, 2.2); with the embeddings computed once,
their workers never run CLIP. The rows hold ``key``, ``caption``, ``tokens`` [L],
``text_embed`` [D], ``text_hidden`` [L, W], ``image_embed`` [D] and, unless written with
``--no-images``, ``image`` (the encoded bytes; see :mod:`dalle2.data.embed`).

- The prior reads the embedding columns alone, through the training reader of the images
  (:mod:`dalle2.data.stream`: shuffled, resumable, drops counted) with :func:`embedding_rows`
  in place of the image decoder.
- The decoder reads ``key``, ``caption`` and ``image`` through the image pipeline (decode,
  resize, tokenize, bad rows dropped and counted: :mod:`dalle2.data.ray_reader`), which carries
  ``image_embed`` along (:data:`DECODER_CARRY`). The embedding is of the unflipped image, so
  this path refuses the flip augmentation (``dalle2.train.config``).

Either way the validation split is the one the image pipeline uses (a stable hash of the key),
so a model trained from images or from embeddings is validated on the same rows.
"""

from __future__ import annotations

import numpy as np

from dalle2.data.preprocess import Split, in_validation
from dalle2.data.schema import TRAINING_COLUMNS, DatasetError, check_columns, dataset_files, read_schema

PRIOR_COLUMNS = ("key", "tokens", "text_embed", "text_hidden", "image_embed")
DECODER_CARRY = {"image_embed": "image_embed"}  # passed through the image pipeline unchanged
DECODER_COLUMNS = (*TRAINING_COLUMNS, *DECODER_CARRY)
EMBEDDING_COLUMNS = {"prior": PRIOR_COLUMNS, "decoder": DECODER_COLUMNS}  # what each job reads


def check_embedding_columns(path: str, job: str) -> None:
    """One clear DatasetError when the embedding rows at ``path`` lack what ``job`` reads: for
    the decoder, above all, embeddings written without their images."""
    first = dataset_files(path)[0]
    schema = read_schema(first)
    if job == "decoder" and "image" not in schema.names and "image_embed" in schema.names:
        raise DatasetError(
            f"{path}: these embeddings were written without the images (`dalle2 data embed --no-images`), "
            "and the decoder learns to draw them: embed the dataset again with its images, or train the "
            "decoder from the image dataset (data.format: images)"
        )
    check_columns(schema, EMBEDDING_COLUMNS[job], first)


def keep_split(batch: dict[str, np.ndarray], *, split: Split, validation_fraction: float) -> dict[str, np.ndarray]:
    """The rows of ``batch`` that belong to ``split``."""
    validation = in_validation(batch["key"], validation_fraction)
    keep = validation if split == "validation" else ~validation
    return {name: column[keep] for name, column in batch.items()}


def embedding_rows(batch: dict[str, np.ndarray], *, split: Split, validation_fraction: float, carry=None, **_ignored):
    """The prior's rows of ``split`` from embedding rows: the pipeline's decoder for
    ``data.format: embeddings`` (nothing to decode; keys without a row are dropped and counted)."""
    import collections

    has_key = np.array([k is not None for k in batch["key"]], dtype=bool)
    drops = collections.Counter({"missing_key": int((~has_key).sum())}) if not has_key.all() else collections.Counter()
    rows = keep_split({name: values[has_key] for name, values in batch.items()}, split=split, validation_fraction=validation_fraction)
    return {name: rows[name] for name in (*PRIOR_COLUMNS, *(carry or {}))}, drops
