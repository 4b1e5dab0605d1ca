"""Precision: inference runs the networks in bf16/fp16 under autocast, the diffusion process in float32;
training may run its forward pass under bf16 autocast over float32 weights (``deepspeed.autocast``).

Sampling spends its time in the networks' matrix multiplies and convolutions; on a GPU those
run several times faster in bf16 (tensor cores) than in float32. Autocast casts exactly those
ops, and the weights once per sampling call (autocast caches the casts inside its region), while
the sampler's own arithmetic (the schedule, x_t, the DDIM/DDPM update) stays float32, as in
training (dalle2.diffusion). float32 matmuls on CUDA use TF32 (10-bit mantissa inputs, float32
accumulation), which is what PyTorch's "high" float32 matmul precision means.

Defaults: bf16 on CUDA, fp32 elsewhere (CPU bf16 autocast exists and is what the tests use to
check bf16 sampling against float32, but on CPUs without AVX-512 BF16 it is slower than float32).

Training autocast (``deepspeed: {precision: fp32, autocast: auto}``, the CPU job configs): the
weights, gradients and AdamW state stay float32 and only the forward's convolutions and matmuls
run in bf16 (autocast keeps norms, softmax and the loss in float32). On a 2-core AMD EPYC with
AVX-512 BF16, one step of the demo's decoder took 0.68x its float32 time, the upsampler's 0.74x;
with oneDNN held to AVX2 (no bf16 instructions) the same decoder step took 20x longer, so
``auto`` turns it on only where the CPU has bf16 arithmetic (:func:`cpu_has_native_bf16`).
"""

from __future__ import annotations

import contextlib
import enum
from typing import ContextManager, Iterator, Optional

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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX-512 BF16 or AMX) and oneDNN may use it
    (``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16 forbids it; then bf16 is emulated)."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    native = capabilities.get("avx512_bf16", False) or capabilities.get("amx_bf16", False)
    return bool(native) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def training_autocast_dtype(setting: str, device: torch.device | str) -> Optional[torch.dtype]:
    """The dtype a training forward pass runs in under autocast, or None for none. ``setting``:
    none, bf16, or auto (bf16 on a CPU with bf16 arithmetic and on a CUDA device that has it)."""
    if setting not in ("none", "bf16", "auto"):
        raise ValueError(f"autocast must be none, bf16 or auto, got {setting!r}")
    device = torch.device(device)
    if setting == "auto":
        native = cpu_has_native_bf16() if device.type == "cpu" else device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else None
    return torch.bfloat16 if setting == "bf16" else None


def training_autocast(dtype: Optional[torch.dtype], device: torch.device | str) -> ContextManager:
    """The forward pass's autocast region for :func:`training_autocast_dtype`'s answer."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
