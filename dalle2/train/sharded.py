"""The paper-size path: models built already sharded (ZeRO-3 ``zero.Init``), and sample copies
made without a full float32 model on the GPU.

A 1B-parameter prior is 4.4 GB of float32 weights, the 3.5B decoder 14 GB: built whole on every
rank's CPU (as a small model is) before ``deepspeed.initialize`` partitions it, 8 ranks of a node
hold 8 full copies at once. Under ZeRO-3, models of ``deepspeed.zero_init_threshold`` parameters
or more are therefore built inside ``deepspeed.zero.Init``: each module's parameters are
partitioned as soon as its ``__init__`` returns, so a rank never holds more than its 1/W of the
model plus one module's parameters (Rajbhandari et al. 2020, ZeRO-3 "model construction").
``zero.Init`` broadcasts every parameter from rank 0 before partitioning it, so all ranks start
from rank 0's initial weights (the same as seeding every rank alike does for small models).

CLIP is never built this way: the CLIP job's open_clip model has a 0-dim ``logit_scale`` that
``zero.Init`` broadcasts as bytes (``param.data.view(torch.uint8)``, which fails for 0-dim
tensors; :func:`dalle2.train.loop.promote_scalar_parameters` fixes that only after construction),
and the frozen CLIP of the prior and decoder jobs is not trained by the engine at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dalle2.diffusion import GaussianDiffusion
from dalle2.factory import create_model
from dalle2.train.config import JobConfig
from dalle2.train.deepspeed_config import build_deepspeed_config

NEVER_ZERO_INIT = ("clip",)  # see the module docstring


def meta_parameter_count(kind: str, config: Any) -> int:
    """Parameters of the model a config builds, counted on the meta device (no memory)."""
    model = create_model(kind, config, device="meta")
    return sum(p.numel() for p in model.parameters())


def uses_zero_init(job: JobConfig, parameters: int) -> bool:
    """Whether the job builds its model inside ``deepspeed.zero.Init``."""
    return job.deepspeed.zero_stage == 3 and job.model_kind not in NEVER_ZERO_INIT and parameters >= job.deepspeed.zero_init_threshold


def _restore_process_state(model: nn.Module) -> None:
    """``zero.Init`` casts every float tensor created inside it to the training dtype (it wraps
    ``torch.zeros``, ``torch.arange``...), including what is not a weight: the diffusion
    schedule tables a model holds (float64 by design: bf16 cannot even count to 1000) and the
    prior's float32 embedding statistics. Rebuild the first, and put the buffers back in float32."""
    for module in model.modules():
        if isinstance(getattr(module, "diffusion", None), GaussianDiffusion) and hasattr(module, "config"):
            module.diffusion = GaussianDiffusion.from_config(module.config.diffusion)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                setattr(module, name, buffer.float())


def build_model(job: JobConfig, task, world_size: int) -> nn.Module:
    """The task's model, whole on this rank, or partitioned at construction (``zero.Init``) for a
    ZeRO-3 job whose model has at least ``deepspeed.zero_init_threshold`` parameters."""
    torch.manual_seed(job.loop.seed)  # the same initial weights on every rank
    parameters = meta_parameter_count(task.kind, task.config)
    if not uses_zero_init(job, parameters):
        return task.build_model()
    import deepspeed

    ds_config = build_deepspeed_config(job.deepspeed, job.optim, job.loop.batch_size, world_size, parameters)
    # mem_efficient_linear=False: it would replace torch.nn.functional.linear process-wide.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        model = task.build_model()
    _restore_process_state(model)
    return model


def sample_copy(task, engine_model: nn.Module, ema_parameters, dtype: torch.dtype, device) -> nn.Module:
    """A plain (unsharded) copy of the model for sampling, in ``dtype`` on ``device``, holding the
    EMA weights ``ema_parameters`` (name -> tensor, any dtype, any device) and the engine model's
    buffers and extra state. Built on the meta device first, so that the only copy ever
    materialised is the one in ``dtype`` (bf16 for a bf16 run: half of a float32 copy)."""
    copy = create_model(task.kind, task.config, device="meta").to_empty(device=device)
    copy.to(dtype)
    params = dict(copy.named_parameters())
    missing = set(params) - set(ema_parameters)
    if missing:
        raise RuntimeError(f"the EMA lacks {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, value in ema_parameters.items():
            params[name].copy_(value)
        buffers = dict(copy.named_buffers())
        for name, value in engine_model.named_buffers():
            if name in buffers:
                buffers[name].copy_(value)
    _restore_process_state(copy)  # to_empty left the schedule tables alone, but dtype casts touched buffers
    task.load_extra_state(copy, task.extra_state(engine_model))  # float32 statistics
    return copy.eval()
