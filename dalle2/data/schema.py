"""The image-caption Parquet format that every dataset of this project uses.

A dataset is a folder (local, ``file://`` or ``s3://``) of Parquet files named
``part-00000.parquet``, ``part-00001.parquet``, ... Each row is one image:

============  ==========  ============================================================
column        type        meaning
============  ==========  ============================================================
``key``       string      unique id of the row (also decides its train/validation split)
``caption``   string      the text that describes the image
``image``     binary      the encoded image file: PNG or JPEG bytes, as stored on disk
``width``     int64       width of the encoded image in pixels
``height``    int64       height of the encoded image in pixels
============  ==========  ============================================================

More columns may follow (the synthetic shapes keep their attribute labels this way);
readers select the columns they need (Parquet column pruning), so extras cost nothing.
Images stay encoded: a 64x64 PNG is ~10x smaller than its pixels, and decoding is
parallel work for the Ray Data pipeline.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from dalle2.data import storage

IMAGE_CAPTION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
    ]
)
TRAINING_COLUMNS = ("key", "caption", "image")  # what the training pipeline reads
SHARD_NAME = "part-{index:05d}.parquet"
PARQUET_SUFFIX = ".parquet"


class DatasetError(ValueError):
    """A dataset that cannot be used as it is: no Parquet files, missing columns."""


def with_extra_columns(extra: Sequence[pa.Field]) -> pa.Schema:
    """The image-caption schema followed by dataset-specific columns."""
    schema = IMAGE_CAPTION_SCHEMA
    for column in extra:
        schema = schema.append(column)
    return schema


def _is_binary(type_: pa.DataType) -> bool:
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_)


def _is_string(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def check_columns(schema: pa.Schema, required: Iterable[str], source: str) -> None:
    """Raise one DatasetError naming every required column that ``schema`` lacks or
    types wrongly, and the columns it does have (so a renamed column is easy to spot)."""
    expected = {f.name: f.type for f in IMAGE_CAPTION_SCHEMA}
    problems = []
    for name in required:
        if name not in schema.names:
            problems.append(f"no column {name!r}")
            continue
        actual = schema.field(name).type
        wanted = expected.get(name)
        if wanted is not None and not _same_kind(wanted, actual):
            problems.append(f"column {name!r} is {actual}, expected {wanted}")
    if problems:
        raise DatasetError(f"{source}: {'; '.join(problems)} (columns present: {', '.join(schema.names)})")


def _same_kind(wanted: pa.DataType, actual: pa.DataType) -> bool:
    if _is_binary(wanted):
        return _is_binary(actual)
    if _is_string(wanted):
        return _is_string(actual)
    return pa.types.is_integer(actual)


def dataset_files(uri: str) -> list[str]:
    """The Parquet files of a dataset folder (or the file itself), in name order."""
    files = storage.list_files(uri, suffix=PARQUET_SUFFIX)
    if not files:
        raise DatasetError(f"{uri}: no {PARQUET_SUFFIX} files there")
    return files


def read_schema(file_uri: str) -> pa.Schema:
    """The schema from a Parquet file's footer (reads a few kilobytes, not the data)."""
    with storage.open_input(file_uri) as file:
        return pq.read_schema(file)


def read_dataset(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """All rows of a dataset in one table, in file order. For inspection, tests and small
    datasets; training streams the files through :mod:`dalle2.data.ray_reader` instead."""
    tables = []
    for file_uri in dataset_files(uri):
        with storage.open_input(file_uri) as file:
            tables.append(pq.read_table(file, columns=list(columns) if columns else None))
    return pa.concat_tables(tables)


class ShardWriter:
    """Writes rows into ``part-NNNNN.parquet`` files of at most ``rows_per_file`` rows.

    Same rows in, same bytes out: no timestamps go into the files, so a builder with a
    fixed seed reproduces its dataset byte for byte.

        with ShardWriter(out_uri, schema, rows_per_file=1024) as writer:
            writer.write(table)
        writer.files  # the URIs written
    """

    def __init__(self, out_uri: str, schema: pa.Schema, rows_per_file: int = 1024):
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
        existing = storage.list_files(out_uri, suffix=PARQUET_SUFFIX) if storage.exists(out_uri) else []
        if existing:
            raise FileExistsError(f"{out_uri} already holds Parquet files ({existing[0]}...); choose an empty location")
        self.out_uri = out_uri
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.files: list[str] = []
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, rows: pa.Table | pa.RecordBatch) -> None:
        table = pa.Table.from_batches([rows]) if isinstance(rows, pa.RecordBatch) else rows
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def close(self) -> list[str]:
        if self._pending_rows:
            self._flush(self._pending_rows)
        return self.files

    def _flush(self, count: int) -> None:
        table = pa.concat_tables(self._pending)
        shard, rest = table.slice(0, count), table.slice(count)
        file_uri = storage.join(self.out_uri, SHARD_NAME.format(index=len(self.files)))
        with storage.open_output(file_uri) as sink:
            pq.write_table(shard, sink, compression="zstd")
        self.files.append(file_uri)
        self.rows += shard.num_rows
        self._pending, self._pending_rows = [rest], rest.num_rows

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
