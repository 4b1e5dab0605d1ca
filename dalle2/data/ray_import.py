"""``dalle2 data import`` as a resumable Ray Data job.

    report = ray_import(RayImportConfig(src="s3://b/laion/{00000..09999}.tar", out="s3://b/laion-pq", workers=64))

The input is cut into *units*: a tar shard, a Parquet file, or a chunk of a folder's images.
A task converts a run of consecutive units (:func:`group_units`: about ``TASK_INPUT_BYTES`` of
input each, so that small shards do not cost a task each, yet several tasks per worker). For
each unit it reads the unit's rows, decodes each image once (and, with
``max_side``, shrinks it so that its longer side is at most that), and writes them as Parquet
files ``part-<unit>-<n>.parquet`` of ``rows_per_file`` rows; then, last, a marker
``_done/unit-<unit>.json`` with the unit's files, rows and skips. A rerun skips every unit with
a marker and converts the others again from scratch, after deleting what an interrupted attempt
left of them: no row is written twice, none is lost. Markers are the only state; the job can be
killed at any point.

Row-level problems (no image, no caption, an image that does not decode, a broken shard) are
skipped and counted by reason, as the single-process importer (:mod:`.importer`, kept as the
baseline of ``dalle2 bench import``) counts them. Problems with the whole input (nothing there,
a brace list that matches nothing, a first shard that is not a tar, ``max_side`` below 8) are
errors before any task starts.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import posixpath
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dalle2.data import importer, storage
from dalle2.data.importer import ImportReport
from dalle2.data.schema import PARQUET_SUFFIX, with_extra_columns

log = logging.getLogger(__name__)

DONE_DIR = "_done"
MIN_SIDE = 8
FOLDER_UNIT_IMAGES = 1024  # images of a folder source per unit
# A task's input: one LAION shard from img2dataset (10,000 images, hundreds of MiB) is a task of
# its own; small shards are grouped, since each Ray Data task costs a fixed ~0.1-0.2 s of
# scheduling and result handling (measured on 2 cores: 512-image shards left the 2 workers ~35%
# idle, and the import no faster than one process).
TASK_INPUT_BYTES = 64 << 20
TASKS_PER_WORKER = 4  # the least, where there are enough units: the last tasks still balance


@dataclass(frozen=True)
class RayImportConfig:
    src: str
    out: str
    workers: int = 0  # conversion tasks at once; 0 = the cluster's CPU count
    max_side: int = 0  # 0 = keep the size; else the longer side shrunk to at most this
    rows_per_file: int = 1024
    cpus_per_task: float = 0.5
    image_column: str = "image"
    caption_column: str = "caption"
    key_column: str = "key"

    def __post_init__(self) -> None:
        if self.max_side and self.max_side < MIN_SIDE:
            raise ValueError(f"--max-side must be at least {MIN_SIDE} (or 0 to keep the size), got {self.max_side}")
        if self.workers < 0 or self.rows_per_file < 1 or self.cpus_per_task <= 0:
            raise ValueError("workers must be >= 0, rows_per_file >= 1 and cpus_per_task > 0")


@dataclass
class Unit:
    index: int
    kind: str  # webdataset | parquet | folder
    files: list[str] = field(default_factory=list)
    size: int = 0  # bytes of input


def plan_units(config: RayImportConfig) -> tuple[list[Unit], list[pa.Field]]:
    """The units of the input and the extra columns (from the first WebDataset sample with a
    ``.json``); raises before any task for input that cannot be used."""
    from dalle2.data.webdataset import TAR_SUFFIX, is_webdataset_source, shard_uris

    if is_webdataset_source(config.src):
        shards = shard_uris(config.src)
        sizes: dict[str, int] = {}
        for folder in sorted({posixpath.dirname(shard) for shard in shards}):  # a listing per folder, not a request per shard
            sizes.update(storage.list_file_sizes(folder, suffix=TAR_SUFFIX, recursive=False))
        first = next((row for row in importer._webdataset_rows(shards[:1]) if row.extra), None)
        units = [Unit(i, "webdataset", [s], sizes.get(s, 0)) for i, s in enumerate(shards)]
        return units, importer._extra_fields(first)
    if importer._is_parquet_source(config.src):
        sizes = storage.list_file_sizes(config.src, suffix=PARQUET_SUFFIX)
        return [Unit(i, "parquet", [f], size) for i, (f, size) in enumerate(sizes.items())], []
    sizes = {f: n for f, n in storage.list_file_sizes(config.src).items() if f.lower().endswith(importer.IMAGE_SUFFIXES)}
    if not sizes:
        raise importer.DatasetError(f"{config.src}: no images, Parquet files or tar shards there")
    images = list(sizes)
    chunks = [images[i : i + FOLDER_UNIT_IMAGES] for i in range(0, len(images), FOLDER_UNIT_IMAGES)]
    return [Unit(i, "folder", chunk, sum(sizes[f] for f in chunk)) for i, chunk in enumerate(chunks)], []


def group_units(units: list[Unit], workers: int) -> list[list[Unit]]:
    """Consecutive units as tasks of about equal input: as many as there are ``TASK_INPUT_BYTES``
    of input, and at least ``TASKS_PER_WORKER`` per worker (so that the last ones balance),
    never more than there are units."""
    total = sum(unit.size for unit in units)
    if not total:
        return [[unit] for unit in units]
    count = min(len(units), max(workers * TASKS_PER_WORKER, math.ceil(total / TASK_INPUT_BYTES)))
    tasks: list[list[Unit]] = [[]]
    done = 0
    for unit in units:
        if tasks[-1] and done >= len(tasks) * total / count:  # this task has its share: start the next
            tasks.append([])
        tasks[-1].append(unit)
        done += unit.size
    return tasks


def marker_uri(out: str, index: int) -> str:
    return storage.join(out, DONE_DIR, f"unit-{index:06d}.json")


def shrink(image_bytes: bytes, width: int, height: int, max_side: int) -> tuple[bytes, int, int]:
    """The image with its longer side at most ``max_side`` (bicubic, antialiased), in its own
    format (JPEG quality 95, else PNG); unchanged if already small enough."""
    if max(width, height) <= max_side:
        return image_bytes, width, height
    with Image.open(io.BytesIO(image_bytes)) as image:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        is_jpeg = image.format == "JPEG"
        if is_jpeg:
            image.draft("RGB", size)  # decode at a reduced scale first when much larger
        small = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0 if not is_jpeg else None)
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG" if is_jpeg else "PNG", **({"quality": 95} if is_jpeg else {}))
    return buffer.getvalue(), size[0], size[1]


def _unit_rows(unit: Unit, config: RayImportConfig, root: str):
    if unit.kind == "webdataset":
        return importer._webdataset_rows(unit.files)
    if unit.kind == "parquet":
        return importer._parquet_rows(unit.files, config.image_column, config.caption_column, config.key_column)
    return importer._folder_image_rows(root, unit.files, config.caption_column)


def _unit_prefix(index: int) -> str:
    return f"part-{index:06d}-"


def delete_partial_output(out: str, pending: list[Unit]) -> int:
    """Delete what interrupted attempts left of the ``pending`` units (their Parquet files without a
    marker); returns how many. Done once on the driver: one listing of ``out``, not one per task
    (with 10,000 shards, 10,000 listings of a folder that grows to 10,000+ files). A task Ray
    retries within the same run writes the same file names again, so it needs no cleanup."""
    if not pending or not storage.exists(out):
        return 0
    prefixes = tuple(_unit_prefix(unit.index) for unit in pending)
    stale = [uri for uri in storage.list_files(out, suffix=PARQUET_SUFFIX, recursive=False) if posixpath.basename(uri).startswith(prefixes)]
    for uri in stale:
        storage.delete(uri)
    return len(stale)


def convert_unit(unit: Unit, config: RayImportConfig, extras: list[pa.Field]) -> dict:
    """Convert one unit: write its files, then its marker. Returns the marker's content. A unit
    that already has its marker (its task failed later, and Ray runs the task again) is not redone."""
    marker = marker_uri(config.out, unit.index)
    if storage.exists(marker):
        return json.loads(storage.read_bytes(marker))
    prefix = _unit_prefix(unit.index)
    schema = with_extra_columns(extras)
    skipped: collections.Counter = collections.Counter()
    files, pending, rows_written = [], [], 0

    def flush() -> None:
        nonlocal pending, rows_written
        uri = storage.join(config.out, f"{prefix}{len(files):04d}{PARQUET_SUFFIX}")
        with storage.open_output(uri) as sink:
            pq.write_table(pa.Table.from_pylist(pending, schema=schema), sink)
        files.append(posixpath.basename(uri))
        rows_written += len(pending)
        pending = []

    for row in _unit_rows(unit, config, config.src):
        reason = importer._skip_reason(row)
        if reason is None:
            try:
                image, width, height = importer.encoded_image(row.image)  # the one full decode
                if config.max_side:
                    image, width, height = shrink(image, width, height, config.max_side)
            except (ValueError, OSError):
                reason = "undecodable_image"
        if reason is not None:
            skipped[reason] += 1
            continue
        pending.append({"key": row.key, "caption": row.caption.strip(), "image": image, "width": width,
                        "height": height, **importer._extra_values(row, extras)})  # fmt: skip
        if len(pending) == config.rows_per_file:
            flush()
    if pending:
        flush()
    done = {"unit": unit.index, "inputs": unit.files, "files": files, "rows": rows_written, "skipped": dict(skipped)}
    storage.write_bytes(marker, json.dumps(done).encode())  # last: the unit is complete
    return done


def _convert_block(block: dict, *, config: RayImportConfig, extras: list[pa.Field]) -> dict:
    import numpy as np

    results = []
    for task in block["units"]:
        for unit in json.loads(task):
            results.append(convert_unit(Unit(**unit), config, extras))
    return {"marker": np.array([json.dumps(r) for r in results], dtype=object)}


def ray_import(config: RayImportConfig) -> ImportReport:
    """Convert ``config.src`` into Parquet under ``config.out`` on the connected Ray cluster
    (one is started if none is), resuming a previous run into the same ``out``."""
    import ray
    import ray.data

    units, extras = plan_units(config)  # every input error before any task
    done = {}
    for unit in units:
        if storage.exists(marker_uri(config.out, unit.index)):
            done[unit.index] = json.loads(storage.read_bytes(marker_uri(config.out, unit.index)))
    pending = [u for u in units if u.index not in done]
    if done:
        log.warning("resuming the import into %s: %d of %d units already complete", config.out, len(done), len(units))
    stale = delete_partial_output(config.out, pending)
    if stale:
        log.warning("deleted %d Parquet files that an interrupted import left of units without a marker", stale)
    if pending:
        if not ray.is_initialized():
            from dalle2.data.ray_reader import init_ray

            init_ray()  # RAY_ADDRESS's cluster, else a local one that keeps its workers
        workers = config.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        tasks = group_units(pending, workers)
        log.info("converting %d units in %d tasks, %d at once", len(pending), len(tasks), workers)
        items = [{"units": json.dumps([asdict(unit) for unit in task])} for task in tasks]
        results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _convert_block, batch_format="numpy", batch_size=None, num_cpus=config.cpus_per_task,
            compute=ray.data.TaskPoolStrategy(size=workers), fn_kwargs={"config": config, "extras": extras},
        )  # fmt: skip
        # One operator whose outputs are markers of a few hundred bytes: Ray Data's per-operator
        # reservation has nothing to share out, and it held the job to one task until its first
        # look at the cluster's resources a second later (10% of a 10 s import on 2 cores).
        results.context.op_resource_reservation_enabled = False
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            for marker in batch["marker"]:
                result = json.loads(marker)
                done[result["unit"]] = result
    skipped: collections.Counter = collections.Counter()
    for result in done.values():
        skipped.update(result["skipped"])
    files = [storage.join(config.out, name) for index in sorted(done) for name in done[index]["files"]]
    return ImportReport(files=files, rows=sum(r["rows"] for r in done.values()), skipped=skipped)
