"""Bring existing image-caption data into the project's Parquet format (:mod:`.schema`).

Two kinds of source, local or in object storage:

* a folder of images (``.png .jpg .jpeg .webp .bmp .gif``, searched recursively) with
  their captions either in same-stem ``.txt`` files (``cats/1.png`` + ``cats/1.txt``) or
  in one ``captions.jsonl`` / ``captions.csv`` at the top of the folder, whose ``file``
  field is the image path relative to the folder;
* Parquet files with other column names, e.g. img2dataset's output
  (``--image-column jpg --caption-column txt``); an image column may also be Hugging
  Face's ``{bytes, path}`` struct;
* WebDataset tar shards (img2dataset's default output): one ``.tar``, a folder of them, or a
  brace list such as ``s3://bucket/laion/{00000..09999}.tar`` (:mod:`.webdataset`). The scalar
  fields of each sample's ``.json`` become extra columns (their types from the first sample
  that has one; a value of another type is left null).

PNG and JPEG bytes are kept as they are; other formats are re-encoded as PNG. A row
whose image cannot be decoded or whose caption is missing or empty is skipped and
counted in the :class:`ImportReport`, never a reason to stop.
"""

from __future__ import annotations

import collections
import csv
import io
import itertools
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from dalle2.data import storage
from dalle2.data.schema import IMAGE_CAPTION_SCHEMA, PARQUET_SUFFIX, DatasetError, ShardWriter, with_extra_columns
from dalle2.data.webdataset import is_webdataset_source, read_samples, shard_uris

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_FILES = ("captions.jsonl", "captions.csv")
KEPT_FORMATS = ("PNG", "JPEG")
READ_BATCH_ROWS = 256


@dataclass
class ImportReport:
    files: list[str]  # Parquet files written
    rows: int  # rows written
    skipped: collections.Counter = field(default_factory=collections.Counter)  # reason -> rows


@dataclass(frozen=True)
class _Row:
    key: str
    caption: Optional[str]
    image: Optional[bytes]
    extra: dict = field(default_factory=dict)
    problem: Optional[str] = None  # a reason to skip found while reading (a broken shard)


def encoded_image(data: bytes) -> tuple[bytes, int, int]:
    """(PNG or JPEG bytes, width, height) of an encoded image; raises ValueError if it
    does not decode. PNG/JPEG bytes pass through untouched; other formats become PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode fully: a truncated file fails here, not during training
            width, height = image.size
            if image.format in KEPT_FORMATS:
                return data, width, height
            buffer = io.BytesIO()
            keep_alpha = image.mode in ("RGBA", "LA") or "transparency" in image.info
            image.convert("RGBA" if keep_alpha else "RGB").save(buffer, format="PNG")
            return buffer.getvalue(), width, height
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:  # "not an image"
        raise ValueError(f"undecodable image: {error}") from error


def _read_text(uri: str) -> str:
    return storage.read_bytes(uri).decode("utf-8")


def _caption_table(src: str, caption_file: str, caption_column: str) -> dict[str, str]:
    """{image path relative to src: caption} from captions.jsonl or captions.csv."""
    text = _read_text(storage.join(src, caption_file))
    if caption_file.endswith(".jsonl"):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = list(csv.DictReader(io.StringIO(text)))
    if records and ("file" not in records[0] or caption_column not in records[0]):
        raise DatasetError(f"{caption_file}: each record needs 'file' and {caption_column!r}, got {sorted(records[0])}")
    return {posixpath.normpath(r["file"]): r[caption_column] for r in records}


def _folder_rows(src: str, caption_column: str) -> Iterator[_Row]:
    images = [f for f in storage.list_files(src) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise DatasetError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) there")
    return _folder_image_rows(src, images, caption_column)


def _folder_image_rows(src: str, images: list[str], caption_column: str = "caption") -> Iterator[_Row]:
    """Rows of the image files ``images`` (URIs under the folder ``src``), in name order."""
    files = storage.list_files(src)
    relative = {storage.relative_path(src, f): f for f in files}
    caption_file = next((name for name in CAPTION_FILES if name in relative), None)
    captions = _caption_table(src, caption_file, caption_column) if caption_file else None
    for name in sorted(storage.relative_path(src, uri) for uri in images):
        stem = posixpath.splitext(name)[0]
        if captions is not None:
            caption = captions.get(name)
        else:
            text_uri = relative.get(stem + ".txt")
            caption = _read_text(text_uri) if text_uri else None
        yield _Row(key=stem, caption=caption, image=storage.read_bytes(relative[name]))


def _image_bytes(column: pa.Array) -> list[Optional[bytes]]:
    """Bytes of a binary column or of Hugging Face's {bytes, path} image struct."""
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def _parquet_rows(files: list[str], image_column: str, caption_column: str, key_column: str) -> Iterator[_Row]:
    for file_uri in files:
        with storage.open_input(file_uri) as source:
            parquet = pq.ParquetFile(source)
            names = parquet.schema_arrow.names
            missing = [c for c in (image_column, caption_column) if c not in names]
            if missing:
                raise DatasetError(
                    f"{file_uri}: no column {', '.join(map(repr, missing))} (columns present: {', '.join(names)}); "
                    "name the right ones with --image-column/--caption-column"
                )
            has_key = key_column in names
            columns = [image_column, caption_column] + ([key_column] if has_key else [])
            stem = posixpath.splitext(posixpath.basename(file_uri))[0]
            row = 0
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
                images = _image_bytes(batch.column(image_column))
                captions = batch.column(caption_column).to_pylist()
                keys = batch.column(key_column).to_pylist() if has_key else [None] * batch.num_rows
                for image, caption, key in zip(images, captions, keys):
                    yield _Row(key=str(key) if key is not None else f"{stem}/{row:07d}", caption=caption, image=image)
                    row += 1


