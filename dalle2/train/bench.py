"""``dalle2 bench train``: what the Ray Train + DeepSpeed loop costs, and what ZeRO saves.

- overhead: samples/s of the training loop of :mod:`dalle2.train.loop` (``Worker.train_step``:
  LR schedule, DeepSpeed forward/backward/step, gradient clipping) in 1 Ray Train worker at
  ZeRO-0, against a plain single-process PyTorch loop (AdamW, the same clipping) on the same
  model, the same in-memory batch and the same number of threads. EMA off in both.
- memory: per-worker bytes of parameters + gradients + optimizer state after the backward pass
  and after the optimizer step, at ZeRO 0, 1, 2 and 3 with 2 workers (the peak over both
  ranks), in bf16 mixed precision by default (in fp32, ZeRO-3 keeps an fp32 master copy of
  each partition beside the fp32 parameters, which costs it a quarter of its saving). On GPUs ``torch.cuda.max_memory_allocated``; on CPUs the bytes of all live tensors
  of the worker (each storage once), less what was alive before the model was built.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dalle2.train.checkpoint import TrainState
from dalle2.train.config import JobConfig, job_from_dict, job_to_dict, load_job_config, resolve_model_config
from dalle2.train.loop import TrainHooks, Worker, build_engine, weight_decay_groups
from dalle2.train.tasks import Task, data_resolution, make_task

MIB = 2**20


@dataclass(frozen=True)
class TrainBenchSettings:
    job: str = "decoder"  # the overhead comparison's model
    preset: str = "tiny"
    batch_size: int = 8
    steps: int = 20  # timed steps, after warmup_steps
    warmup_steps: int = 3
    threads: int = 1  # intra-op threads of both loops (and CPUs of the Ray worker)
    memory_job: str = "upsampler"
    memory_preset: str = "small"  # 23M parameters: the model state dominates, and 2 CPU workers train it
    memory_precision: str = "bf16"  # mixed precision, as on GPUs (fp32 ZeRO-3 keeps a second fp32 copy)
    memory_batch_size: int = 2
    memory_workers: int = 2


class RepeatedBatch:
    """The same in-memory batch at every step (stands in for the data stream)."""

    def __init__(self, batch: dict[str, np.ndarray]):
        self.batch = batch

    def next(self) -> dict[str, np.ndarray]:
        return self.batch


def bench_job(job: str, preset: str, zero_stage: int, workers: int, batch_size: int, cpus: float, use_gpu: bool = False, precision: str = "fp32") -> JobConfig:
    scaling = {"workers": workers, "cpus_per_worker": cpus}
    if use_gpu:
        scaling.update({"use_gpu": True, "backend": "nccl", "gpus_per_worker": 1.0})
    overrides = {
        "model": {"preset": preset},
        "deepspeed": {"zero_stage": zero_stage, "precision": precision},
        "loop": {"batch_size": batch_size, "ema_decay": 0.0, "max_steps": 10**6},
        "scaling": scaling,
        "run": {"name": "bench"},
    }
    return load_job_config(job, overrides=overrides)


def bench_task(job: JobConfig, device="cpu", rank: int = 0, world_size: int = 1) -> tuple[Task, dict[str, np.ndarray]]:
    """The job's task with a seeded random CLIP of the same preset (prior, decoder) and one batch."""
    from dalle2.data.preprocess import preprocess_batch
    from dalle2.data.shapes import shapes_table
    from dalle2.factory import create_model

    torch.manual_seed(0)
    clip = create_model("clip", job.model.preset) if job.needs_clip else None
    config = resolve_model_config(job.model, None if clip is None else clip.config)
    task = make_task(job.job, job.model_kind, config, device=device, rank=rank, world_size=world_size, clip=clip)
    size, context = data_resolution(job.model_kind, config, None if clip is None else clip.config, clip_sees_images=clip is not None)
    table = shapes_table(0, job.loop.batch_size, image_size=size)
    rows = {name: np.array(table[name].to_pylist(), dtype=object) for name in ("key", "caption", "image")}
    batch, _ = preprocess_batch(rows, image_size=size, context_length=context)
    return task, batch


