"""Checks of what would fail on every retry, made once on the driver before any worker starts.

A worker that fails is restarted ``run.max_failures`` times, each time reloading CLIP and the
model: an error that will always recur must be found here instead, with what to change.

- :func:`check_cluster_address`: the cluster in ``RAY_ADDRESS`` answers (else ``ray.init``
  waits on it for a minute and then says little).
- :func:`check_batches`: every worker's share of the data holds at least one batch.
- :func:`check_resume`: a run resumed by name has the job kind, worker count, ZeRO stage and
  precision its checkpoint was written with.
"""

from __future__ import annotations

import socket
from typing import Optional, Sequence

from dalle2.data import storage
from dalle2.data.epochs import EpochPlan, Piece
from dalle2.train import checkpoint as ckpt
from dalle2.train.config import ConfigError, JobConfig

ADDRESS_TIMEOUT_S = 5.0
# Addresses ray.init resolves itself (a local cluster, or the one recorded by `ray start`).
LOCAL_ADDRESSES = ("", "local", "auto")


def check_cluster_address(address: Optional[str], timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Raise a ConfigError when ``address`` (``host:port`` or ``ray://host:port``, as in
    ``RAY_ADDRESS``) accepts no TCP connection within ``timeout_s``."""
    address = (address or "").strip()
    if address in LOCAL_ADDRESSES:
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"RAY_ADDRESS={address!r} is not host:port (or ray://host:port, auto, local)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except OSError as error:
        raise ConfigError(
            f"the Ray cluster at {address} (RAY_ADDRESS) does not answer ({error}): start it "
            "(`ray start --head`, cluster/), fix RAY_ADDRESS, or unset it to train on a local Ray"
        ) from error


def connect_ray() -> None:
    """Join the cluster of ``RAY_ADDRESS`` (or a ``ray job submit`` driver's), checked first;
    without one, start a local Ray with its dashboard on 127.0.0.1. Not ``ray.init()``: that
    joins whatever Ray this machine last started (another user's, maybe unreachable), and a Ray
    without a dashboard leaves Ray Train's placement-group cleaner asking 127.0.0.1:8265, where
    another Ray may answer that this run's controller is gone (see jobs.stages.start_ray)."""
    import os

    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    check_cluster_address(address)
    if address:
        ray.init()
    else:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")


def check_batches(pieces: Sequence[Piece], job: JobConfig) -> None:
    """Every worker's training rows in the first epoch hold at least one batch (validation rows
    taken out at their expected fraction); else the job would stop on that worker at step 1."""
    workers, batch = job.scaling.workers, job.loop.batch_size
    keep = 1.0 - job.data.validation_fraction
    shares = [EpochPlan.build(list(pieces), job.data.shuffle, 0, rank, workers).rows for rank in range(workers)]
    smallest = min(shares)
    if int(smallest * keep) >= batch:
        return
    total = sum(piece.rows for piece in pieces)
    raise ConfigError(
        f"data: {total} rows in {len(pieces)} pieces give the smallest of {workers} workers {smallest} rows "
        f"(about {int(smallest * keep)} for training after the {job.data.validation_fraction:g} validation fraction), "
        f"less than one batch of {batch}: use loop.batch_size <= {max(1, int(smallest * keep))}, fewer workers, or more data"
    )


def _resumed_checkpoint(run_uri: str) -> Optional[str]:
    """The newest complete checkpoint of the run, or None for a new run."""
    if not storage.exists(run_uri):
        return None
    try:
        return ckpt.latest_checkpoint(run_uri)
    except (ckpt.CheckpointError, FileNotFoundError):
        return None


def check_resume(job: JobConfig, run_uri: str) -> Optional[str]:
    """When ``run_uri`` already has a complete checkpoint (the same ``run.name`` resumes it), the
    checkpoint's job kind, model, worker count, ZeRO stage and precision must be this job's.
    Returns the checkpoint resumed from (None for a new run). Reads only its ``job.json``."""
    checkpoint = _resumed_checkpoint(run_uri)
    if checkpoint is None:
        return None
    import json

    written = json.loads(storage.read_bytes(storage.join(checkpoint, ckpt.JOB_FILE)))
    old_job = written.get("job", {})
    old_kind, old_model = old_job.get("job"), written.get("model_kind")
    if old_kind != job.job or old_model != job.model_kind:
        raise ConfigError(
            f"run: {run_uri} holds a run of the {old_kind} job ({old_model}), this is the {job.job} job ({job.model_kind}): "
            f"give this job another run.name (--name), or another run.storage"
        )
    old_precision = old_job.get("deepspeed", {}).get("precision")
    changes = [
        (f"scaling.workers (--workers) {written['world_size']}", written["world_size"], job.scaling.workers),
        (f"deepspeed.zero_stage (--zero) {written['zero_stage']}", written["zero_stage"], job.deepspeed.zero_stage),
        (f"deepspeed.precision {old_precision}", old_precision, job.deepspeed.precision.value),
    ]
    different = [(name, now) for name, then, now in changes if then is not None and then != now]
    if different:
        wanted = ", ".join(f"{name} (this job: {now})" for name, now in different)
        raise ConfigError(
            f"run: {checkpoint} was written with {wanted}; a resume needs the same: set them back, "
            f"or start a new run.name (`dalle2 export {run_uri} BUNDLE` still reads this one)"
        )
    return checkpoint
