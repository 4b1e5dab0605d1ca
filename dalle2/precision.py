"""Inference precision: the network runs in bf16/fp16 under autocast, the diffusion process in float32.

Sampling spends its time in the networks' matrix multiplies and convolutions; on a GPU those
run several times faster in bf16 (tensor cores) than in float32. Autocast casts exactly those
ops, and the weights once per sampling call (autocast caches the casts inside its region), while
the sampler's own arithmetic (the schedule, x_t, the DDIM/DDPM update) stays float32, as in
training (dalle2.diffusion). float32 matmuls on CUDA use TF32 (10-bit mantissa inputs, float32
accumulation), which is what PyTorch's "high" float32 matmul precision means.

Defaults: bf16 on CUDA, fp32 elsewhere (CPU bf16 autocast exists and is what the tests use to
check bf16 sampling against float32, but on CPUs without AVX-512 BF16 it is slower than float32).
"""

from __future__ import annotations

import contextlib
import enum
from typing import Iterator, Optional

import torch


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


AUTOCAST_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def resolve_precision(precision: Optional[str | Precision], device: torch.device | str) -> Precision:
    """The precision asked for, or the device's default (bf16 on CUDA, fp32 elsewhere)."""
    if precision is None or precision == "auto":
        return Precision.BF16 if torch.device(device).type == "cuda" else Precision.FP32
    try:
        return Precision(precision)
    except ValueError:
        raise ValueError(f"precision must be one of fp32, bf16, fp16 (or auto), got {precision!r}") from None


@contextlib.contextmanager
def inference_precision(precision: Optional[str | Precision], device: torch.device | str) -> Iterator[Precision]:
    """Run the networks called inside in ``precision`` on ``device`` (autocast; TF32 matmuls on CUDA)."""
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for what stays float32 (Ampere and later)
        torch.backends.cudnn.allow_tf32 = True
    if resolved is Precision.FP32:
        yield resolved
        return
    if resolved is Precision.FP16 and device.type != "cuda":
        raise ValueError("fp16 inference needs a CUDA device (CPU autocast supports bf16)")
    with torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[resolved]):
        yield resolved
