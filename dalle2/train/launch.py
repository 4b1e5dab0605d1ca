"""The driver side of a training job: check everything that can be checked, then start Ray Train.

    result = run_job(load_job_config("decoder", "jobs/configs/decoder-tiny-cpu.yaml", {...}))

Before any worker starts, :func:`check_job` raises one clear error for a config that cannot
run: wrong keys or types (already at load), a frozen CLIP bundle that is missing or of another
kind, a dataset path without Parquet rows (or, for ``data.format: embeddings``, without the
columns the job reads: the decoder's need the images), more workers than the cluster can place
(or none of its CPU left for the data pipeline), and what :mod:`dalle2.train.preflight` checks (the
cluster answers, every worker's share holds a batch, a resume matches its checkpoint). Then a ``TorchTrainer`` runs :func:`train_worker` on
every worker, with ``RunConfig(storage_path, name)``: the same name resumes the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pyarrow.parquet as pq

from dalle2.config import ClipConfig, from_dict, to_dict
from dalle2.data import storage
from dalle2.data.schema import TRAINING_COLUMNS, DatasetError, check_columns, dataset_files, read_schema
from dalle2.train.capacity import autoscaler_node_types
from dalle2.train.config import ConfigError, DataFormat, JobConfig, ScalingSpec, job_to_dict, resolve_model_config
from dalle2.train.embeddings import EMBEDDING_COLUMNS, check_embedding_columns
from dalle2.train.loop import TrainHooks, train_worker
from dalle2.train.preflight import check_batches, check_resume, check_storage_reach, connect_ray
from dalle2.train.tasks import data_resolution

EPSILON = 1e-9  # resource arithmetic with fractional CPUs


@dataclass
class CheckedJob:
    job: JobConfig
    model_config: Any
    clip_config: Optional[ClipConfig]
    image_size: int  # what the data pipeline delivers
    context_length: int  # caption tokens; the training worker makes them (see training_datasets)

    @property
    def run_uri(self) -> str:
        """``<storage>/<name>``; a local storage folder made absolute here, on the driver, because
        workers and the Train controller may run in other working directories."""
        location = self.job.run.storage
        if not location.startswith("s3://"):
            location = storage.path_of(location)
        return storage.join(location, self.job.run.name)


@dataclass
class TrainResult:
    run_uri: str
    checkpoint_uri: Optional[str]
    metrics: dict[str, Any]
    dropped_rows: dict[str, int] = field(default_factory=dict)


def check_clip_bundle(job: JobConfig) -> Optional[ClipConfig]:
    """The frozen CLIP's config from its bundle header (the weights load on the workers)."""
    from dalle2.bundle import read_bundle_header

    if not job.needs_clip:
        if job.clip:
            raise ConfigError(f"clip: the {job.job} job does not use a frozen CLIP (remove --clip)")
        return None
    if not job.clip:
        raise ConfigError(f"clip: the {job.job} job learns from a frozen CLIP: give --clip BUNDLE (`dalle2 export` of a clip run)")
    header = read_bundle_header(job.clip)
    if header["kind"] != "clip":
        raise ConfigError(f"clip: {job.clip} is a {header['kind']} bundle, not a CLIP bundle")
    return from_dict(ClipConfig, header["config"])


def check_rows(path: str, columns: tuple[str, ...] = TRAINING_COLUMNS) -> int:
    """Parquet files with ``columns`` and at least one row at ``path``, else one error
    (FileNotFoundError, StorageError or DatasetError). Reads file footers only, and stops at
    the first file with rows."""
    files = dataset_files(path)
    check_columns(read_schema(files[0]), columns, files[0])
    for file_uri in files:
        with storage.open_input(file_uri) as file:
            rows = pq.ParquetFile(file).metadata.num_rows
        if rows:
            return rows
    raise DatasetError(f"{path}: {len(files)} Parquet files but no rows in them")


def _fits(resources: dict, need_cpu: float, need_gpu: float) -> int:
    """Workers of ``need_cpu`` CPU (+ ``need_gpu`` GPU) that one node of ``resources`` holds."""
    fits = math.floor(resources.get("CPU", 0.0) / need_cpu + EPSILON)
    if need_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0.0) / need_gpu + EPSILON))
    return fits


