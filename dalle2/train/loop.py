"""The one training loop: what every Ray Train worker runs, for every model.

    engine = deepspeed.initialize(loss module of the task, config built from our YAML)
    resume from ray.train.get_checkpoint() (weights, optimizer, EMA, data position), or prepare
    repeat: LR from the schedule -> micro-batches (forward, backward, step) -> EMA update
            every log_every: report metrics; every val_every: validation loss + sample grid;
            every checkpoint_every: every rank saves its shard, the run reports the checkpoint

All ranks take the same steps and call ``ray.train.report`` the same number of times.
``deepspeed`` and ``ray.train`` are imported inside the worker function, never at import time.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dalle2.config import CONFIG_CLASSES, from_dict
from dalle2.data import storage
from dalle2.data.epochs import DataPosition
from dalle2.data.stream import TrainingStream
from dalle2.precision import training_autocast, training_autocast_dtype
from dalle2.train import checkpoint as ckpt
from dalle2.train.checkpoint import TrainState
from dalle2.train.config import JobConfig, job_from_dict
from dalle2.train.deepspeed_config import build_deepspeed_config, global_batch_size
from dalle2.train.ema import ShardedEMA
from dalle2.train.samples import png_bytes
from dalle2.train.schedule import learning_rate
from dalle2.train.sharded import build_model, sample_copy
from dalle2.train.tasks import Task, make_task


class TrainHooks:
    """Extension points called on every rank (tests inject faults and read the engine with them)."""

    def at_start(self, model: nn.Module, rank: int) -> None:
        """Before the first step of this run (or of its resumed part); ``model`` as in :meth:`at_end`."""

    def after_step(self, step: int, rank: int) -> None:
        """After optimizer step ``step`` (1-based) and the EMA update, before reporting."""

    def at_end(self, model: nn.Module, rank: int) -> None:
        """After the last checkpoint; ``model`` is the engine's model (collective under ZeRO-3)."""


class EpochStream:
    """Micro-batches of this worker's shard, epoch after epoch, keeping the position in
    ``state`` (epoch, batches into it). A resumed run skips the batches its epoch already gave,
    so each epoch is still one pass over the data."""

    def __init__(self, shard, batch_size: int, state: TrainState):
        self.shard, self.batch_size, self.state = shard, batch_size, state
        self._batches: Optional[Iterator[dict]] = None

    def _open(self, skip: int) -> None:
        self._batches = iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=True))
        for _ in range(skip):
            next(self._batches, None)

    def next(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            self._open(self.state.batches_in_epoch)
        batch = next(self._batches, None)
        if batch is None:
            if self.state.batches_in_epoch == 0:
                raise RuntimeError(f"this worker's shard has no full batch of {self.batch_size} rows: use a smaller batch_size or fewer workers")
            self.state.epoch, self.state.batches_in_epoch = self.state.epoch + 1, 0
            self._open(0)
            batch = next(self._batches, None)
            if batch is None:
                raise RuntimeError("the training data yielded no batch in a new epoch")
        self.state.batches_in_epoch += 1
        return batch


def _first_batches(shard, batch_size: int, count: int) -> Iterator[dict]:
    for index, batch in enumerate(shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True)):
        if index >= count:
            return
        yield batch


