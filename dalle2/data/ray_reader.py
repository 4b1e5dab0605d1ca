"""Image-caption Parquet -> Ray Data -> Ray Train workers.

    data = build_datasets(DataConfig(path="s3://bucket/shapes"))   # checks the data first
    trainer = TorchTrainer(..., datasets={"train": data.train, "validation": data.validation})
    # in each worker:
    shard = ray.train.get_dataset_shard("train")
    for batch in shard.iter_torch_batches(batch_size=B, collate_fn=CollateTrainingBatch()):
        batch["image"]    # uint8 [B, S, S, 3]; to_model_images: float [B, 3, S, S] in [-1, 1]
        batch["tokens"]   # int64 [B, L]
        batch["caption"]  # list[str] (and batch["key"])
    # build_datasets(config, carry={"image_embed": "image_embed"}): extra columns ride along,
    # as the decoder reads the rows of `dalle2 data embed` (dalle2.train.embeddings)

Training jobs read their training rows through :func:`build_training_data` instead: each
worker its own shuffled, exactly resumable share (:mod:`.stream`, :mod:`.epochs`), decoded by
:func:`dalle2.data.preprocess.preprocess_batch` as here; this module's datasets serve their
validation rows, ``dalle2 data embed`` and ``dalle2 bench data``.

Ray Train gives each worker a disjoint shard of ``train`` (``streaming_split``), so the
rows stream from storage through the map tasks into the workers and never gather on
the driver. The split is ``equal=True``: each epoch leaves out up to (workers - 1) rows
so that every worker takes the same number of steps. Bad rows are dropped and counted
(:meth:`TrainingData.dropped_rows`; the map task that drops them also logs a warning);
a job adds the counts to its metrics. A dataset that cannot be used at all fails in
:func:`check_dataset` before anything is scheduled. Local paths must be visible at the
same place on every node of a multi-node cluster; object storage has no such caveat.

CPU requests are fractional (``DataConfig.cpus_per_task``): with Ray's default of 1 CPU
per task, and 1 CPU per Train worker, a 2-core machine has no CPU left for the read and
map tasks once the workers hold theirs; the streaming executor then waits forever for
resources, with no error. A quarter CPU per task lets everything be scheduled; the OS
shares the cores. The same fractions would let Ray run four decode tasks per core, each
in its own worker process (0.25 GB; 0.96 GB when it also tokenizes, see below): ``DataConfig.
preprocess_tasks`` caps the decode tasks running at once, by default at the cluster's CPU
count plus 4. Not at the CPU count: a task also waits (its file read, the object store, its
own start), and with one task per core the cores idled a third of the time. On 2 cores, 2
tasks delivered 8,100 images/s and 6 tasks 9,500-11,000 (``dalle2 bench data``, 32px).

Each Parquet file is read and decoded by one task (Ray fuses the read into the decode), so
files are decoded in parallel and stream out as each is done, and the encoded bytes never
pass through the object store. (Ray 2.60's default Parquet reader packs up to 128 MiB of row
groups into one read task: a dataset of a few thousand small images became one block,
decoded by one task, and the first batch waited for the whole epoch.)

Ray stops task workers that idle for 1 s once a node has more worker processes than CPUs,
which on a small machine with Train workers and actors is always, so every pause of the pipeline
(backpressure, the end of an epoch) costs new workers. Clusters for training should keep idle
workers longer: ``RAY_idle_worker_killing_time_threshold_ms=60000`` in the environment of ``ray
start`` (``cluster/start-local.sh`` sets it); the local Ray that the demo, ``dalle2 train`` alone
and the benchmarks start gets it (:data:`LOCAL_RAY_SYSTEM_CONFIG`). Without it the demo's stages
kept starting decode workers (processes a few seconds old in the middle of a stage). Measured by
``dalle2 bench data``.

A worker's start is cheap only while it does not tokenize: the tokenizer is open_clip's, which
loads torch. Training jobs read untokenized captions (``DataConfig(context_length=None)``) and
the training worker tokenizes each batch (3 ms for 64 captions; it has the tokenizer loaded
anyway). Measured on 2 cores, 6 fresh decode workers decoding 12 pieces of the demo's dataset
(7,783 rows at 64px), 3 interleaved runs each, medians: 5.9 s without tokens, 19.8 s with
(0.30x); each worker used 1.5 CPU-seconds instead of 5.8, and 0.25 GB of memory instead of
0.96 GB. :mod:`.preprocess` and this module import torch only when they tokenize or collate.

Ray is imported here and in :mod:`.embed` only: the rest of :mod:`dalle2.data` is plain
Python that tests and tools call without a cluster.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data.collate_fn import NumpyBatchCollateFn

from dalle2.data import storage
from dalle2.data.epochs import ShuffleConfig
from dalle2.data.preprocess import Flip, Split, preprocess_batch
from dalle2.data.schema import TRAINING_COLUMNS, check_columns, dataset_files, read_schema

log = logging.getLogger(__name__)

# Decoded rows leave a map task in blocks of about this size. Each block costs Ray a fixed
# amount of CPU (object store put, metadata, the consumer's fetch and batching) whatever its
# size: at 32px, blocks of one 128-row call (merged by Ray to its 1 MiB minimum) cost 9% more
# CPU per image than blocks of a whole 1,024-row file (`dalle2 bench data`). Blocks of a few
# MB still stream: a file's rows leave as soon as they fill one. Object columns (captions, and
# encoded images where carried) count only their pointers, but a block never holds more than
# one file's rows, so the file size bounds it.
OUTPUT_BLOCK_BYTES = 8 * 1024 * 1024
# Decode tasks beyond one per CPU, to fill the cores while a task waits (see module doc).
EXTRA_PREPROCESS_TASKS = 4


@dataclass(frozen=True)
class DataConfig:
    """How a training job reads its data. ``dalle2.config.from_dict(DataConfig, {...})``
    builds one from a job's YAML."""

    path: str  # dataset folder (or one file): local, file:// or s3://bucket/prefix
    image_size: int = 64  # the model's resolution: short side resized to it, then center crop
    # Caption tokens (CLIP's context length); None: the batches carry the captions only, and the
    # consumer tokenizes (training jobs: their decode workers then never import torch).
    context_length: Optional[int] = 77
    validation_fraction: float = 0.05  # by a stable hash of the key, see preprocess.in_validation
    flip: Flip = Flip.NONE  # training split only; off by default (it breaks "left"/"right" captions)
    batch_size: int = 128  # rows per preprocessing call (bounds a call's memory, not a block's size)
    # Fraction of a CPU each read and map task requests. Below 1 so that the pipeline is
    # still scheduled when Train workers hold CPUs on a small machine (see module doc).
    cpus_per_task: float = 0.25
    # Most decode (map) tasks running at once; 0 = the cluster's CPU count plus
    # EXTRA_PREPROCESS_TASKS when the dataset is built (see module doc).
    preprocess_tasks: int = 0


