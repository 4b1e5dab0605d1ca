"""Which rows each training worker reads in each epoch, and in what order: plain functions, no Ray.

An epoch is planned from ``(seed, epoch)`` alone, so any process can recompute it:

1. The dataset is cut into *pieces*: row ranges of its Parquet files (a whole file each, unless
   the dataset has fewer than two files per worker; then files are cut so that every worker
   gets some). Row counts come from the Parquet footers, not from the data.
2. The pieces are permuted by ``(seed, epoch)`` and dealt round-robin: worker ``r`` of ``W``
   reads pieces ``order[r::W]``. Its rows, piece after piece, form its *sequence* for the epoch.
3. The sequence is cut into windows of ``buffer_rows`` rows and each window is permuted by
   ``(seed, epoch, rank, window)``: the rows a batch mixes come from every piece the window
   spans. This is webdataset's two levels (``shardshuffle`` + ``shuffle(n)``) with a window
   instead of a reservoir, so that the order is a pure function of the plan.

A worker's position in the epoch is one integer: how many entries of its shuffled sequence it
has passed (delivered, or skipped as dropped or validation rows). A resumed epoch recomputes the
plan, never reads the pieces that lie wholly before the position's window, and within that
window skips the rows already passed before decoding anything (:meth:`EpochPlan.remaining`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from dalle2.data import storage
from dalle2.data.schema import DatasetError, dataset_files

PIECES_PER_WORKER = 2  # at least this many pieces per worker, so that every worker reads something


class ShuffleMode(str, enum.Enum):
    FILES_AND_ROWS = "files_and_rows"  # a new piece order every epoch, rows mixed in windows
    NONE = "none"  # pieces in file order, rows in file order (validation, embedding, debugging)


@dataclass(frozen=True)
class ShuffleConfig:
    """``data.shuffle`` of a training job. On by default for training; validation and the
    embedding job read in file order."""

    mode: ShuffleMode = ShuffleMode.FILES_AND_ROWS
    seed: int = 0
    buffer_rows: int = 1024  # rows mixed together on each worker (decoded rows held in memory)

    def __post_init__(self) -> None:
        if isinstance(self.buffer_rows, bool) or not isinstance(self.buffer_rows, int) or self.buffer_rows < 1:
            raise ValueError(f"shuffle.buffer_rows must be an integer >= 1, got {self.buffer_rows!r}")

    @property
    def shuffles(self) -> bool:
        return self.mode is ShuffleMode.FILES_AND_ROWS


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one Parquet file."""

    file: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class DataPosition:
    """Where one worker is in its data: epoch, and entries of its shuffled sequence passed."""

    epoch: int = 0
    position: int = 0


def file_row_counts(files: list[str]) -> list[int]:
    """Rows of each Parquet file, from its footer."""
    counts = []
    for file_uri in files:
        with storage.open_input(file_uri) as file:
            counts.append(pq.ParquetFile(file).metadata.num_rows)
    return counts