def _first_stream_batches(stream: TrainingStream, count: int) -> Iterator[dict]:
    for _ in range(count):
        yield stream.next()
    stream.close()


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices and kernels, none on biases, norms and 1-D
    embeddings (as GPT-2 / nanoGPT)."""
    def ndim(p: nn.Parameter) -> int:  # a zero.Init parameter is an empty placeholder: its shape is ds_shape
        return len(getattr(p, "ds_shape", p.shape))

    decay = [p for p in module.parameters() if p.requires_grad and ndim(p) >= 2]
    plain = [p for p in module.parameters() if p.requires_grad and ndim(p) < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def promote_scalar_parameters(module: nn.Module) -> list[str]:
    """Make every 0-dim parameter a [1] tensor, in place; returns their names.

    DeepSpeed 0.19 broadcasts parameters at start-up as bytes (``p.data.view(torch.uint8)``),
    which fails for 0-dim tensors such as CLIP's ``logit_scale``. Broadcasting values alike,
    a [1] tensor trains the same; export reshapes it back (dalle2.train.export).
    """
    promoted = []
    for owner_name, owner in module.named_modules():
        for name, parameter in list(owner.named_parameters(recurse=False)):
            if parameter.ndim == 0:
                setattr(owner, name, nn.Parameter(parameter.detach().reshape(1), requires_grad=parameter.requires_grad))
                promoted.append(f"{owner_name}.{name}" if owner_name else name)
    return promoted


@torch.no_grad()
def clamp_parameter(parameter: nn.Parameter, low: float, high: float) -> None:
    """Clamp a parameter in place, and the float32 master copy that DeepSpeed's optimizer steps
    from under bf16/fp16 or ZeRO 1-3, so that the next step does not undo it. Under ZeRO-3 the
    rank clamps its own partition; collective there (every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    master = safe_get_full_fp32_param(parameter)  # None when the parameter is its own master (fp32, ZeRO-0)
    if master is not None:
        safe_set_full_fp32_param(parameter, master.clamp(low, high))
    partition = getattr(parameter, "ds_tensor", None)
    (parameter if partition is None else partition).data.clamp_(low, high)


def _all_reduce(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


class Worker:
    """The state of one rank's training run (built by :func:`train_worker`)."""

    def __init__(self, job: JobConfig, task: Task, engine, ema: Optional[ShardedEMA], state: TrainState, *, rank: int, world_size: int, run_uri: str, hooks: TrainHooks, job_dict: dict, model_config_dict: dict):
        self.job, self.task, self.engine, self.ema, self.state = job, task, engine, ema, state
        self.rank, self.world_size, self.run_uri, self.hooks = rank, world_size, run_uri, hooks
        self.job_dict, self.model_config_dict = job_dict, model_config_dict
        self.dtype = next(engine.module.parameters()).dtype
        # bf16 convolutions and matmuls over the fp32 weights where the device computes bf16
        # (deepspeed.autocast; dalle2.precision): the backward follows the forward's dtypes.
        self.autocast = training_autocast_dtype(job.deepspeed.autocast.value, task.device)
        self.data_position: Optional[DataPosition] = None  # set by restore for a TrainingStream
        self.device = task.device
        self.global_batch = global_batch_size(job.loop.batch_size, world_size, job.deepspeed)
        self.clamps = task.clamped_parameters(self.model)

    @property
    def model(self) -> nn.Module:
        return self.engine.module.model

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, stream: EpochStream) -> float:
        lr = learning_rate(self.state.step, self.job.optim, self.job.loop.max_steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(self.job.deepspeed.gradient_accumulation_steps):
            with training_autocast(self.autocast, self.device):
                loss = self.engine(**self.task.inputs(stream.next(), self.dtype))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float().item()
        for parameter, low, high in self.clamps:
            clamp_parameter(parameter, low, high)
        self.state.step += 1
        self.state.samples += self.global_batch
        if self.ema is not None:
            self.ema.update(self.state.step)
        return total / self.job.deepspeed.gradient_accumulation_steps

    # -- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, shard) -> tuple[dict, Optional[dict]]:
        """Mean loss over ``val_batches`` batches of every worker, with the same noise at every
        validation (a seeded generator per batch), and rank 0's first batch for the samples."""
        loop = self.job.loop
        self.engine.module.eval()
        total, count, first = 0.0, 0, None
        for index, batch in enumerate(shard.iter_batches(batch_size=loop.batch_size, batch_format="numpy")):
            if index >= loop.val_batches:
                break
            first = first if first is not None else batch
            generator = torch.Generator().manual_seed(loop.seed * 7919 + index * self.world_size + self.rank)
            with training_autocast(self.autocast, self.device):
                loss = self.engine(**self.task.inputs(batch, self.dtype, generator=generator), generator=generator)
            total += loss.float().item() * len(batch["key"])
            count += len(batch["key"])
        self.engine.module.train()
        total, count = _all_reduce([total, count], self.device)
        return ({"val_loss": total / count} if count else {}), first

    def sample_grid(self, batch: Optional[dict]) -> Optional[str]:
        """Rank 0 draws samples with the EMA weights on a plain copy of the model and writes a PNG
        under ``<run>/samples``; returns its URI. Collective (the EMA is gathered).

        ZeRO 0-2 runs (every rank holds the whole model anyway) sample a float32 copy. ZeRO-3 runs
        (models too big for one rank) sample a copy in the training dtype (bf16 on GPU: half of a
        float32 copy), built on the meta device and filled from the EMA gathered parameter by
        parameter in that dtype: rank 0 never holds a whole float32 model, on the GPU or off it."""
        loop = self.job.loop
        if self.ema is None or loop.sample_count == 0:
            return None
        dtype = self.dtype if self.job.deepspeed.zero_stage == 3 else torch.float32
        full = self.ema.gather(dst=0, dtype=dtype)
        if self.rank != 0 or batch is None:
            return None
        copy = sample_copy(self.task, self.model, full, dtype, self.device)
        del full
        batch = {key: value[: loop.sample_count] for key, value in batch.items()}
        figure = self.task.sample_figure(
            copy, batch, steps=loop.sample_steps, guidance_scale=loop.guidance_scale,
            generator=torch.Generator().manual_seed(loop.seed),
        )  # fmt: skip
        if figure is None:
            return None
        uri = storage.join(self.run_uri, "samples", f"step-{self.state.step:08d}.png")
        storage.write_bytes(uri, png_bytes(figure))
        return uri

    # -- checkpoints -------------------------------------------------------------------------
    def save_and_report(self, metrics: dict, stream=None) -> None:
        import ray.train

        step = self.state.step
        with tempfile.TemporaryDirectory(prefix="dalle2-save-") as folder:
            self.engine.save_checkpoint(os.path.join(folder, ckpt.DEEPSPEED_DIR), tag=ckpt.deepspeed_tag(step))
            ckpt.write_rank_files(folder, self.rank, None if self.ema is None else self.ema.state_dict())
            if isinstance(stream, TrainingStream):  # every rank its own position in its own sequence
                ckpt.write_data_position(folder, self.rank, stream.position)
            if self.rank == 0:
                ckpt.write_rank0_files(
                    folder, state=self.state, job=self.job_dict, model_kind=self.job.model_kind,
                    model_config=self.model_config_dict, zero_stage=self.job.deepspeed.zero_stage,
                    world_size=self.world_size, ema_layout=None if self.ema is None else self.ema.layout(),
                    extra=self.task.extra_state(self.model),
                )  # fmt: skip
            files = [None] * self.world_size
            dist.all_gather_object(files, ckpt.local_files(folder))
            if self.rank == 0:
                ckpt.write_manifest(folder, files, step)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=ckpt.checkpoint_dir_name(step))

    def restore(self, folder: str) -> None:
        info = ckpt.read_json(folder, ckpt.JOB_FILE)
        if info["world_size"] != self.world_size or info["zero_stage"] != self.job.deepspeed.zero_stage:
            raise ckpt.CheckpointError(
                f"the checkpoint was written by {info['world_size']} workers at ZeRO-{info['zero_stage']}; "
                f"this run has {self.world_size} at ZeRO-{self.job.deepspeed.zero_stage} (resume with the same, or export it)"
            )
        state = ckpt.read_train_state(folder)
        load_path, _ = self.engine.load_checkpoint(os.path.join(folder, ckpt.DEEPSPEED_DIR), tag=ckpt.deepspeed_tag(state.step))
        if load_path is None:
            raise ckpt.CheckpointError(f"{folder}: DeepSpeed found no checkpoint for step {state.step}")
        if self.ema is not None:
            self.ema.load_state_dict(ckpt.read_ema_shard(folder, self.rank))
        self.state.__dict__.update(state.__dict__)
        self.data_position = ckpt.read_data_position(folder, self.rank)  # None: written by a run without one

    # -- the run -----------------------------------------------------------------------------
    def run(self, train_shard, validation_shard, train_source=None) -> None:
        import ray.train

        loop = self.job.loop
        if train_source is not None:  # this worker's own shuffled sequence, resumed exactly
            stream = TrainingStream(train_source, self.rank, self.world_size, loop.batch_size, self.data_position)
        else:
            stream = EpochStream(train_shard, loop.batch_size, self.state)
        torch.manual_seed(loop.seed * 1_000_003 + self.state.step * self.world_size + self.rank + 1)  # new noise after a resume
        started, interval_start, interval_steps, losses = time.monotonic(), time.monotonic(), 0, []
        elapsed_before = self.state.elapsed_s
        self.hooks.at_start(self.model, self.rank)
        while self.state.step < loop.max_steps:
            losses.append(self.train_step(stream))
            if train_source is not None:
                self.state.epoch = stream.position.epoch
            interval_steps += 1
            self.hooks.after_step(self.state.step, self.rank)
            step, last = self.state.step, self.state.step == loop.max_steps
            validating = loop.val_batches > 0 and (last or (loop.val_every > 0 and step % loop.val_every == 0))
            saving = last or (loop.checkpoint_every > 0 and step % loop.checkpoint_every == 0)
            if not (validating or saving or step % loop.log_every == 0):
                continue
            loss_sum, loss_count = _all_reduce([sum(losses), len(losses)], self.device)
            now = time.monotonic()
            self.state.elapsed_s = elapsed_before + (now - started)
            steps_per_s = interval_steps / max(now - interval_start, 1e-9)
            metrics = {
                "step": step, "epoch": self.state.epoch, "samples": self.state.samples,
                "loss": loss_sum / loss_count, "lr": learning_rate(step - 1, self.job.optim, loop.max_steps),
                "steps_per_s": steps_per_s, "samples_per_s": steps_per_s * self.global_batch,
                "eta_s": (loop.max_steps - step) / steps_per_s, "elapsed_s": self.state.elapsed_s,
                "max_steps": loop.max_steps,
            }  # fmt: skip
            if validating:
                val_metrics, batch = self.validate(validation_shard)
                metrics.update(val_metrics)
                grid = self.sample_grid(batch)
                if grid is not None:
                    metrics["sample_grid"] = grid
            if saving:
                self.save_and_report(metrics, stream)
            else:
                ray.train.report(metrics)
            interval_start, interval_steps, losses = time.monotonic(), 0, []
        self.hooks.at_end(self.model, self.rank)


def build_engine(job: JobConfig, task: Task, model: nn.Module, world_size: int):
    """The DeepSpeed engine over the task's loss module, configured from the job."""
    import deepspeed

    promote_scalar_parameters(model)
    loss_module = task.loss_module(model)
    if job.deepspeed.zero_stage == 3:
        for parameter in task.external_parameters(model):
            # on the loss module (the loss uses it) and on the model (whose forward may be called alone)
            deepspeed.zero.register_external_parameter(loss_module, parameter)
            deepspeed.zero.register_external_parameter(model, parameter)
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in loss_module.parameters())  # ds_numel: built by zero.Init
    ds_config = build_deepspeed_config(job.deepspeed, job.optim, job.loop.batch_size, world_size, parameters)
    engine, _, _, _ = deepspeed.initialize(
        model=loss_module, model_parameters=weight_decay_groups(loss_module, job.optim.weight_decay), config=ds_config
    )
    return engine


