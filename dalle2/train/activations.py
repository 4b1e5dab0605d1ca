"""Activation memory of one training micro-batch, measured on CPU at reduced widths.

A paper-size model cannot be run here, but what its backward pass keeps is a function of its
shapes: every tensor autograd saves is [batch, width-proportional channels, positions] (convs,
MLPs, norms) or [batch, heads, positions, positions] (attention maps, with heads fixed as the
width shrinks). So the saved bytes are a + b * r in the width factor r, exactly, and linear in the
micro-batch. :func:`measure` runs the job's own loss module (its task's inputs from a synthetic
batch, the forward process, the network) at two reduced widths under
``torch.autograd.graph.saved_tensors_hooks``, sums the distinct storages saved for backward
(parameters excluded: they are counted as model states), fits the line and reads it at r = 1;
``check=True`` also measures a third, larger width and reports the relative error of the line there.

Activation checkpointing (``activation_checkpointing: true``) keeps only each checkpointed unit's
inputs (UNet stages, Transformer blocks) plus, during the backward pass, one unit's recomputed
activations: measured with checkpointing off, each saved storage is attributed to the unit whose
forward saved it, and the checkpointed figure is [saved outside units] + [unit inputs] + [the
largest unit's own]. The CPU figures are conservative for a GPU: CPU attention with a mask saves
its probabilities ([N, heads, S, S]); flash attention on a GPU keeps only a logsumexp.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

FIT_FACTORS = (1 / 16, 1 / 8)  # the two widths of the fit, as fractions of the full width
CHECK_FACTOR = 3 / 16  # the third, for the error of the extrapolation
MEASURE_BATCH = 2


@dataclass(frozen=True)
class ActivationEstimate:
    bytes_plain: float  # without activation checkpointing, per micro-batch of `batch`
    bytes_checkpointed: float  # with it
    checkpointing: bool  # which of the two the model's config uses
    batch: int
    fit: dict  # {factor: bytes_plain at MEASURE_BATCH} of the measured widths
    check_error: float | None  # relative error of the line at CHECK_FACTOR (None: not checked)

    @property
    def bytes(self) -> float:
        return self.bytes_checkpointed if self.checkpointing else self.bytes_plain


def _scaled(value: int, factor: float, divisor: int = 1) -> int:
    """``value * factor`` rounded to a positive multiple of ``divisor`` (the head count)."""
    return divisor * max(1, round(value * factor / divisor))


def _scale_unet(unet, factor: float):
    heads = max(1, unet.channels // unet.head_channels)
    channels = _scaled(unet.channels, factor, heads)
    return dataclasses.replace(unet, channels=channels, head_channels=max(1, channels // heads), activation_checkpointing=False)


def reduced_config(kind: str, config: Any, factor: float) -> Any:
    """``config`` with every width times ``factor`` (head counts kept) and checkpointing off."""
    if kind == "prior":
        return dataclasses.replace(config, width=_scaled(config.width, factor, config.heads), activation_checkpointing=False)
    if kind == "decoder":
        text = config.text
        width = _scaled(text.width, factor, text.heads)
        token_width = text.token_embed_width and _scaled(text.token_embed_width, factor)
        return dataclasses.replace(config, unet=_scale_unet(config.unet, factor), text=dataclasses.replace(text, width=width, token_embed_width=token_width))
    if kind.startswith("upsampler"):
        return dataclasses.replace(config, unet=_scale_unet(config.unet, factor))
    if kind == "clip":
        return dataclasses.replace(config, model_name=_reduced_open_clip(config.model_name, factor))
    raise ValueError(f"no reduced widths for model kind {kind!r}")


@functools.cache
def _reduced_open_clip(model_name: str, factor: float) -> str:
    """Register (with open_clip's public ``add_model_config``) a copy of an open_clip config with
    its tower widths times ``factor``; returns its name."""
    import open_clip

    from dalle2.clip import register_model_configs

    register_model_configs()
    config = json.loads(json.dumps(open_clip.get_model_config(model_name)))
    vision, text = config["vision_cfg"], config["text_cfg"]
    vision_heads = vision["width"] // vision.get("head_width", 64)
    vision["width"] = _scaled(vision["width"], factor, vision_heads)
    vision["head_width"] = vision["width"] // vision_heads
    text_heads = text.get("heads", 8)
    text["width"] = _scaled(text.get("width", 512), factor, text_heads)
    name = f"dalle2-plan-{model_name}-x{factor:.5f}"
    folder = tempfile.mkdtemp(prefix="dalle2-plan-")
    with open(f"{folder}/{name}.json", "w") as file:
        json.dump(config, file)
    open_clip.add_model_config(folder)
    return name


def checkpoint_unit_names(model: nn.Module, config_flags_on: bool = True) -> list[str]:
    """Names of the modules that activation checkpointing recomputes (see dalle2.layers.checkpointed)."""
    from dalle2.prior import PriorTransformer
    from dalle2.text_encoder import TextEncoder
    from dalle2.unet import UNet

    names = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, UNet):
            for part in ("down", "middle", "up"):
                names += [f"{prefix}{part}.{i}" for i in range(len(getattr(module, part)))]
        elif isinstance(module, (PriorTransformer, TextEncoder)):
            names += [f"{prefix}blocks.{i}" for i in range(len(module.blocks))]
    return names


def synthetic_batch(task, config: Any, batch: int) -> dict[str, np.ndarray]:
    """A pipeline batch of the right shapes for ``task`` (precomputed CLIP embeddings where the
    task takes them, so that no CLIP is built for the measurement)."""
    rng = np.random.default_rng(0)
    size = config.image_size if hasattr(config, "image_size") else 224
    context = getattr(getattr(config, "text", config), "context_length", 77)
    tokens = np.zeros((batch, context), dtype=np.int64)
    tokens[:, :12] = rng.integers(1, 49000, (batch, 12))
    rows = {"key": np.array([f"k{i}" for i in range(batch)]), "caption": np.array(["a caption"] * batch), "tokens": tokens}
    if task.kind != "prior":
        rows["image"] = rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    if task.kind in ("prior", "decoder"):
        dim = config.embed_dim
        rows["image_embed"] = rng.standard_normal((batch, dim)).astype(np.float32)
    if task.kind == "prior":
        rows["text_embed"] = rng.standard_normal((batch, config.embed_dim)).astype(np.float32)
        rows["text_hidden"] = rng.standard_normal((batch, config.context_length, config.text_width)).astype(np.float32)
        rows["tokens"] = tokens[:, : config.context_length]
    return rows


def saved_bytes(job_kind: str, kind: str, config: Any, batch: int) -> dict[str, float]:
    """{"plain": bytes, "checkpointed": bytes} saved for backward by one micro-batch of ``batch``
    through the job's loss module, in float32 on CPU (see the module docstring)."""
    from dalle2.train.tasks import make_task

    torch.manual_seed(0)
    task = make_task(job_kind, kind, config, precomputed=True)
    model = task.build_model().train()
    if kind == "prior":
        model.load_embedding_stats({"image_mean": torch.zeros(config.embed_dim), "image_std": torch.ones(config.embed_dim)})
    loss_module = task.loss_module(model)
    inputs = task.inputs(synthetic_batch(task, config, batch))
    excluded = {t.untyped_storage().data_ptr() for t in [*loss_module.parameters(), *loss_module.buffers()]}
    units = dict(model.named_modules())
    storages: dict[int, tuple[int, str]] = {}
    unit_inputs: set[int] = set()
    active: list[str] = []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded and storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = (storage.nbytes(), active[-1] if active else "")
        return tensor

    def enter(name):
        def hook(module, args):
            for value in args:
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in excluded:
                    unit_inputs.add(value.untyped_storage().data_ptr())
                    storages.setdefault(value.untyped_storage().data_ptr(), (value.untyped_storage().nbytes(), active[-1] if active else ""))
            active.append(name)

        return hook

    def leave(module, args, output) -> None:
        active.pop()

    handles = []
    for name in checkpoint_unit_names(model):
        handles.append(units[name].register_forward_pre_hook(enter(name)))
        handles.append(units[name].register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss_module(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    plain = float(sum(size for size, _ in storages.values()))
    outside = sum(size for ptr, (size, owner) in storages.items() if owner == "" or ptr in unit_inputs)
    per_unit: dict[str, float] = {}
    for ptr, (size, owner) in storages.items():
        if owner and ptr not in unit_inputs:
            per_unit[owner] = per_unit.get(owner, 0.0) + size
    return {"plain": plain, "checkpointed": float(outside + max(per_unit.values(), default=0.0))}


def _line(points: dict[float, float], at: float) -> float:
    (x0, y0), (x1, y1) = sorted(points.items())
    return y0 + (y1 - y0) * (at - x0) / (x1 - x0)


def measure(job_kind: str, kind: str, config: Any, batch: int, check: bool = False) -> ActivationEstimate:
    """Activation bytes of a micro-batch of ``batch`` of the full-width model (float32; scale by
    the training dtype's size), extrapolated from :data:`FIT_FACTORS`."""
    fits = {f: saved_bytes(job_kind, kind, reduced_config(kind, config, f), MEASURE_BATCH) for f in FIT_FACTORS}
    scale = batch / MEASURE_BATCH
    plain = _line({f: v["plain"] for f, v in fits.items()}, 1.0) * scale
    checkpointed = _line({f: v["checkpointed"] for f, v in fits.items()}, 1.0) * scale
    error = None
    if check:
        direct = saved_bytes(job_kind, kind, reduced_config(kind, config, CHECK_FACTOR), MEASURE_BATCH)["plain"]
        error = abs(_line({f: v["plain"] for f, v in fits.items()}, CHECK_FACTOR) - direct) / direct
    flag = _checkpointing(kind, config)
    return ActivationEstimate(plain, checkpointed, flag, batch, {f: v["plain"] for f, v in fits.items()}, error)


def _checkpointing(kind: str, config: Any) -> bool:
    if kind == "prior":
        return config.activation_checkpointing
    unet = getattr(config, "unet", None)
    return bool(unet is not None and unet.activation_checkpointing)



