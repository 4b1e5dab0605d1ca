"""What every model deployment shares: loading its bundle, its device, batching settings, timings.

A replica loads one bundle (local path or ``s3://``) at start. It runs on the GPU Ray gave it
(``ray_actor_options.num_gpus`` in the serve config), or on the CPU when Ray gave it none or
CUDA is absent (the placement test runs on logical GPUs).

Batching is set per deployment by its ``user_config`` (changeable without restarting replicas):

    max_batch_size        images per batch (not requests: a request for n images counts n);
                          at least 10, the most one request may ask for
    batch_wait_timeout_s  how long a batch waits for more requests after its first
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Callable, Optional, Sequence

import ray
import torch
from ray import serve

from dalle2.bundle import CONFIG_FILE, load_bundle, read_bundle_header
from dalle2.data.storage import join, read_bytes
from dalle2.pipeline import MAX_IMAGES
from serve.lockstep import SharedForward, run_in_lockstep
from serve.messages import StageTiming

DEFAULT_BATCH = {"max_batch_size": 16, "batch_wait_timeout_s": 0.0}


def replica_device() -> torch.device:
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")  # Ray set CUDA_VISIBLE_DEVICES to this replica's GPU(s)
    return torch.device("cpu")


def bundle_description(uri: str) -> dict[str, Any]:
    """Which bundle, which version: what ``GET /v1/models`` reports for a stage."""
    raw = read_bytes(join(uri, CONFIG_FILE))
    header = read_bundle_header(uri)
    return {
        "uri": uri,
        "kind": header["kind"],
        "format_version": header["version"],
        "created": header.get("metadata", {}).get("created"),
        "metadata": header.get("metadata", {}),
        # The config file names the weights' export (it carries its creation time): a new export,
        # a new fingerprint.
        "fingerprint": hashlib.sha256(raw).hexdigest()[:12],
    }


def batched(batch_size_fn: Optional[Callable[[list], int]] = None) -> Callable:
    """``@serve.batch`` with the default settings (``reconfigure`` applies the config's)."""
    return serve.batch(
        max_batch_size=DEFAULT_BATCH["max_batch_size"],
        batch_wait_timeout_s=DEFAULT_BATCH["batch_wait_timeout_s"],
        batch_size_fn=batch_size_fn,
    )


def raise_if_error(result: Any) -> Any:
    """Batched handlers return a failed request's exception in its slot; its caller raises it."""
    if isinstance(result, BaseException):
        raise result
    return result


class ModelStage:
    """Base of the model deployments. Subclasses set ``kind`` (the bundle kind they load) and
    ``stage`` (their name in timings), and define a ``@serve.batch`` method."""

    kind: str = ""
    stage: str = ""
    batched_method: str = ""  # the name of the subclass's @serve.batch method

    def __init__(self, bundle_uri: str):
        self.device = replica_device()
        bundle = load_bundle(bundle_uri, device=self.device)
        if not bundle.kind.startswith(self.kind):
            raise ValueError(f"{bundle_uri}: a {bundle.kind} bundle, but {type(self).__name__} serves {self.kind}")
        self.model = bundle.model
        self.bundle = bundle_description(bundle_uri)
        context = serve.get_replica_context()
        self.deployment = context.deployment
        self.replica = context.replica_id.unique_id
        self.batch_settings = dict(DEFAULT_BATCH)

    def reconfigure(self, user_config: Optional[dict]) -> None:
        settings = {**DEFAULT_BATCH, **(user_config or {})}
        unknown = set(settings) - set(DEFAULT_BATCH)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown user_config keys {sorted(unknown)}; known: {sorted(DEFAULT_BATCH)}")
        if int(settings["max_batch_size"]) < MAX_IMAGES:
            raise ValueError(f"max_batch_size counts images and must be at least {MAX_IMAGES} (one request may ask for {MAX_IMAGES})")
        handler = getattr(self, self.batched_method)
        handler.set_max_batch_size(int(settings["max_batch_size"]))
        handler.set_batch_wait_timeout_s(float(settings["batch_wait_timeout_s"]))
        self.batch_settings = settings

    def describe(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "replica": self.replica,
            "actor_name": ray.get_runtime_context().get_actor_name(),
            "pid": os.getpid(),
            "device": str(self.device),
            # Ray sets OMP_NUM_THREADS from the replica's CPUs (at least 1): the intra-op threads
            "torch_threads": torch.get_num_threads(),
            "niceness": os.nice(0),  # Ray runs workers at a lower CPU priority than drivers (15)
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "batching": self.batch_settings,
            "bundle": self.bundle,
        }

    async def run_batch(self, network: Callable, items: Sequence, sample: Callable[[SharedForward, Any], Any]) -> list:
        """Run a diffusion stage for a batch in lockstep (one forward per step for all; see
        serve.lockstep) and stamp each result with this stage's timing."""
        start = time.perf_counter()
        results, forwards = await run_in_lockstep(network, items, sample)
        return self.stamp(results, items, start, forwards)

    def stamp(self, results: list, items: Sequence, start: float, forwards: int) -> list:
        timing = StageTiming(self.stage, self.replica, time.perf_counter() - start, len(items), forwards)
        stamped = []
        for result, item in zip(results, items):
            if not isinstance(result, BaseException):
                upstream = item[0] if isinstance(item, tuple) else None
                result = dataclasses.replace(result, timings=tuple(getattr(upstream, "timings", ())) + (timing,))
            stamped.append(result)
        return stamped