def train_worker(config: dict) -> None:
    """TorchTrainer's ``train_loop_per_worker``. ``config``: ``job`` (the JobConfig as a dict),
    ``model_config`` (resolved on the driver), ``run_uri``, and optional ``hooks``."""
    import ray
    import ray.train
    import ray.train.torch

    from dalle2.bundle import load_bundle

    job = job_from_dict(config["job"])
    hooks: TrainHooks = config.get("hooks") or TrainHooks()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        # A GPU the scheduler counted but CUDA cannot open (logical GPUs, a broken driver): say
        # so and train on the CPU, as the serve stages do, rather than fail every retry.
        print(f"rank {rank}: Ray assigned GPU {ray.get_gpu_ids()} but CUDA is not available here: training on the CPU", flush=True)
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    model_config = from_dict(CONFIG_CLASSES[job.model_kind], config["model_config"])
    clip = load_bundle(job.clip).model if job.loads_clip else None
    task = make_task(
        job.job, job.model_kind, model_config, device=device, rank=rank, world_size=world_size, clip=clip,
        precomputed=not job.loads_clip,
    )  # fmt: skip
    model = build_model(job, task, world_size)  # partitioned at construction for big ZeRO-3 models

    train_source = config.get("train_source")  # a dalle2.data.stream.TrainingSource, or None
    train_shard = None if train_source is not None else ray.train.get_dataset_shard("train")
    validation_shard = ray.train.get_dataset_shard("validation")
    checkpoint = ray.train.get_checkpoint()
    state = TrainState()
    # Each rank fetches the shared files and its own shards only (checked complete on the storage).
    restoring = ckpt.rank_copy(checkpoint.filesystem, checkpoint.path, rank) if checkpoint else contextlib.nullcontext()
    with restoring as folder:
        if checkpoint:
            task.load_extra_state(model, ckpt.read_extra(folder))
        elif task.needs_preparation:
            first = (
                _first_stream_batches(TrainingStream(train_source, rank, world_size, job.loop.batch_size), job.loop.prior_stats_batches)
                if train_source is not None else _first_batches(train_shard, job.loop.batch_size, job.loop.prior_stats_batches)
            )  # fmt: skip
            task.prepare(model, first)
        engine = build_engine(job, task, model, world_size)
        ema = ShardedEMA(engine.module.model.named_parameters(), job.loop.ema_decay, rank, world_size) if job.uses_ema else None
        worker = Worker(
            job, task, engine, ema, state, rank=rank, world_size=world_size, run_uri=config["run_uri"], hooks=hooks,
            job_dict=config["job"], model_config_dict=config["model_config"],
        )  # fmt: skip
        if checkpoint:
            worker.restore(folder)
    worker.run(train_shard, validation_shard, train_source)
