"""CLIP through open_clip: our tiny/small configs registered beside the stock ones.

No weights can be downloaded at run time, so every model is built from its config;
``ClipConfig.pretrained`` names a checkpoint on disk for users who have one. The
prior and the decoder need both the pooled text embedding and the per-token hidden
states (DALL-E 2, section 2.2: the prior attends to the encoded text), so
:meth:`Clip.encode_text` returns both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from dataclasses import dataclass
from importlib import resources

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from dalle2.config import ClipConfig
from dalle2.text_encoder import caption_mask

# open_clip's normalisation constants (OpenAI CLIP's training-set statistics).
IMAGE_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
IMAGE_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


@functools.cache
def register_model_configs() -> None:
    """Register ``dalle2/presets/open_clip/*.json`` with open_clip (once; not at import time)."""
    folder = resources.files("dalle2.presets").joinpath("open_clip")
    with resources.as_file(folder) as path:
        open_clip.add_model_config(path)


def open_clip_dims(model_name: str) -> dict[str, int]:
    """Sizes other models inherit from a CLIP: embedding dim, text width, context length, image size."""
    register_model_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    vision, text = config["vision_cfg"], config["text_cfg"]
    image_size = vision.get("image_size", 224)
    return {
        "embed_dim": config["embed_dim"],
        "text_width": text.get("width", 512),
        "context_length": text.get("context_length", 77),
        "image_size": image_size if isinstance(image_size, int) else image_size[0],
    }


def complete_config(config: ClipConfig) -> ClipConfig:
    """Fill the sizes of a ClipConfig from open_clip's model config."""
    return dataclasses.replace(config, **open_clip_dims(config.model_name))


@functools.cache
def _tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.tokenizer.SimpleTokenizer()  # BPE vocabulary ships inside open_clip


def tokenize(captions: list[str], context_length: int) -> torch.Tensor:
    """BPE token ids [N, context_length], 0-padded. Captions longer than the context are
    truncated (the end-of-text token is kept as the last token), as CLIP's own tokenizer does."""
    return _tokenizer()(list(captions), context_length=context_length)


@dataclass
class TextEncoding:
    embed: torch.Tensor  # [N, D] pooled, projected text embedding (not normalised)
    hidden: torch.Tensor  # [N, L, W] per-token hidden states after the final layer norm
    mask: torch.Tensor  # [N, L] bool, True where a real token is (caption_mask: through end-of-text)


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _without_open_clip_notices():
    """open_clip warns on the root logger that no pretrained weights were loaded, which is how
    every bundle starts (its weights are loaded right after): users would read it as a failure."""
    notice = _DropNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


class Clip(nn.Module):
    """An open_clip CLIP with the interface the rest of dalle2 uses."""

    def __init__(self, config: ClipConfig, device: torch.device | str | None = None):
        super().__init__()
        register_model_configs()
        self.config = complete_config(config) if config.embed_dim == 0 else config
        with _without_open_clip_notices():
            self.model = open_clip.create_model(
                config.model_name,
                pretrained=config.pretrained,
                device=device or "cpu",
                output_dict=True,
                # No hub at run time: a `pretrained` here is a local file path.
                load_weights=config.pretrained is not None,
            )
        self._final_norm = _text_final_norm(self.model)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return tokenize(captions, self.config.context_length)

    def encode_text(self, tokens: torch.Tensor) -> TextEncoding:
        captured: list[torch.Tensor] = []
        hook = self._final_norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            embed = self.model.encode_text(tokens)
        finally:
            hook.remove()
        return TextEncoding(embed=embed, hidden=captured[-1], mask=caption_mask(tokens))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: [N, 3, H, W] in [-1, 1], any size -> [N, D] image embedding (not normalised)."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        pixels = (images + 1) / 2
        mean, std = IMAGE_MEAN.to(images), IMAGE_STD.to(images)
        return self.model.encode_image((pixels - mean) / std)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image_features, text_features), the inputs of the contrastive loss."""
        image = F.normalize(self.encode_image(images), dim=-1)
        text = F.normalize(self.model.encode_text(tokens), dim=-1)
        return image, text


def _text_final_norm(model: nn.Module) -> nn.Module:
    """The layer norm whose output is the per-token text states (CLIP or CustomTextCLIP)."""
    for owner in (model, getattr(model, "text", None)):
        norm = getattr(owner, "ln_final", None)
        if isinstance(norm, nn.Module):
            return norm
    raise ValueError(f"{type(model).__name__}: no text tower with a final layer norm (ln_final)")