def check_placement(scaling: ScalingSpec, data_cpus: float, nodes: list[dict], node_types: Optional[list] = None) -> Optional[str]:
    """Whether ``scaling.workers`` workers fit on the alive ``nodes`` (``ray.nodes()``) with CPU
    left for the data pipeline's tasks; Ray would otherwise wait for resources forever.

    ``node_types`` (:func:`dalle2.train.capacity.autoscaler_node_types`): what an autoscaler can
    add. Workers that do not fit the live nodes but fit what it can add pass, and the returned
    line says so; a job that no node type could hold is refused all the same. A node type whose
    resources are not declared (detected when it starts) cannot be checked: it is trusted."""
    need_cpu = scaling.cpus_per_worker
    need_gpu = scaling.gpus_per_worker if scaling.use_gpu else 0.0
    alive = [node for node in nodes if node.get("Alive", True)]
    placeable = sum(_fits(node["Resources"], need_cpu, need_gpu) for node in alive)
    total_cpu = sum(node["Resources"].get("CPU", 0.0) for node in alive)
    total_gpu = sum(node["Resources"].get("GPU", 0.0) for node in alive)
    wanted = f"{scaling.workers} workers of {need_cpu:g} CPU" + (f" + {need_gpu:g} GPU" if need_gpu else "")
    have = f"{total_cpu:g} CPU" + (f", {total_gpu:g} GPU" if need_gpu else "") + f" on {len(alive)} node(s)"
    note = None
    if placeable < scaling.workers and node_types:
        undeclared = [t.name for t in node_types if not t.resources]
        added, added_cpu, used = 0, 0.0, []
        for node_type in node_types:
            if not node_type.resources:
                continue
            fits = _fits(node_type.resources, need_cpu, need_gpu)
            count = math.ceil((scaling.workers - placeable - added) / fits) if fits else 0
            count = count if node_type.max_count < 0 else min(count, node_type.max_count)
            if count > 0:
                added, added_cpu = added + fits * count, added_cpu + node_type.resources.get("CPU", 0.0) * count
                used.append(f"{count} x {node_type.name}")
        if placeable + added >= scaling.workers:
            total_cpu += added_cpu
            note = f"scaling: {wanted} do not fit the {have} alive now; the autoscaler can add {', '.join(used)}"
        elif undeclared:
            return f"scaling: {wanted} do not fit the {have} alive now; trusting the autoscaler's node types {', '.join(undeclared)} (their resources are not declared)"
        else:
            types = "; ".join(f"{t.name}: {t.resources} x {'any' if t.max_count < 0 else t.max_count}" for t in node_types)
            raise ConfigError(
                f"scaling: {wanted} cannot be placed: the cluster has {have} and its autoscaler can add at most "
                f"({types}): fewer workers, less per worker, or a node type that holds them"
            )
    if placeable < scaling.workers and note is None:
        raise ConfigError(f"scaling: {wanted} cannot be placed: the cluster has {have} (fewer workers, or less per worker)")
    if total_cpu - scaling.workers * need_cpu < data_cpus - EPSILON:
        raise ConfigError(
            f"scaling: {wanted} leave no CPU for the data pipeline ({data_cpus:g} per task) on a cluster of {have}: "
            "lower scaling.cpus_per_worker (fractional CPUs are fine)"
        )
    return note


def check_job(job: JobConfig) -> CheckedJob:
    """Every check that needs no cluster; raises before anything starts."""
    clip_config = check_clip_bundle(job)
    model_config = resolve_model_config(job.model, clip_config)
    if not job.data.path:
        raise ConfigError("data.path is empty: give --data URI (a local folder, file:// or s3://)")
    if job.data.format is DataFormat.EMBEDDINGS:
        check_embedding_columns(job.data.path, job.job)  # the decoder's: embeddings that kept the images
        check_rows(job.data.path, EMBEDDING_COLUMNS[job.job])
    elif job.data.format is DataFormat.WEBDATASET:
        from dalle2.data.webdataset import shard_uris

        shard_uris(job.data.path)  # a brace list that matches nothing, a first shard that is no tar
    else:
        check_rows(job.data.path, TRAINING_COLUMNS)
    image_size, context_length = data_resolution(job.model_kind, model_config, clip_config, clip_sees_images=job.loads_clip)
    return CheckedJob(job, model_config, clip_config, image_size, context_length)


