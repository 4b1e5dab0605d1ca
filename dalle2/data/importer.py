"""Bring existing image-caption data into the project's Parquet format (:mod:`.schema`).

Two kinds of source, local or in object storage:

* a folder of images (``.png .jpg .jpeg .webp .bmp .gif``, searched recursively) with
  their captions either in same-stem ``.txt`` files (``cats/1.png`` + ``cats/1.txt``) or
  in one ``captions.jsonl`` / ``captions.csv`` at the top of the folder, whose ``file``
  field is the image path relative to the folder;
* Parquet files with other column names, e.g. img2dataset's output
  (``--image-column jpg --caption-column txt``); an image column may also be Hugging
  Face's ``{bytes, path}`` struct.

PNG and JPEG bytes are kept as they are; other formats are re-encoded as PNG. A row
whose image cannot be decoded or whose caption is missing or empty is skipped and
counted in the :class:`ImportReport`, never a reason to stop.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from dalle2.data import storage
from dalle2.data.schema import IMAGE_CAPTION_SCHEMA, PARQUET_SUFFIX, DatasetError, ShardWriter

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
    files = storage.list_files(src)
    relative = {storage.relative_path(src, f): f for f in files}
    caption_file = next((name for name in CAPTION_FILES if name in relative), None)
    captions = _caption_table(src, caption_file, caption_column) if caption_file else None
    images = [name for name in sorted(relative) if name.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise DatasetError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) there")
    for name in images:
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
    if _is_parquet_source(src):
        rows = _parquet_rows(storage.list_files(src, suffix=PARQUET_SUFFIX), image_column, caption_column, key_column)
    else:
        rows = _folder_rows(src, caption_column)
    skipped: collections.Counter = collections.Counter()
    pending: list[dict] = []
    with ShardWriter(out, IMAGE_CAPTION_SCHEMA, rows_per_file=rows_per_file) as writer:
        for row in rows:
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
            pending.append({"key": row.key, "caption": caption, "image": image, "width": width, "height": height})
            if len(pending) == READ_BATCH_ROWS:
                writer.write(pa.Table.from_pylist(pending, schema=IMAGE_CAPTION_SCHEMA))
                pending = []
        if pending:
            writer.write(pa.Table.from_pylist(pending, schema=IMAGE_CAPTION_SCHEMA))
    return ImportReport(files=writer.files, rows=writer.rows, skipped=skipped)


def _skip_reason(row: _Row) -> Optional[str]:
    if row.image is None:
        return "missing_image"
    if row.caption is None:
        return "missing_caption"
    if not str(row.caption).strip():
        return "empty_caption"
    return None