def plain_samples_per_s(settings: TrainBenchSettings) -> float:
    """The plain single-process loop on the overhead job's model and batch."""
    job = bench_job(settings.job, settings.preset, 0, 1, settings.batch_size, settings.threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        task, batch = bench_task(job)
        torch.manual_seed(job.loop.seed)
        loss_module = task.loss_module(task.build_model())
        optimizer = torch.optim.AdamW(
            weight_decay_groups(loss_module, job.optim.weight_decay), lr=job.optim.lr, betas=job.optim.betas, eps=job.optim.eps
        )

        def step() -> None:
            loss = loss_module(**task.inputs(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(loss_module.parameters(), job.deepspeed.gradient_clipping)
            optimizer.step()
            loss.item()

        for _ in range(settings.warmup_steps):
            step()
        started = time.perf_counter()
        for _ in range(settings.steps):
            step()
        return settings.steps * settings.batch_size / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def live_tensor_bytes(device: torch.device) -> int:
    """Bytes of every tensor storage alive in this process on ``device``, each counted once."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != device.type:
                continue
            storage = obj.untyped_storage()
        except (RuntimeError, ReferenceError):
            continue
        if storage.data_ptr() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def bench_worker(config: dict) -> None:
    """TorchTrainer worker: ``config["measure"]`` is ``speed`` or ``memory``."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    torch.set_num_threads(config["threads"])
    job = job_from_dict(config["job"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    task, batch = bench_task(job, device, rank, world_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = live_tensor_bytes(device)
    torch.manual_seed(job.loop.seed)
    engine = build_engine(job, task, task.build_model(), world_size)
    worker = Worker(
        job, task, engine, None, TrainState(), rank=rank, world_size=world_size, run_uri="", hooks=TrainHooks(),
        job_dict=config["job"], model_config_dict={},
    )  # fmt: skip
    stream = RepeatedBatch(batch)
    if config["measure"] == "speed":
        for _ in range(config["warmup_steps"]):
            worker.train_step(stream)
        started = time.perf_counter()
        for _ in range(config["steps"]):
            worker.train_step(stream)
        if rank == 0:
            ray.get(config["results"].put.remote({"samples_per_s": config["steps"] * job.loop.batch_size * world_size / (time.perf_counter() - started)}))
        return
    peak = 0
    for _ in range(2):  # the optimizer state exists from the first step on
        loss = engine(**task.inputs(batch, worker.dtype))
        engine.backward(loss)
        peak = max(peak, live_tensor_bytes(device))
        engine.step()
        peak = max(peak, live_tensor_bytes(device))
    if device.type == "cuda":
        peak = max(peak, torch.cuda.max_memory_allocated(device))
    worst = torch.tensor([peak - baseline], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.model.parameters())
        ray.get(config["results"].put.remote({"bytes": worst.item(), "parameters": parameters}))


class _Results:
    """Where rank 0 leaves its figures (a Ray Train result only carries a checkpoint's metrics)."""

    def __init__(self) -> None:
        self.value: dict[str, Any] = {}

    def put(self, value: dict[str, Any]) -> None:
        self.value = value

    def get(self) -> dict[str, Any]:
        return self.value


def _fit(job: JobConfig, measure: str, settings: TrainBenchSettings) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    results = ray.remote(num_cpus=0)(_Results).remote()
    trainer = TorchTrainer(
        bench_worker,
        train_loop_config={
            "job": job_to_dict(job), "measure": measure, "threads": settings.threads,
            "steps": settings.steps, "warmup_steps": settings.warmup_steps, "results": results,
        },
        torch_config=TorchConfig(backend=job.scaling.backend.value),
        scaling_config=ScalingConfig(
            num_workers=job.scaling.workers, use_gpu=job.scaling.use_gpu,
            resources_per_worker={"CPU": job.scaling.cpus_per_worker, **({"GPU": job.scaling.gpus_per_worker} if job.scaling.use_gpu else {})},
        ),
        run_config=RunConfig(name=f"bench-train-{measure}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path="/tmp/dalle2-bench"),
    )  # fmt: skip
    trainer.fit()
    return ray.get(results.get.remote())


def run(settings: TrainBenchSettings, use_gpu: bool = False) -> dict[str, Any]:
    """Both measurements, as a JSON-ready dict."""
    import ray

    if not ray.is_initialized():  # never the last Ray this machine recorded (it may be gone)
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    cpus = float(settings.threads)

    def job(name: str, preset: str, zero: int, workers: int, batch: int, precision: str = "fp32") -> JobConfig:
        return bench_job(name, preset, zero, workers, batch, cpus, use_gpu, precision)

    plain = plain_samples_per_s(settings)
    ours = _fit(job(settings.job, settings.preset, 0, 1, settings.batch_size), "speed", settings)["samples_per_s"]
    memory = {}
    for zero in (0, 1, 2, 3):
        memory_job = job(settings.memory_job, settings.memory_preset, zero, settings.memory_workers, settings.memory_batch_size, settings.memory_precision)
        metrics = _fit(memory_job, "memory", settings)
        memory[f"zero{zero}"] = {"bytes": metrics["bytes"], "parameters": metrics["parameters"]}
    base = memory["zero0"]["bytes"]
    for entry in memory.values():
        entry["ratio_to_zero0"] = entry["bytes"] / base
    return {
        "settings": asdict(settings),
        "overhead": {"plain_samples_per_s": plain, "ray_deepspeed_samples_per_s": ours, "ratio": ours / plain, "target": ">= 0.9"},
        "memory": {**memory, "target": "zero3 <= 0.6 x zero0"},
    }


def summary(result: dict[str, Any]) -> str:
    s, overhead = result["settings"], result["overhead"]
    lines = [
        f"overhead: {s['job']} {s['preset']}, batch {s['batch_size']}, {s['steps']} steps, {s['threads']} thread(s)",
        f"  plain PyTorch loop          {overhead['plain_samples_per_s']:8.1f} samples/s",
        f"  Ray Train + DeepSpeed ZeRO-0 {overhead['ray_deepspeed_samples_per_s']:7.1f} samples/s   ratio {overhead['ratio']:.2f} (target >= 0.9)",
        f"memory per worker: {s['memory_job']} {s['memory_preset']}, {s['memory_precision']}, {s['memory_workers']} workers, params + grads + optimizer state",
    ]
    for zero in range(4):
        entry = result["memory"][f"zero{zero}"]
        lines.append(f"  ZeRO-{zero}  {entry['bytes'] / MIB:8.1f} MiB   {entry['ratio_to_zero0']:.2f} x ZeRO-0")
    lines.append("  (target: ZeRO-3 <= 0.6 x ZeRO-0)")
    return "\n".join(lines)