def check_dataset(path: str, columns: tuple[str, ...] = TRAINING_COLUMNS) -> tuple[pafs.FileSystem, list[str]]:
    """The dataset's filesystem and Parquet file paths, or one clear error before any
    task starts: FileNotFoundError (no such path), StorageError (bucket or key unreadable),
    DatasetError (no Parquet files, or the first file's schema lacks a column)."""
    files = dataset_files(path)
    check_columns(read_schema(files[0]), columns, files[0])
    filesystem, _ = storage.resolve(path)
    return filesystem, [storage.path_of(f) for f in files]


# What a local Ray this project starts (the demo, `dalle2 train` alone, the benchmarks) is given,
# for the reason in the module's docstring: decode workers kept a minute through the pipeline's
# pauses instead of new worker processes (1.5 CPU-seconds each, 5.8 when they tokenize) at every
# epoch's end. A cluster that is joined keeps its own config (cluster/start-local.sh sets the
# same through the environment).
LOCAL_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


def init_ray(**local_options) -> None:
    """Join the cluster of ``RAY_ADDRESS``, else start a new local Ray with
    :data:`LOCAL_RAY_SYSTEM_CONFIG` and ``local_options``. Never a bare ``ray.init()``: that joins
    the last Ray this machine recorded, which may be gone (it then hangs); and Ray refuses a
    ``_system_config`` when joining a running cluster."""
    import os

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", _system_config=dict(LOCAL_RAY_SYSTEM_CONFIG), **local_options)


