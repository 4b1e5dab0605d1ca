"""The prior and the decoder trained from precomputed CLIP embeddings (``dalle2 data embed``).

DALL-E 2 trains both on a frozen CLIP (sections 2.1, 2.2); with the embeddings computed once,
their workers never run CLIP. The rows hold ``key``, ``caption``, ``tokens`` [L],
``text_embed`` [D], ``text_hidden`` [L, W], ``image_embed`` [D] and, unless written with
``--no-images``, ``image`` (the encoded bytes; see :mod:`dalle2.data.embed`).

- The prior reads the embedding columns alone (:func:`build_prior_datasets`).
- The decoder reads ``key``, ``caption`` and ``image`` through the image pipeline (decode,
  resize, tokenize, bad rows dropped and counted: :mod:`dalle2.data.pipeline`), which carries
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


def build_prior_datasets(path: str, validation_fraction: float, cpus_per_task: float):
    """(train, validation) Ray datasets of the prior's columns of the embedding Parquet files
    at ``path``, lazily (the reader fetches only those columns: the images cost nothing)."""
    import ray.data

    from dalle2.data.pipeline import check_dataset

    filesystem, files = check_dataset(path, PRIOR_COLUMNS)
    rows = ray.data.read_parquet(files, filesystem=filesystem, num_cpus=cpus_per_task).select_columns(list(PRIOR_COLUMNS))

    def split(name: Split):
        return rows.map_batches(
            keep_split, batch_format="numpy", num_cpus=cpus_per_task,
            fn_kwargs={"split": name, "validation_fraction": validation_fraction},
        )  # fmt: skip

    return split("train"), split("validation")