def dataset_pieces(path: str, workers: int, webdataset: bool = False) -> list[Piece]:
    """The pieces of the dataset at ``path`` for ``workers`` workers (see module doc): Parquet
    files, or with ``webdataset`` tar shards (:mod:`.webdataset`; a row is a sample)."""
    if webdataset:
        from dalle2.data.webdataset import count_samples, shard_uris

        files = shard_uris(path)
        counts = [count_samples(uri) for uri in files]
    else:
        files = dataset_files(path)
        counts = file_row_counts(files)
    if sum(counts) == 0:
        raise DatasetError(f"{path}: {len(files)} files but no rows in them")
    cuts = max(1, -(-PIECES_PER_WORKER * workers // len(files)))  # pieces per file
    pieces = []
    for file_uri, rows in zip(files, counts):
        bounds = np.linspace(0, rows, min(cuts, max(rows, 1)) + 1).round().astype(int)
        pieces += [Piece(file_uri, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return pieces


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def piece_order(count: int, shuffle: ShuffleConfig, epoch: int) -> np.ndarray:
    """The order of all pieces in ``epoch``: a permutation drawn from (seed, epoch)."""
    if not shuffle.shuffles:
        return np.arange(count)
    return _rng(shuffle.seed, epoch).permutation(count)


@dataclass
class Work:
    """What a decode task reads: rows ``[start, stop)`` of ``file``, whose first row is entry
    ``first_index`` of the worker's sequence, minus the sequence entries in ``skip``; all of
    the piece that starts at row ``piece_start`` (it names the piece in drop counts)."""

    file: str
    start: int
    stop: int
    first_index: int
    skip: list[int] = field(default_factory=list)
    piece_start: int = 0


@dataclass(frozen=True)
class EpochPlan:
    """One worker's epoch: its pieces in order and how its sequence is shuffled."""

    pieces: tuple[Piece, ...]
    shuffle: ShuffleConfig
    epoch: int
    rank: int

    @classmethod
    def build(cls, pieces: list[Piece], shuffle: ShuffleConfig, epoch: int, rank: int, world_size: int) -> "EpochPlan":
        order = piece_order(len(pieces), shuffle, epoch)
        return cls(tuple(pieces[i] for i in order[rank::world_size]), shuffle, epoch, rank)

    @property
    def rows(self) -> int:
        return sum(piece.rows for piece in self.pieces)

    @property
    def window_rows(self) -> int:
        return self.shuffle.buffer_rows

    def window_order(self, window: int) -> np.ndarray:
        """Sequence offsets within window ``window`` in delivery order: entry ``j`` of the
        window is delivered ``j``-th (a permutation of ``range(window size)``)."""
        size = min(self.window_rows, self.rows - window * self.window_rows)
        if not self.shuffle.shuffles:
            return np.arange(size)
        return _rng(self.shuffle.seed, self.epoch, self.rank, window, 1).permutation(size)

    def remaining(self, position: int) -> tuple[list[Work], int]:
        """The reads that deliver the sequence from ``position`` on, and the rows skipped
        unread. Pieces before the position's window are not read at all; rows of that window
        already passed are listed in ``skip`` and never decoded."""
        window, offset = divmod(position, self.window_rows)
        begin = window * self.window_rows
        passed = set((begin + self.window_order(window)[:offset]).tolist()) if offset else set()
        work, index = [], 0
        for piece in self.pieces:
            end = index + piece.rows
            if end > begin:
                first = max(index, begin)
                start = piece.start + (first - index)
                skip = sorted(i for i in passed if first <= i < end)
                work.append(Work(piece.file, start, piece.stop, first, skip, piece.start))
            index = end
        skipped_unread = begin + len(passed)
        return work, skipped_unread


class WindowShuffler:
    """Rows of one worker's sequence in, the same rows in the plan's delivery order out.

    ``add`` takes decoded rows in sequence order (a column dict with ``sequence_index``);
    ``drain`` yields every window that can no longer grow, reordered, as (rows, positions):
    ``positions[i]`` is the sequence position after row ``i`` (what a checkpoint records)."""

    def __init__(self, plan: EpochPlan, position: int = 0):
        self.plan, self.first_position = plan, position
        self.window = position // plan.window_rows
        self.pending: list[dict[str, np.ndarray]] = []
        self.last_index = -1

    def add(self, rows: dict[str, np.ndarray]) -> None:
        indices = rows["sequence_index"]
        if len(indices) and (indices[0] <= self.last_index or np.any(np.diff(indices) <= 0)):
            raise RuntimeError("decoded rows arrived out of sequence order (the pipeline must preserve order)")
        if len(indices):
            self.last_index = int(indices[-1])
            self.pending.append(rows)

    def drain(self, final: bool = False):
        size = self.plan.window_rows
        while self.pending:
            pending = {name: np.concatenate([p[name] for p in self.pending]) for name in self.pending[0]}
            window_end = (self.window + 1) * size
            if not final and self.last_index < window_end:
                return  # the window may still get rows
            inside = pending["sequence_index"] < window_end
            order = self.plan.window_order(self.window)
            rank_in_window = np.empty(len(order), np.int64)
            rank_in_window[order] = np.arange(len(order))
            slot = rank_in_window[pending["sequence_index"][inside] - self.window * size]
            sort = np.argsort(slot, kind="stable")
            rows = {name: values[inside][sort] for name, values in pending.items()}
            positions = self.window * size + slot[sort] + 1
            rest = {name: values[~inside] for name, values in pending.items()}
            self.pending = [rest] if len(rest["sequence_index"]) else []
            self.window += 1
            if len(positions):
                yield rows, positions
