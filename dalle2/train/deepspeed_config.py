"""Our YAML config -> the DeepSpeed config dict that ``deepspeed.initialize`` takes.

Plain data: no DeepSpeed import, so the builder is tested without a process group.
"""

from __future__ import annotations

from typing import Any

from dalle2.train.config import DeepSpeedOptions, Offload, OptimConfig, OptimizerImpl, Precision

STEPS_PER_PRINT = 10**9  # DeepSpeed's own step logging: off (the loop reports progress)
MIN_BUCKET, MAX_BUCKET = 10**6, 5 * 10**8  # elements; the maximum is DeepSpeed's default


def bucket_elements(options: DeepSpeedOptions, parameters: int) -> int:
    """Communication bucket size: ``options.bucket_size``, or a tenth of the model's parameters."""
    if options.bucket_size:
        return options.bucket_size
    return int(min(MAX_BUCKET, max(MIN_BUCKET, parameters // 10)))


def global_batch_size(micro_batch: int, workers: int, options: DeepSpeedOptions) -> int:
    """Samples per optimizer step: micro-batch x workers x gradient accumulation."""
    return micro_batch * workers * options.gradient_accumulation_steps


def build_deepspeed_config(options: DeepSpeedOptions, optim: OptimConfig, micro_batch: int, workers: int, parameters: int = 0) -> dict[str, Any]:
    """DeepSpeed config for ZeRO stage ``options.zero_stage`` with AdamW, for a model of
    ``parameters`` parameters (it sizes the communication buckets).

    The learning rate in it is the peak; the loop sets each step's value from the schedule
    (dalle2.train.schedule), so the schedule is a function of the step and a resumed run
    continues it exactly. ``torch_adam`` picks torch's AdamW over DeepSpeed's compiled
    FusedAdam/CPUAdam; with optimizer offload and torch's AdamW, DeepSpeed must be told that a
    non-DeepSpeed optimizer on CPU is intended (``zero_force_ds_cpu_optimizer: false``).
    """
    torch_adam = options.optimizer is OptimizerImpl.TORCH
    bucket = bucket_elements(options, parameters)
    zero: dict[str, Any] = {"stage": options.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if options.offload_optimizer is Offload.CPU:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if options.zero_stage == 3:
        # Export consolidates the fp32 master weights from the shards (zero_to_fp32), so the
        # engine never needs to gather a 16-bit copy of the whole model at save time.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        zero["stage3_prefetch_bucket_size"] = bucket
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": options.gradient_accumulation_steps,
        "train_batch_size": global_batch_size(micro_batch, workers, options),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": torch_adam,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": options.precision is Precision.BF16},
        "fp16": {"enabled": options.precision is Precision.FP16, "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if options.gradient_clipping > 0:
        config["gradient_clipping"] = options.gradient_clipping
    if torch_adam and options.offload_optimizer is Offload.CPU:
        config["zero_force_ds_cpu_optimizer"] = False
    return config