def training_datasets(checked: CheckedJob):
    """(train, validation, dropped-rows actor or None) of a checked job: ``train`` is a
    :class:`dalle2.data.stream.TrainingSource` (each worker reads its own shuffled, resumable
    share) for images and the decoder's embedding rows, a Ray dataset for the prior's embeddings."""
    from dalle2.data.ray_reader import DataConfig, build_training_data
    from dalle2.train.embeddings import DECODER_CARRY, PRIOR_COLUMNS, embedding_rows

    spec = checked.job.data
    embeddings = spec.format is DataFormat.EMBEDDINGS
    if embeddings and checked.job.job == "prior":
        # The prior reads the embedding columns alone, through the same reader as the images
        # (shuffled, resumable, drops counted), with nothing to decode.
        data = build_training_data(
            DataConfig(path=spec.path, validation_fraction=spec.validation_fraction, cpus_per_task=spec.cpus_per_task),
            spec.shuffle, checked.job.scaling.workers, preprocess=embedding_rows, columns=PRIOR_COLUMNS,
        )  # fmt: skip
        return data.train, data.validation, data.dropped
    # Images, or the decoder's embedding rows: their images go through the same pipeline (same
    # decode, resize and validation split), with the precomputed image_embed carried along. The
    # captions arrive untokenized: the training worker tokenizes each batch (dalle2.train.tasks),
    # so the decode workers that each epoch starts never import torch or open_clip.
    data = build_training_data(
        DataConfig(
            path=spec.path, image_size=checked.image_size, context_length=None,
            validation_fraction=spec.validation_fraction, flip=spec.flip,
            batch_size=spec.preprocess_batch_size, cpus_per_task=spec.cpus_per_task,
        ),
        spec.shuffle, checked.job.scaling.workers, carry=DECODER_CARRY if embeddings else None,
        webdataset=spec.format is DataFormat.WEBDATASET,
    )  # fmt: skip
    return data.train, data.validation, data.dropped


def run_job(job: JobConfig, hooks: Optional[TrainHooks] = None, on_progress: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Check the job, start (or join) Ray, and train; resumes when the run already has checkpoints.
    ``on_progress`` gets each progress line on the driver (else the Train controller prints them,
    and Ray forwards them with its ``(TrainController pid=...)`` prefix)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dalle2.train.progress import forwarded_lines, make_progress_callback

    checked = check_job(job)
    check_resume(job, checked.run_uri)
    connect_ray()  # RAY_ADDRESS or a `ray job submit` driver joins its cluster; else a local one
    note = check_placement(job.scaling, job.data.cpus_per_task, ray.nodes(), autoscaler_node_types())
    if note:
        print(note, flush=True)
    unchecked = check_storage_reach(job)  # from every alive node, with the workers' credentials
    if unchecked:
        print(unchecked, flush=True)

    train, validation, dropped = training_datasets(checked)
    if hasattr(train, "pieces"):  # a TrainingSource: its pieces know every worker's rows
        check_batches(train.pieces, job)
    # A TrainingSource travels to the workers in the loop config (each reads its own share);
    # a Ray dataset is split among them by Ray Train.
    streamed = not isinstance(train, ray.data.Dataset)
    datasets = {"validation": validation} if streamed else {"train": train, "validation": validation}
    filesystem, storage_path = storage.resolve(job.run.storage)
    resources = {"CPU": job.scaling.cpus_per_worker}
    if job.scaling.use_gpu:
        resources["GPU"] = job.scaling.gpus_per_worker
    with forwarded_lines(on_progress) as lines:  # progress lines from the Train controller to the driver
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={
                "job": job_to_dict(job), "model_config": to_dict(checked.model_config),
                "run_uri": checked.run_uri, "hooks": hooks, "train_source": train if streamed else None,
            },
            torch_config=TorchConfig(backend=job.scaling.backend.value),
            scaling_config=ScalingConfig(
                num_workers=job.scaling.workers, use_gpu=job.scaling.use_gpu, resources_per_worker=resources,
                placement_strategy=job.scaling.placement.value.upper(),
            ),
            run_config=RunConfig(
                name=job.run.name, storage_path=storage_path, storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=job.run.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=job.loop.keep_checkpoints),
                callbacks=[make_progress_callback(job.job, checked.run_uri, dropped, lines=lines)],
            ),
            datasets=datasets,
        )  # fmt: skip
        result = trainer.fit()
    checkpoint_uri = None
    if result.checkpoint is not None:
        checkpoint_uri = storage.join(checked.run_uri, result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    dropped_rows = {}
    if dropped is not None:
        dropped_rows = ray.get(dropped.totals.remote())
        # The run is over: its counter goes (in a pipeline each stage's would otherwise stay, a
        # process with torch loaded, beside every later stage).
        ray.kill(dropped)
    return TrainResult(checked.run_uri, checkpoint_uri, dict(result.metrics or {}), dropped_rows)
