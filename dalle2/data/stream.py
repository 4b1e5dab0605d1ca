"""A training worker's own shuffled, resumable stream of decoded batches.

    source = training_source(DataConfig(path=...), ShuffleConfig(seed=0), workers=2)   # on the driver
    stream = TrainingStream(source, rank, world_size, batch_size=16, position=DataPosition())
    batch = stream.next()        # numpy columns: key, caption, image [B, S, S, 3] (+ tokens [B, L]
                                 # when the DataConfig has a context_length; training jobs tokenize
                                 # in the worker instead, see dalle2.data.ray_reader)
    stream.position              # DataPosition(epoch, position): what a checkpoint records

Each worker reads the pieces its epoch plan deals it (:mod:`.epochs`) through a Ray Data
dataset of its own: one decode task per piece, up to ``tasks_per_worker`` at once, the rows
delivered in sequence order (``preserve_order``) so that the window shuffle, and with it the
position, are deterministic. Ray Train's ``streaming_split`` is not used for training: which
blocks it hands to which worker depends on timing, so a resume could not be exact.

Workers are not kept in step by epochs: each goes on to its next epoch when its own pieces are
done (the steps are kept in step by the training loop). Over one epoch every row of the
dataset's training split reaches exactly one worker once, less each worker's last partial batch.

A resumed stream logs what it skipped (rows, pieces left unread) and how long re-planning took.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional

import numpy as np
import pyarrow.parquet as pq

from dalle2.data import storage
from dalle2.data.epochs import DataPosition, EpochPlan, Piece, ShuffleConfig, WindowShuffler, Work, dataset_pieces
from dalle2.data.preprocess import Flip, preprocess_batch

log = logging.getLogger(__name__)

SEQUENCE_COLUMN = "sequence_index"


@dataclass(frozen=True)
class TrainingSource:
    """Everything a worker needs to plan and read its epochs (built once, on the driver)."""

    config: object  # dalle2.data.ray_reader.DataConfig
    shuffle: ShuffleConfig
    pieces: tuple[Piece, ...]
    columns: tuple[str, ...]
    carry: Mapping[str, str] = field(default_factory=dict)
    dropped: object = None  # the DroppedRows actor of dalle2.data.ray_reader, or None
    tasks_per_worker: int = 1
    # The row decoder run in the tasks (tests wrap it to count what is decoded).
    preprocess: Callable = preprocess_batch


def _read_tar_rows(work: Work) -> dict[str, np.ndarray]:
    """Samples ``[start, stop)`` of a WebDataset shard as key/caption/image columns (the shard
    is read from its start: a tar has no index)."""
    from dalle2.data.webdataset import TAR_SUFFIX, read_samples

    assert work.file.endswith(TAR_SUFFIX)
    rows: dict[str, list] = {"key": [], "caption": [], "image": []}
    for index, sample in enumerate(read_samples(work.file)):
        if index >= work.stop:
            break
        if index >= work.start:
            rows["key"].append(sample.key)
            rows["caption"].append(sample.caption)
            rows["image"].append(sample.image)  # None for a broken sample: dropped as missing_image
    count = len(rows["key"])
    out = {name: _objects(values) for name, values in rows.items()}
    out[SEQUENCE_COLUMN] = np.arange(work.first_index, work.first_index + count, dtype=np.int64)
    return out


def _objects(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)  # never a 2-D array of bytes
    array[:] = values
    return array


def column_numpy(column) -> np.ndarray:
    """A Parquet column as numpy: tensor columns (Ray's tensor extension type, as `dalle2 data
    embed` writes them, or nested lists) as one [N, ...] array, the rest as they come."""
    import pyarrow as pa

    if isinstance(column.type, pa.ExtensionType) and column.num_chunks:
        return np.concatenate([chunk.to_numpy(zero_copy_only=False) for chunk in column.chunks])
    values = column.to_numpy(zero_copy_only=False)
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        return np.stack([np.stack(v) if v.dtype == object else v for v in values]) if len(values) else values
    return values


def read_work(work: Work, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The rows of ``work`` (for Parquet, only the row groups they lie in are read), less its
    skipped rows, as numpy columns with their sequence index."""
    if work.file.endswith(".tar"):
        rows = _read_tar_rows(work)
        keep = ~np.isin(rows[SEQUENCE_COLUMN], np.asarray(work.skip, np.int64))
        return {name: values[keep] for name, values in rows.items()}
    with storage.open_input(work.file) as file:
        parquet = pq.ParquetFile(file)
        groups, first_row, row = [], None, 0
        for group in range(parquet.metadata.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            if row + size > work.start and row < work.stop:
                groups.append(group)
                first_row = row if first_row is None else first_row
            row += size
        table = parquet.read_row_groups(groups, columns=list(columns))
    table = table.slice(work.start - first_row, work.stop - work.start)
    indices = np.arange(work.first_index, work.first_index + table.num_rows, dtype=np.int64)
    keep = ~np.isin(indices, np.asarray(work.skip, np.int64)) if work.skip else np.ones(len(indices), bool)
    out = {name: column_numpy(table.column(name))[keep] for name in columns}
    out[SEQUENCE_COLUMN] = indices[keep]
    return out


def _decode_work(items: dict, *, source: TrainingSource, split: str = "train") -> Iterator[dict]:
    """A map task: read and decode each work item of its block (one, as planned)."""
    import ray

    config = source.config
    for position in range(len(items["file"])):
        work = Work(items["file"][position], int(items["start"][position]), int(items["stop"][position]),
                    int(items["first_index"][position]), list(items["skip"][position]),
                    int(items["piece_start"][position]))  # fmt: skip
        rows = read_work(work, source.columns)
        out, drops = source.preprocess(
            rows, image_size=config.image_size, context_length=config.context_length, split=split,
            validation_fraction=config.validation_fraction, flip=config.flip if split == "train" else Flip.NONE,
            carry={**source.carry, SEQUENCE_COLUMN: SEQUENCE_COLUMN},
        )  # fmt: skip
        if drops and source.dropped is not None:
            log.warning("dropped %d rows of %s: %s", sum(drops.values()), work.file, dict(drops))
            # Named by split and piece: a piece read again (next epoch, resume) is not counted again.
            ray.get(source.dropped.add.remote(dict(drops), f"{split}:{work.file}:{work.piece_start}"))
        yield out


@contextlib.contextmanager
def _ordered_context():
    """Datasets planned in the block deliver blocks in input order and reserve nothing per
    operator (see dalle2.data.ray_reader._pipeline_context)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = context.execution_options.preserve_order, context.op_resource_reservation_enabled
    context.execution_options.preserve_order = True
    context.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.op_resource_reservation_enabled = previous


def decoded_rows(source: TrainingSource, work: list[Work], split: str = "train", tasks: int = 0):
    """A Ray dataset that decodes ``work`` in order, one task per item (``tasks`` at once;
    0 = the source's share per worker)."""
    import ray.data

    items = [{"file": w.file, "start": w.start, "stop": w.stop, "first_index": w.first_index, "skip": list(w.skip),
              "piece_start": w.piece_start} for w in work]  # fmt: skip
    with _ordered_context():
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        return dataset.map_batches(
            _decode_work, batch_format="numpy", batch_size=None, num_cpus=source.config.cpus_per_task,
            compute=ray.data.TaskPoolStrategy(size=tasks or source.tasks_per_worker),
            fn_kwargs={"source": source, "split": split},
        )  # fmt: skip


class TrainingStream:
    """Batches of ``batch_size`` rows of this worker's shuffled sequence, epoch after epoch;
    ``position`` says where it is (the last row of the last batch handed out)."""

    def __init__(self, source: TrainingSource, rank: int, world_size: int, batch_size: int, position: Optional[DataPosition] = None):
        self.source, self.rank, self.world_size, self.batch_size = source, rank, world_size, batch_size
        self.position = position or DataPosition()
        self._batches: Optional[Iterator[tuple[dict, int]]] = None
        self.epochs_opened = 0

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan.build(list(self.source.pieces), self.source.shuffle, epoch, self.rank, self.world_size)

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[dict, int]]:
        began = time.monotonic()
        plan = self.plan(epoch)
        work, skipped = plan.remaining(start)
        if start:
            unread = len(plan.pieces) - len(work)
            log.warning(
                "rank %d resumes epoch %d at row %d of %d: skipped %d rows (%d of %d pieces unread, the rest "
                "of the window skipped before decoding) in %.3f s", self.rank, epoch, start, plan.rows, skipped,
                unread, len(plan.pieces), time.monotonic() - began,
            )  # fmt: skip
        shuffler = WindowShuffler(plan, start)
        pending: list[dict] = []
        pending_rows, delivered = 0, 0
        blocks = decoded_rows(self.source, work).iter_batches(batch_size=None, batch_format="numpy") if work else iter(())
        for final, block in _with_final(blocks):
            if block is not None:
                shuffler.add(block)
            for rows, positions in shuffler.drain(final=final):
                rows["_position"] = positions
                pending.append(rows)
                pending_rows += len(positions)
                while pending_rows >= self.batch_size:
                    joined = {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}
                    batch = {name: values[: self.batch_size] for name, values in joined.items()}
                    rest = {name: values[self.batch_size :] for name, values in joined.items()}
                    pending, pending_rows = ([rest] if len(rest["_position"]) else []), pending_rows - self.batch_size
                    delivered += self.batch_size
                    position = int(batch.pop("_position")[-1])
                    batch.pop(SEQUENCE_COLUMN)
                    yield batch, position
        if start == 0 and delivered == 0:
            raise RuntimeError(
                f"rank {self.rank} got no full batch of {self.batch_size} rows in epoch {epoch} "
                f"({plan.rows} rows planned): use a smaller batch_size or fewer workers"
            )

    def batches_of_epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Every batch of one whole epoch, without moving ``position`` (benchmarks, tools)."""
        for batch, _ in self._epoch_batches(epoch, 0):
            yield batch

    def close(self) -> None:
        """Stop reading (Ray Data stops the epoch's tasks); ``next`` would open the epoch again."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def next(self) -> dict[str, np.ndarray]:
        for _attempt in range(2):
            if self._batches is None:
                self._batches = self._epoch_batches(self.position.epoch, self.position.position)
                self.epochs_opened += 1
            item = next(self._batches, None)
            if item is not None:
                batch, self.position.position = item
                return batch
            self.position = DataPosition(self.position.epoch + 1, 0)  # the remainder (< batch_size) is dropped
            self._batches = None
        raise RuntimeError("the training data yielded no batch in a new epoch")


def _with_final(blocks):
    """(False, block) for each block, then (True, None)."""
    for block in blocks:
        yield False, block
    yield True, None


def training_source(config, shuffle: ShuffleConfig, workers: int, dropped=None, carry: Mapping[str, str] | None = None,
                    tasks: int = 0, columns: tuple[str, ...] = (), preprocess: Callable = preprocess_batch,
                    webdataset: bool = False) -> TrainingSource:  # fmt: skip
    """The driver's half: pieces from the Parquet footers or the tar shards (one clear error if
    there are none), and each worker's share of the decode tasks."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    pieces = dataset_pieces(config.path, workers, webdataset=webdataset)
    return TrainingSource(
        config=config, shuffle=shuffle, pieces=tuple(pieces), columns=tuple(columns), carry=dict(carry or {}),
        dropped=dropped, tasks_per_worker=max(1, tasks // workers) if tasks else 1, preprocess=preprocess,
    )  # fmt: skip



def validation_rows(source: TrainingSource, tasks: int):
    """The validation rows of every piece, in file order, as a Ray dataset (Ray Train splits it)."""
    work = [Work(p.file, p.start, p.stop, 0, piece_start=p.start) for p in source.pieces]
    return decoded_rows(source, work, split="validation", tasks=tasks).drop_columns([SEQUENCE_COLUMN])
