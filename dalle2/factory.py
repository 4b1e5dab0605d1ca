"""One factory: named presets -> configs -> models.

    create_model("prior", "tiny")          # a preset name
    create_model("prior", prior_config)    # or a config (what bundles store)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from dalle2.config import CONFIG_CLASSES, PRESETS, ClipConfig, from_dict, read_preset_file

MODEL_KINDS = tuple(CONFIG_CLASSES)  # clip, prior, decoder, upsampler_256, upsampler_1024


def _clip_dims(clip: ClipConfig) -> dict[str, int]:
    from dalle2.clip import complete_config

    full = complete_config(clip)
    return {"embed_dim": full.embed_dim, "text_width": full.text_width, "context_length": full.context_length}


def load_config(kind: str, preset: str) -> Any:
    """The config of model ``kind`` in preset ``preset``, with the sizes it inherits from
    that preset's CLIP filled in (a prior's text width, a decoder's embedding dim...)."""
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    raw = read_preset_file(kind, preset)
    if kind == "clip":
        from dalle2.clip import complete_config

        return complete_config(from_dict(ClipConfig, raw))
    config = from_dict(CONFIG_CLASSES[kind], raw)
    inherited = _clip_dims(from_dict(ClipConfig, read_preset_file("clip", preset)))
    fields = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in inherited.items() if k in fields and k not in raw})


def available_kinds(preset: str) -> list[str]:
    """Model kinds that have a config in this preset (the library grows kind by kind)."""
    kinds = []
    for kind in MODEL_KINDS:
        try:
            read_preset_file(kind, preset)
        except ValueError:
            continue
        kinds.append(kind)
    return kinds


def model_class(kind: str) -> type[nn.Module]:
    """The module class that a config of ``kind`` builds (imported lazily: no import side effects)."""
    if kind == "clip":
        from dalle2.clip import Clip

        return Clip
    if kind == "prior":
        from dalle2.prior import DiffusionPrior

        return DiffusionPrior
    if kind == "decoder":
        from dalle2.decoder import Decoder

        return Decoder
    if kind in ("upsampler_256", "upsampler_1024", "upsampler"):
        from dalle2.upsampler import Upsampler

        return Upsampler
    raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")


def create_model(kind: str, preset_or_config: Any, device: Optional[torch.device | str] = None) -> nn.Module:
    """Build a model from a preset name or a config. ``device="meta"`` allocates no memory."""
    config = load_config(kind, preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    cls = model_class(kind)
    with torch.device(device or "cpu"):
        if kind == "clip":
            return cls(config, device=device)
        return cls(config)


def parameter_counts(preset: str, device: torch.device | str = "meta") -> dict[str, int]:
    """Parameters of each model of a preset, built on the meta device by default (no memory)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    counts = {}
    for kind in available_kinds(preset):
        model = create_model(kind, preset, device=device)
        counts[kind] = sum(p.numel() for p in model.parameters())
    return counts

