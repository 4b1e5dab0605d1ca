"""The prior trained from precomputed CLIP embeddings (``dalle2 data embed``), not from images.

DALL-E 2's prior learns text encoding -> image embedding of a frozen CLIP (section 2.2); with
the embeddings computed once, its workers never run CLIP. The rows hold ``key``, ``tokens``
[L], ``text_embed`` [D], ``text_hidden`` [L, W] and ``image_embed`` [D] (see
:mod:`dalle2.data.embed`); the validation split is the one the image pipeline uses (a stable
hash of the key), so a prior trained either way is validated on the same rows.
"""

from __future__ import annotations

import numpy as np

from dalle2.data.preprocess import Split, in_validation

EMBEDDING_COLUMNS = ("key", "tokens", "text_embed", "text_hidden", "image_embed")


def keep_split(batch: dict[str, np.ndarray], *, split: Split, validation_fraction: float) -> dict[str, np.ndarray]:
    """The rows of ``batch`` that belong to ``split``."""
    validation = in_validation(batch["key"], validation_fraction)
    keep = validation if split == "validation" else ~validation
    return {name: column[keep] for name, column in batch.items()}


def build_embedding_datasets(path: str, validation_fraction: float, cpus_per_task: float):
    """(train, validation) Ray datasets over the embedding Parquet files at ``path``, lazily."""
    import ray.data

    from dalle2.data.pipeline import check_dataset

    filesystem, files = check_dataset(path, EMBEDDING_COLUMNS)
    rows = ray.data.read_parquet(files, filesystem=filesystem, num_cpus=cpus_per_task).select_columns(list(EMBEDDING_COLUMNS))

    def split(name: Split):
        return rows.map_batches(
            keep_split, batch_format="numpy", num_cpus=cpus_per_task,
            fn_kwargs={"split": name, "validation_fraction": validation_fraction},
        )  # fmt: skip

    return split("train"), split("validation")