@ray.remote(num_cpus=0)
class DroppedRows:
    """Totals, by reason, of the rows that map tasks dropped (one actor per TrainingData).

    Each distinct row counts once: a task names what it read (a split and a piece of a file),
    and the drops of a source already counted are not added again when a later epoch, the next
    validation pass or a resumed attempt reads it again. A task reports after its whole piece,
    so a piece whose rows anyone consumed was counted whole."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.sources: set[str] = set()

    def add(self, counts: dict[str, int], source: str | None = None) -> None:
        if source is not None:
            if source in self.sources:
                return
            self.sources.add(source)
        self.counts.update(counts)

    def totals(self) -> dict[str, int]:
        return dict(self.counts)


def dropped_rows_counter():
    """A :class:`DroppedRows` actor on the driver's node. It asks for no CPU, so Ray could put it on
    any node, and a lost worker node would take the job's counts (and the Train controller that
    reads them at each report) with it; the driver's node lives as long as the job. The affinity
    is hard: a soft one put 10 of 20 counters on the worker nodes of a cluster whose head has no
    CPU (tests/multinode.py's), and one of them went with a lost node in CI."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return DroppedRows.options(scheduling_strategy=here).remote()


def _concatenate(outputs: list[dict]) -> dict:
    if len(outputs) == 1:
        return outputs[0]
    return {name: np.concatenate([out[name] for out in outputs]) for name in outputs[0]}


def _preprocess_in_task(
    block: dict, *, dropped: ray.actor.ActorHandle, rows_per_call: int, **options
) -> Iterator[dict]:
    """Decode one file's rows (the whole block: Ray then runs the read in this same task) in
    calls of ``rows_per_call`` rows, yielding output blocks of about ``OUTPUT_BLOCK_BYTES``."""
    total = len(block["key"])
    pending: list[dict] = []
    pending_bytes = 0
    # One file per block: its split, first key and size name it (drops count once per source).
    source = f"{options.get('split')}:{block['key'][0] if total else ''}:{total}"
    for start in range(0, total, rows_per_call):
        batch = {name: values[start : start + rows_per_call] for name, values in block.items()}
        out, drops = preprocess_batch(batch, **options)
        if drops:
            log.warning("dropped %d of %d rows: %s", sum(drops.values()), len(batch["key"]), dict(drops))
            # Wait for the actor: once the dataset is consumed, dropped_rows() is complete.
            ray.get(dropped.add.remote(dict(drops), f"{source}:{start}"))
        pending.append(out)
        pending_bytes += sum(values.nbytes for values in out.values())
        if pending_bytes >= OUTPUT_BLOCK_BYTES:
            yield _concatenate(pending)
            pending, pending_bytes = [], 0
    if pending:
        yield _concatenate(pending)


@dataclass
class TrainingData:
    train: ray.data.Dataset
    validation: ray.data.Dataset
    dropped: ray.actor.ActorHandle = field(repr=False)

    def dropped_rows(self) -> dict[str, int]:
        """Rows dropped so far, by reason, over both splits and every epoch read so far."""
        return ray.get(self.dropped.totals.remote())


@contextlib.contextmanager
def _pipeline_context():
    """Within the block, datasets are planned with two changes to Ray Data's defaults. Only the
    plan is affected: a dataset keeps a copy of the context it was created with.

    - ``ray.data.read_parquet`` plans Ray's file-based Parquet reader, which honours
      ``override_num_blocks`` (one read task per file), instead of the default reader that
      bin-packs small files into one task.
    - No per-operator resource reservation. Ray Data reserves half of the CPUs it may use for
      each operator's own budget; with Train workers holding most of a small node's CPUs, the
      decode operator's budget was one task, so every epoch started with one file decoding at
      a time (0.6 s of a 2 s epoch on 2 cores). The pipeline is one fused operator: there is
      nothing to reserve for.
    """
    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2, context.op_resource_reservation_enabled
    context.use_datasource_v2 = False
    context.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        context.use_datasource_v2, context.op_resource_reservation_enabled = previous


def _columns(carry: Mapping[str, str] | None) -> list[str]:
    """What the pipeline reads: the training columns, then the carried ones."""
    return list(dict.fromkeys([*TRAINING_COLUMNS, *(carry or {})]))


def preprocess_concurrency(config: DataConfig) -> int:
    """How many decode tasks the pipeline runs at once for ``config`` on the connected cluster."""
    if config.preprocess_tasks > 0:
        return config.preprocess_tasks
    return max(1, int(ray.cluster_resources().get("CPU", 1))) + EXTRA_PREPROCESS_TASKS


def preprocessed_rows(
    config: DataConfig,
    filesystem: pafs.FileSystem,
    files: list[str],
    split: Split,
    dropped: ray.actor.ActorHandle,
    carry: Mapping[str, str] | None = None,
) -> ray.data.Dataset:
    """The rows of ``split`` decoded and tokenized (see :mod:`.preprocess`), lazily.
    ``filesystem`` and ``files`` come from :func:`check_dataset`; drops go to ``dropped``;
    ``carry`` names extra columns passed through (``preprocess_batch``'s argument)."""
    # Column pruning: Ray pushes the selection into the reader, which fetches only these
    # columns from storage, so label columns and other extras cost nothing. One read task per
    # file, and the decode runs in the same task (Ray fuses the two when the map takes whole
    # blocks and both have the same task cap): no extra hop through the object store, and at
    # most `tasks` worker processes.
    tasks = preprocess_concurrency(config)
    with _pipeline_context():
        rows = ray.data.read_parquet(
            files,
            filesystem=filesystem,
            num_cpus=config.cpus_per_task,
            override_num_blocks=len(files),
            concurrency=tasks,
        ).select_columns(_columns(carry))
    options = dict(
        dropped=dropped,
        rows_per_call=config.batch_size,
        image_size=config.image_size,
        context_length=config.context_length,
        split=split,
        validation_fraction=config.validation_fraction,
        flip=config.flip if split == "train" else Flip.NONE,
        carry=dict(carry or {}),
    )
    return rows.map_batches(
        _preprocess_in_task,
        batch_format="numpy",
        batch_size=None,  # the whole block; _preprocess_in_task decodes it in calls of batch_size rows
        zero_copy_batch=True,  # the function only reads its input batch
        num_cpus=config.cpus_per_task,
        compute=ray.data.TaskPoolStrategy(size=tasks),
        fn_kwargs=options,
    )


class CollateTrainingBatch(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=CollateTrainingBatch())``: numeric columns become
    CPU tensors, text columns lists of str (Ray's default collate cannot make tensors of
    strings). Move the tensors to the device in the training loop."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        import torch  # here, not at the top: decode workers unpickle this module's DataConfig

        return {
            # Ray's zero-copy batches can be read-only; torch wants writable memory.
            name: torch.from_numpy(np.require(values, requirements=("C", "W"))) if values.dtype.kind in "biuf"
            else [str(value) for value in values]
            for name, values in batch.items()
        }


def build_datasets(config: DataConfig, carry: Mapping[str, str] | None = None) -> TrainingData:
    """Lazy train and validation datasets over ``config.path``; checks the data first.
    ``carry`` passes extra columns through to the batches (input name -> output name).

    Both splits read the same files and keep the rows their keys hash to, so neither
    split is materialized (``train_test_split`` would pull the data through the driver)."""
    filesystem, files = check_dataset(config.path, tuple(_columns(carry)))
    dropped = dropped_rows_counter()
    return TrainingData(
        train=preprocessed_rows(config, filesystem, files, "train", dropped, carry),
        validation=preprocessed_rows(config, filesystem, files, "validation", dropped, carry),
        dropped=dropped,
    )


@dataclass
class ShuffledTrainingData:
    """Training rows as a :class:`dalle2.data.stream.TrainingSource` (each worker reads its own
    shuffled, resumable share), validation rows as a lazy dataset (file order, split by Ray Train)."""

    train: "TrainingSource"  # noqa: F821
    validation: ray.data.Dataset
    dropped: ray.actor.ActorHandle = field(repr=False)

    def dropped_rows(self) -> dict[str, int]:
        return ray.get(self.dropped.totals.remote())


def build_training_data(
    config: DataConfig, shuffle: ShuffleConfig, workers: int, carry: Mapping[str, str] | None = None,
    preprocess=preprocess_batch, webdataset: bool = False, columns: tuple[str, ...] | None = None,
) -> ShuffledTrainingData:  # fmt: skip
    """What a training job reads: ``workers`` shuffled training streams and the validation rows,
    from Parquet or (``webdataset``) tar shards. Checks the data first (one clear error before
    any task starts)."""
    from dalle2.data.stream import training_source, validation_rows

    columns = tuple(columns or _columns(carry))  # other columns: a preprocess of other rows (embeddings)
    if not webdataset:
        filesystem, files = check_dataset(config.path, columns)
    dropped = dropped_rows_counter()
    source = training_source(
        config, shuffle, workers, dropped=dropped, carry=carry, tasks=preprocess_concurrency(config),
        columns=columns, preprocess=preprocess, webdataset=webdataset,
    )  # fmt: skip
    if webdataset or preprocess is not preprocess_batch:
        validation = validation_rows(source, preprocess_concurrency(config))
    else:
        validation = preprocessed_rows(config, filesystem, files, "validation", dropped, carry)
    return ShuffledTrainingData(train=source, validation=validation, dropped=dropped)
