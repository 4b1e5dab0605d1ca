"""Model configs: one frozen dataclass per model, named presets in small JSON files.

A preset is one small JSON file per model kind (``dalle2/presets/<kind>/<preset>.json``). Each
parameter is written once: sizes a model inherits from CLIP (embedding dim, text width,
context length) are filled in by :func:`load_preset`, so a prior's saved config still
names them and its bundle alone rebuilds it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Optional

PRESETS = ("tiny", "small", "base", "paper")
ModelKind = Literal["clip", "prior", "decoder", "upsampler"]


class Schedule(str, enum.Enum):
    """Noise schedule (Nichol & Dhariwal 2021; DALL-E 2 uses cosine except the last upsampler)."""

    COSINE = "cosine"
    LINEAR = "linear"


class Prediction(str, enum.Enum):
    """What the network predicts: the clean sample, the noise, or the velocity (Salimans & Ho 2022)."""

    X0 = "x0"
    EPS = "eps"
    V = "v"


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    schedule: Schedule = Schedule.COSINE
    prediction: Prediction = Prediction.EPS
    sample_steps: int = 64  # default number of respaced steps at sampling time
    # Min-SNR-gamma loss weighting (Hang et al. 2023; GaussianDiffusion.loss_weights): 0 = plain loss.
    min_snr_gamma: float = 0.0
    min_loss_weight: float = 0.0  # the least factor any timestep's loss keeps under min_snr_gamma


@dataclass(frozen=True)
class ClipConfig:
    """A CLIP built by open_clip: ``model_name`` is one of our registered configs
    (``dalle2-tiny``...) or a stock open_clip name (``ViT-B-32``, ``ViT-H-14``...)."""

    model_name: str
    pretrained: Optional[str] = None  # a local checkpoint file, for users who have weights on disk
    # Read from the open_clip model config; stored so that bundles of models that depend on
    # CLIP (prior, decoder) can be rebuilt without building CLIP.
    embed_dim: int = 0
    text_width: int = 0
    context_length: int = 77
    image_size: int = 224


@dataclass(frozen=True)
class PriorConfig:
    """Decoder-only causal Transformer prior (DALL-E 2, section 2.2)."""

    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    embed_dim: int = 0  # CLIP embedding dim (filled from the CLIP section)
    text_width: int = 0  # CLIP text hidden width (per-token states fed to the prior)
    context_length: int = 77  # caption tokens the prior attends to
    text_drop_prob: float = 0.1  # paper: text dropped 10% of the time for guidance
    candidates: int = 2  # paper: draw 2 embeddings, keep the higher dot product with the text
    # Recompute each Transformer block in the backward pass instead of storing its activations
    # (dalle2.layers.checkpointed): what lets the paper-size prior train at micro-batch 512.
    activation_checkpointing: bool = False
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(prediction=Prediction.X0))


def _convert(tp: Any, value: Any) -> Any:
    """Turn JSON values into the dataclass field types (enums, nested dataclasses, tuples)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value)
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        (inner, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_convert(inner, v) for v in value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value) if isinstance(value, dict) else value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    return value


def from_dict(cls: type, data: dict[str, Any]):
    """Build a config dataclass from a dict, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    return cls(**{k: _convert(hints[k], v) for k, v in data.items()})


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (enums as their values)."""

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def read_preset_file(kind: str, name: str) -> dict[str, Any]:
    """The raw JSON of model ``kind``'s preset ``name``, or a clear error naming what exists."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    path = resources.files("dalle2.presets").joinpath(kind, f"{name}.json")
    if not path.is_file():
        raise ValueError(f"no {kind!r} config in preset {name!r}")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class UNetConfig:
    """The convolutional trunk shared by the decoder and the upsamplers (GLIDE / improved-diffusion UNet)."""

    channels: int  # base channel count
    channel_mults: tuple[int, ...] = (1, 2, 3, 4)
    res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = ()  # feature-map sizes with self-attention; () = none
    head_channels: int = 64
    dropout: float = 0.0
    # Two extra input channels holding each pixel's (y, x) in [-1, 1] (CoordConv, Liu et al. 2018).
    # Convolutions and position-free attention only learn where they are from the zero padding;
    # a decoder asked for "at the top left" learns placement far sooner with the coordinates given.
    coordinates: bool = False
    # Add a fixed 2D sine-cosine position code to every attention block's input. The blocks' keys
    # and values include the condition tokens, so a query that knows where it is can pick up
    # "top left" from them; without it attention is blind to position.
    attention_positions: bool = False
    # Recompute each stage (ResBlock + its attention) in the backward pass instead of storing its
    # activations (dalle2.layers.checkpointed); the decoder's text encoder follows this flag.
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class TextEncoderConfig:
    """GLIDE's caption Transformer (the decoder's own text encoder)."""

    width: int
    layers: int
    heads: int
    vocab_size: int = 49408  # open_clip's BPE vocabulary
    context_length: int = 77
    # Width of the token embedding table; 0 = width. Smaller factorizes it (vocab -> this -> width,
    # ALBERT) so that the 49k-token vocabulary does not dominate tiny models.
    token_embed_width: int = 0


@dataclass(frozen=True)
class DecoderConfig:
    """GLIDE-style decoder conditioned on a CLIP image embedding (DALL-E 2, section 2.1)."""

    image_size: int
    unet: UNetConfig
    text: TextEncoderConfig
    embed_dim: int = 0  # CLIP embedding dim (filled from the CLIP section)
    clip_tokens: int = 4  # paper: the image embedding is projected into 4 extra context tokens
    image_embed_drop_prob: float = 0.1  # paper: CLIP embedding dropped 10% of the time
    text_drop_prob: float = 0.5  # paper: caption dropped 50% of the time
    inpainting: bool = False  # extra input channels: masked image (3) + mask (1)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


class Degradation(str, enum.Enum):
    """Conditioning augmentation of an upsampler's low-resolution input (DALL-E 2, section 2.1)."""

    BLUR = "blur"  # 64->256: Gaussian blur
    BSR = "bsr"  # 256->1024: BSR-like degradation (blur, resize, noise, JPEG)


@dataclass(frozen=True)
class UpsamplerConfig:
    """Diffusion upsampler: UNet without attention or text, conditioned on the low-resolution image."""

    low_res: int
    image_size: int
    unet: UNetConfig
    degradation: Degradation = Degradation.BLUR
    crop_fraction: float = 0.25  # paper: trained on random crops of a quarter of the target size
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(sample_steps=27))


CONFIG_CLASSES: dict[str, type] = {
    "clip": ClipConfig,
    "prior": PriorConfig,
    "decoder": DecoderConfig,
    "upsampler_256": UpsamplerConfig,
    "upsampler_1024": UpsamplerConfig,
}
