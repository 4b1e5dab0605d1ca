"""``dalle2 plan``: the per-GPU memory of a training job, before anything runs.

    model states  parameters, gradients and Adam state: DeepSpeed's own estimators for the job's
                  ZeRO stage and offload (``estimate_zero2_model_states_mem_needs`` for stages 0-2,
                  ``estimate_zero3_model_states_mem_needs`` for 3). They assume mixed precision:
                  16-bit parameters and gradients, float32 master weights and Adam moments
                  (2 + 2 + 4 + 4 + 4 = 16 bytes per parameter, the "18" of their formulas adds the
                  float32 gradient copy); stage 0 and 1 are not partitioned where those are not.
    EMA           dalle2.train.ema.ShardedEMA: float32, 1/W of the model per rank at every stage.
    frozen CLIP   prior and decoder jobs that run CLIP on the workers: the preset's CLIP, float32.
    activations   one micro-batch, measured on CPU at reduced widths and extrapolated
                  (dalle2.train.activations), in the training dtype.
    sample copy   rank 0's model copy for the validation grid (dalle2.train.sharded.sample_copy):
                  float32 under ZeRO 0-2, the training dtype under ZeRO-3; it lives while the
                  activations do not, so the peak takes the larger of the two.
    runtime       CUDA context, NCCL and allocator slack: a flat RUNTIME_GIB.

A job fits when the total is at most ``scaling.gpu_memory_gib`` less HEADROOM.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from torch import nn

from dalle2.train.activations import ActivationEstimate, measure
from dalle2.train.config import JobConfig, Offload, Precision, load_job_config, read_yaml, resolve_model_config
from dalle2.train.ema import partition_size

GIB = 2**30
RUNTIME_GIB = 2.0  # CUDA context (~0.5-1 GiB), NCCL buffers, allocator fragmentation
HEADROOM = 0.10  # what a plan leaves free of the declared GPU memory
DTYPE_BYTES = {Precision.FP32: 4, Precision.BF16: 2, Precision.FP16: 2}


@dataclass(frozen=True)
class MemoryPlan:
    config: str
    model_kind: str
    preset: str
    parameters: int
    largest_layer_parameters: int
    workers: int
    nodes: int
    gpus_per_node: int
    zero_stage: int
    offload_optimizer: str
    precision: str
    micro_batch: int
    gradient_accumulation_steps: int
    global_batch: int
    activation_checkpointing: bool
    model_states_gib: float
    ema_gib: float
    clip_gib: float
    activations_gib: float
    activations_without_checkpointing_gib: float
    sample_copy_gib: float
    runtime_gib: float
    total_gib: float
    gpu_memory_gib: float
    fits: bool
    extrapolation_error: Optional[float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def largest_layer(model: nn.Module) -> int:
    """The most parameters one module holds itself (what ZeRO-3 gathers at once)."""
    return max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())


def model_states_bytes(parameters: int, largest: int, zero_stage: int, offload: bool, gpus_per_node: int, nodes: int) -> float:
    """Per-GPU bytes of parameters, gradients and optimizer state, from DeepSpeed's estimators."""
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            parameters, largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload, cpu_offload_params=False, zero_init=True
        )
        return float(gpu)
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if zero_stage == 0:  # nothing partitioned: the stage-2 formula on one GPU
        _, gpu = estimate_zero2_model_states_mem_needs(parameters, num_gpus_per_node=1, num_nodes=1, cpu_offload=False)
        return float(gpu)
    _, gpu = estimate_zero2_model_states_mem_needs(parameters, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload)
    # Stage 1 partitions the optimizer state but keeps whole 16-bit gradients on every GPU.
    return float(gpu) + (2.0 * parameters if zero_stage == 1 else 0.0)


