"""What every model deployment shares: loading its bundle, its device, batching settings, timings.

A replica loads one bundle (local path or ``s3://``) at start. It runs on the GPU Ray gave it
(``ray_actor_options.num_gpus`` in the serve config), or on the CPU when Ray gave it none or
CUDA is absent (the placement test runs on logical GPUs).

Each deployment's ``user_config`` (changeable without restarting replicas) sets its
:class:`StageSettings`; unknown keys are refused:

    max_batch_size        images per batch (not requests: a request for n images counts n);
                          at least 10, the most one request may ask for
    batch_wait_timeout_s  how long a batch waits for more requests after its first
    health_stall_s, health_probe_every_s, health_probe_budget_s   see serve.health
    precision             the networks' precision: auto (bf16 on a GPU, fp32 on the CPU), fp32,
                          bf16 or fp16 (GPU only); the samplers stay float32 (dalle2.precision)

Every replica has a ``check_health`` (serve.health: a wedged batch or a probe forward that fails
or hangs fails it, and Serve replaces the replica), and reports its batches' latency and the
requests it holds as Ray Serve metrics (serve.metrics).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import ray
import torch
from ray import serve

from dalle2.bundle import CONFIG_FILE, load_bundle, read_bundle_header
from dalle2.data.storage import join, read_bytes
from dalle2.cascade import MAX_IMAGES
from dalle2.precision import Precision, inference_precision, resolve_precision
from serve.health import StageHealth
from serve.lockstep import SharedForward, run_in_lockstep
from serve.messages import StageTiming
from serve.metrics import StageMetrics


@dataclass(frozen=True)
class StageSettings:
    """A model deployment's ``user_config``. A new per-stage option is one more field here."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0
    health_stall_s: float = 60.0
    health_probe_every_s: float = 60.0
    health_probe_budget_s: float = 10.0
    precision: str = "auto"  # the networks' precision (dalle2.precision): auto = bf16 on CUDA, fp32 on CPU

    @classmethod
    def from_user_config(cls, owner: str, user_config: Optional[dict]) -> "StageSettings":
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(user_config or {}) - set(known)
        if unknown:
            raise ValueError(f"{owner}: unknown user_config keys {sorted(unknown)}; known: {sorted(known)}")
        settings = cls(**(user_config or {}))
        if int(settings.max_batch_size) < MAX_IMAGES:
            raise ValueError(f"max_batch_size counts images and must be at least {MAX_IMAGES} (one request may ask for {MAX_IMAGES})")
        resolve_precision(settings.precision, "cpu")  # a known name, or ValueError naming the choices
        return settings


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
        max_batch_size=StageSettings.max_batch_size,
        batch_wait_timeout_s=StageSettings.batch_wait_timeout_s,
        batch_size_fn=batch_size_fn,
    )


def raise_if_error(result: Any) -> Any:
    """Batched handlers return a failed request's exception in its slot; its caller raises it."""
    if isinstance(result, BaseException):
        raise result
    return result


class ModelStage:
    """Base of the model deployments. Subclasses set ``kind`` (the bundle kind they load) and
    ``stage`` (their name in timings and metrics), define a ``@serve.batch`` method, and a
    ``probe`` (the stage's own code on one tiny input, for the health check)."""

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
        self.stage = self.stage_name()
        self.settings = StageSettings()
        self.health = StageHealth(self._probe_in_precision)
        self.metrics = StageMetrics(self.stage)

    def stage_name(self) -> str:
        return type(self).stage

    def probe(self) -> None:
        raise NotImplementedError

    def _probe_in_precision(self) -> None:
        with self.in_precision():
            self.probe()

    def in_precision(self) -> ContextManager[Precision]:
        """The stage's networks in ``settings.precision`` (autocast; the samplers stay float32).
        Autocast is per thread: enter this in the thread that runs the network."""
        return inference_precision(self.settings.precision, self.device)

    def reconfigure(self, user_config: Optional[dict]) -> None:
        settings = StageSettings.from_user_config(type(self).__name__, user_config)
        if resolve_precision(settings.precision, self.device) is Precision.FP16 and self.device.type != "cuda":
            raise ValueError(f"{type(self).__name__}: precision fp16 needs a GPU; this replica runs on {self.device}")
        handler = getattr(self, self.batched_method)
        handler.set_max_batch_size(int(settings.max_batch_size))
        handler.set_batch_wait_timeout_s(float(settings.batch_wait_timeout_s))
        self.health.stall_s = settings.health_stall_s
        self.health.probe_every_s = settings.health_probe_every_s
        self.health.probe_budget_s = settings.health_probe_budget_s
        self.settings = settings

    @property
    def batch_settings(self) -> dict[str, Any]:
        return {"max_batch_size": self.settings.max_batch_size, "batch_wait_timeout_s": self.settings.batch_wait_timeout_s}

    async def check_health(self) -> None:
        """Serve's health check (see serve.health): raising marks this replica for replacement."""
        await self.health.check()

    def describe(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "replica": self.replica,
            "actor_name": ray.get_runtime_context().get_actor_name(),
            "node_id": ray.get_runtime_context().get_node_id(),  # which machine: replicas of a stage spread
            "pid": os.getpid(),
            "device": str(self.device),
            # Ray sets OMP_NUM_THREADS from the replica's CPUs (at least 1): the intra-op threads
            "torch_threads": torch.get_num_threads(),
            "niceness": os.nice(0),  # Ray runs workers at a lower CPU priority than drivers (15)
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "batching": self.batch_settings,
            "settings": dataclasses.asdict(self.settings),
            "health": {"batches_running": self.health.batches_running, "last_error": self.health.last_error},
            "bundle": self.bundle,
        }

    async def submit(self, batch_method: Callable, upstream: Any, job: Any) -> Any:
        """One request through the stage's ``@serve.batch`` method as ``(upstream, job, cancel)``.
        When the request is cancelled (the ingress's deadline, a client gone: Serve cancels this
        call), ``cancel`` is set and its sampling loop stops at its next step (serve.lockstep)."""
        cancel = threading.Event()
        try:
            return raise_if_error(await batch_method((upstream, job, cancel)))
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def run_batch(self, network: Callable, items: Sequence, sample: Callable[[SharedForward, Any], Any]) -> list:
        """Run a diffusion stage for a batch of ``(upstream, job, cancel)`` in lockstep (one forward
        per step for all; see serve.lockstep) and stamp each result with this stage's timing."""
        start = time.perf_counter()
        self.health.batch_started()
        self.metrics.change_in_flight(len(items))
        try:
            results, forwards = await run_in_lockstep(network, items, sample, on_forward=self.health.forward_done,
                                                      cancelled=lambda item: item[2].is_set(),
                                                      thread_context=self.in_precision)  # fmt: skip
        finally:
            self.health.batch_ended()
            self.metrics.change_in_flight(-len(items))
        return self.stamp(results, items, start, forwards)

    def stamp(self, results: list, items: Sequence, start: float, forwards: int) -> list:
        seconds = time.perf_counter() - start
        self.metrics.observe(seconds)
        self.health.forward_done()  # a finished batch is progress (the encoders' one forward)
        timing = StageTiming(self.stage, self.replica, seconds, len(items), forwards)
        stamped = []
        for result, item in zip(results, items):
            if not isinstance(result, BaseException):
                upstream = item[0] if isinstance(item, tuple) else None
                result = dataclasses.replace(result, timings=tuple(getattr(upstream, "timings", ())) + (timing,))
            stamped.append(result)
        return stamped