def _webdataset_rows(shards: list[str]) -> Iterator[_Row]:
    for shard in shards:
        for sample in read_samples(shard):
            yield _Row(key=sample.key, caption=sample.caption, image=sample.image, extra=sample.extra, problem=sample.problem)


_ARROW_TYPES = ((bool, pa.bool_()), (int, pa.int64()), (float, pa.float64()), (str, pa.string()))


def _extra_fields(row: Optional[_Row]) -> list[pa.Field]:
    """Columns for the scalar metadata of ``row`` (the first row that has any)."""
    if row is None:
        return []
    taken = set(IMAGE_CAPTION_SCHEMA.names)
    return [pa.field(name, next(t for py, t in _ARROW_TYPES if isinstance(value, py)))
            for name, value in row.extra.items() if name not in taken]  # fmt: skip


def _extra_values(row: _Row, fields: list[pa.Field]) -> dict:
    values = {}
    for column in fields:
        value = row.extra.get(column.name)
        python_type = next(py for py, t in _ARROW_TYPES if t == column.type)
        fits = isinstance(value, python_type) and not (python_type is int and isinstance(value, bool))
        values[column.name] = value if fits or (python_type is float and isinstance(value, int) and not isinstance(value, bool)) else None
    return values


def _is_parquet_source(src: str) -> bool:
    return bool(storage.list_files(src, suffix=PARQUET_SUFFIX))


def import_dataset(
    src: str,
    out: str,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    key_column: str = "key",
    rows_per_file: int = 1024,
) -> ImportReport:
    """Convert ``src`` (a folder of images with captions, or Parquet) into Parquet shards
    under ``out``. ``image_column``/``key_column`` name Parquet columns; ``caption_column``
    names the caption in Parquet, captions.jsonl or captions.csv."""
    extras: list[pa.Field] = []
    if is_webdataset_source(src):
        rows = _webdataset_rows(shard_uris(src))
        seen: list[_Row] = []
        for row in rows:  # the first row with metadata decides the extra columns
            seen.append(row)
            if row.extra:
                break
        extras = _extra_fields(seen[-1] if seen and seen[-1].extra else None)
        rows = itertools.chain(seen, rows)
    elif _is_parquet_source(src):
        rows = _parquet_rows(storage.list_files(src, suffix=PARQUET_SUFFIX), image_column, caption_column, key_column)
    else:
        rows = _folder_rows(src, caption_column)
    schema = with_extra_columns(extras)
    skipped: collections.Counter = collections.Counter()
    pending: list[dict] = []
    from dalle2.progress_bars import Bar

    with ShardWriter(out, schema, rows_per_file=rows_per_file) as writer, Bar(None, "import", "rows") as bar:
        for row in rows:
            bar.update()
            reason = _skip_reason(row)
            if reason is None:
                try:
                    image, width, height = encoded_image(row.image)
                except ValueError:
                    reason = "undecodable_image"
            if reason is not None:
                skipped[reason] += 1
                log.warning("skipping %s: %s", row.key, reason.replace("_", " "))
                continue
            caption = row.caption.strip()
            pending.append({"key": row.key, "caption": caption, "image": image, "width": width, "height": height,
                            **_extra_values(row, extras)})  # fmt: skip
            if len(pending) == READ_BATCH_ROWS:
                writer.write(pa.Table.from_pylist(pending, schema=schema))
                pending = []
        if pending:
            writer.write(pa.Table.from_pylist(pending, schema=schema))
    return ImportReport(files=writer.files, rows=writer.rows, skipped=skipped)


def _skip_reason(row: _Row) -> Optional[str]:
    if row.problem is not None:
        return row.problem
    if row.image is None:
        return "missing_image"
    if row.caption is None:
        return "missing_caption"
    if not str(row.caption).strip():
        return "empty_caption"
    return None