def plan_job(job: JobConfig, config_name: str = "", check: bool = False) -> MemoryPlan:
    """The memory plan of ``job`` (its model config resolved from the preset's CLIP)."""
    from dalle2.factory import create_model, load_config

    clip_config = load_config("clip", job.model.preset) if job.needs_clip else None
    model_config = resolve_model_config(job.model, clip_config)
    meta = create_model(job.model_kind, model_config, device="meta")
    parameters = sum(p.numel() for p in meta.parameters())
    largest = largest_layer(meta)
    scaling, ds = job.scaling, job.deepspeed
    gpus_per_node = min(scaling.gpus_per_node, scaling.workers)
    nodes = math.ceil(scaling.workers / gpus_per_node)
    dtype_bytes = DTYPE_BYTES[ds.precision]

    states = model_states_bytes(parameters, largest, ds.zero_stage, ds.offload_optimizer is Offload.CPU, gpus_per_node, nodes)
    ema = 4.0 * partition_size(parameters, scaling.workers) if job.uses_ema else 0.0
    clip = 0.0
    if job.loads_clip:
        clip = 4.0 * sum(p.numel() for p in create_model("clip", clip_config, device="meta").parameters())
    estimate: ActivationEstimate = measure(job.job, job.model_kind, model_config, job.loop.batch_size, check=check)
    scale = dtype_bytes / 4  # measured in float32
    activations = estimate.bytes * scale
    sample = 0.0
    if job.uses_ema and job.loop.sample_count > 0:
        sample = (dtype_bytes if ds.zero_stage == 3 else 4.0) * parameters
    runtime = RUNTIME_GIB * GIB
    total = states + ema + clip + max(activations, sample) + runtime
    memory = scaling.gpu_memory_gib
    return MemoryPlan(
        config=config_name, model_kind=job.model_kind, preset=job.model.preset, parameters=parameters,
        largest_layer_parameters=largest, workers=scaling.workers, nodes=nodes, gpus_per_node=gpus_per_node,
        zero_stage=ds.zero_stage, offload_optimizer=ds.offload_optimizer.value, precision=ds.precision.value,
        micro_batch=job.loop.batch_size, gradient_accumulation_steps=ds.gradient_accumulation_steps,
        global_batch=job.loop.batch_size * scaling.workers * ds.gradient_accumulation_steps,
        activation_checkpointing=estimate.checkpointing, model_states_gib=states / GIB, ema_gib=ema / GIB,
        clip_gib=clip / GIB, activations_gib=activations / GIB,
        activations_without_checkpointing_gib=estimate.bytes_plain * scale / GIB, sample_copy_gib=sample / GIB,
        runtime_gib=runtime / GIB, total_gib=total / GIB, gpu_memory_gib=memory,
        fits=memory > 0 and total / GIB <= (1 - HEADROOM) * memory, extrapolation_error=estimate.check_error,
    )  # fmt: skip


def plan_file(path: str, check: bool = False) -> MemoryPlan:
    """The plan of a job config file (its ``job:`` key says which job)."""
    raw = read_yaml(path)
    return plan_job(load_job_config(str(raw.get("job", "")), path), config_name=path, check=check)


def format_plan(plan: MemoryPlan) -> str:
    """A readable table of one plan."""
    gpus = f"{plan.nodes} node(s) x {plan.gpus_per_node} GPU(s)"
    rows = [
        ("model states (params, grads, Adam)", plan.model_states_gib, f"ZeRO-{plan.zero_stage}, optimizer offload {plan.offload_optimizer}"),
        ("EMA (float32, sharded)", plan.ema_gib, f"1/{plan.workers} of the model"),
        ("frozen CLIP (float32)", plan.clip_gib, "on every worker" if plan.clip_gib else "not run by this job"),
        ("activations", plan.activations_gib,
         f"micro-batch {plan.micro_batch}, {plan.precision}, checkpointing {'on' if plan.activation_checkpointing else 'off'} "
         f"(off: {plan.activations_without_checkpointing_gib:.1f} GiB)"),
        ("sample copy (rank 0, validation)", plan.sample_copy_gib, "counted as max(activations, sample copy)"),
        ("runtime (CUDA, NCCL, slack)", plan.runtime_gib, "assumed"),
    ]  # fmt: skip
    lines = [
        f"{plan.config or plan.model_kind}: {plan.model_kind} ({plan.preset}), {plan.parameters / 1e6:,.0f}M parameters, {gpus}, "
        f"global batch {plan.global_batch} = {plan.micro_batch} x {plan.workers} x {plan.gradient_accumulation_steps}",
        f"  {'per GPU':38s} {'GiB':>8s}",
    ]
    lines += [f"  {name:38s} {value:8.2f}  {note}" for name, value, note in rows]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'total':38s} {plan.total_gib:8.2f}  of {plan.gpu_memory_gib:g} GiB declared: {verdict} with {HEADROOM:.0%} headroom")
    if plan.extrapolation_error is not None:
        lines.append(f"  activation extrapolation error at a third width: {plan.extrapolation_error:.2%}")
    return "\n".join(lines)
