"""Checks of what would fail on every retry, made once on the driver before any worker starts.

A worker that fails is restarted ``run.max_failures`` times, each time reloading CLIP and the
model: an error that will always recur must be found here instead, with what to change.

- :func:`check_cluster_address`: the cluster in ``RAY_ADDRESS`` answers (else ``ray.init``
  waits on it for a minute and then says little).
- :func:`check_batches`: every worker's share of the data holds at least one batch.
- :func:`check_resume`: a run resumed by name has the job kind, worker count, ZeRO stage and
  precision its checkpoint was written with.
- :func:`check_storage_reach`: every alive node reaches the job's ``s3://`` data, CLIP bundle and
  run storage with the credentials its workers will have (the node's own and the job's runtime
  env); the driver's credentials say nothing about a node that lacks an instance profile.
"""

from __future__ import annotations

import os
import socket
from typing import Optional, Sequence

from dalle2.data import storage
from dalle2.data.epochs import EpochPlan, Piece
from dalle2.train import checkpoint as ckpt
from dalle2.train.config import ConfigError, DataFormat, JobConfig

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


def local_ray_options() -> dict:
    """``ray.init`` options of a local Ray this project starts (the demo, ``dalle2 train`` alone):
    its dashboard on 127.0.0.1 (see :func:`connect_ray`), decode workers kept through pauses."""
    from dalle2.data.ray_reader import LOCAL_RAY_SYSTEM_CONFIG

    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "_system_config": dict(LOCAL_RAY_SYSTEM_CONFIG)}


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
        ray.init(address="local", **local_ray_options())


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


PROBE_TIMEOUT_S = 60.0  # a node still setting up the job's runtime env (pip) is left unchecked
PROBE_FOLDER = ".dalle2-preflight"  # under the run storage: one object per node, deleted at once


def _credentials_seen() -> str:
    """Where this process gets S3 from, without the secret: for the message of a node that fails."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    key = os.environ.get("AWS_ACCESS_KEY_ID")
    if key:
        source = f"AWS_ACCESS_KEY_ID ...{key[-4:]} from the environment"
    elif os.environ.get("AWS_PROFILE"):
        source = f"AWS_PROFILE {os.environ['AWS_PROFILE']}"
    else:
        source = "no key in the environment (an instance profile or ~/.aws, if any)"
    return f"endpoint {endpoint}, {source}"


def _reason(error: Exception) -> str:
    """The SDK's own words (storage wraps them in a StorageError that repeats the path)."""
    return f"{error.__cause__ or error} ({_credentials_seen()})"


def probe_storage(reads: Sequence[str], writes: Sequence[str], marker: str) -> list[tuple[str, str]]:
    """(what failed, why) for each of ``reads`` this process cannot see and each of ``writes`` it
    cannot write a small object under (``PROBE_FOLDER/marker``, deleted at once)."""
    failed = []
    for uri in reads:
        try:
            if not storage.exists(uri):  # the driver found it: another endpoint or account here
                failed.append((f"read {uri}", f"nothing there ({_credentials_seen()})"))
        except Exception as error:  # noqa: BLE001 -- whatever the SDK raises is the reason to report
            failed.append((f"read {uri}", _reason(error)))
    for uri in writes:
        probe = storage.join(uri, PROBE_FOLDER, marker)
        try:
            storage.write_bytes(probe, b"dalle2 preflight: this node can write here\n")
            storage.delete(probe)
        except Exception as error:  # noqa: BLE001
            failed.append((f"write under {uri}", _reason(error)))
    return failed


def _node_name(node: dict) -> str:
    return f"{node['NodeManagerAddress']} (node {node['NodeID'][:12]})"


def probe_targets(job: JobConfig) -> tuple[list[str], list[str]]:
    """(locations the workers read, locations they write under): the job's ``s3://`` ones only."""

    def remote(uri: str) -> bool:
        return bool(uri) and uri.startswith("s3://")

    data = job.data.path
    if job.data.format is DataFormat.WEBDATASET and "{" in data:  # a brace list of shards: probe their folder
        import posixpath

        from dalle2.data.webdataset import expand_braces

        data = posixpath.dirname(expand_braces(data)[0])
    reads = [uri for uri in (data, job.clip if job.loads_clip else "") if remote(uri)]
    return reads, [job.run.storage] if remote(job.run.storage) else []


def check_storage_reach(job: JobConfig, timeout_s: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """Run :func:`probe_storage` once on every alive node that can hold workers or data tasks,
    in the job's runtime env, and raise a ConfigError naming each node that cannot reach the
    job's ``s3://`` locations, and why. Local paths are not probed (one machine, or a mistake that
    check_job reports). Returns a line for nodes that did not answer in ``timeout_s`` (unchecked)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    reads, writes = probe_targets(job)
    if not reads and not writes:
        return None
    nodes = [n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("CPU") or n["Resources"].get("GPU"))]
    # No CPU asked: the probe runs beside whatever holds the node's CPUs; no retry: once is the answer.
    task = ray.remote(num_cpus=0, max_retries=0)(probe_storage)
    pending = {
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            reads, writes, node["NodeID"]
        ): node
        for node in nodes
    }  # fmt: skip
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    problems = []
    for ref in ready:
        try:
            failed = ray.get(ref)
        except ray.exceptions.TaskUnschedulableError:  # the node went away since ray.nodes(): no workers there
            continue
        except ray.exceptions.RayError as error:  # the runtime env could not be set up there, say
            failed = [("run the probe task", str(error).splitlines()[0])]
        problems += [f"{_node_name(pending[ref])} cannot {what}: {why}" for what, why in failed]
    for ref in late:
        ray.cancel(ref, force=True)
    if problems:
        raise ConfigError(
            "storage: " + "; ".join(problems) + ". The job's workers there would fail the same way: give every "
            "node the bucket's credentials (an instance profile, the dalle2-s3 Secret, or the job's runtime_env "
            "env_vars; cluster/README.md)"
        )
    if late:
        return f"storage: {', '.join(_node_name(pending[r]) for r in late)} did not answer the S3 check in {timeout_s:g} s (not checked)"
    return None
