"""What each model learns from a batch: plain PyTorch, no Ray, no DeepSpeed.

A task turns a batch of the data pipeline (numpy: ``image`` uint8 [B, S, S, 3], ``tokens``
int64 [B, L], ``caption`` [B]) into model inputs, and wraps the model in a *loss module* whose
``forward(**inputs, generator=None)`` returns the scalar loss. The training loop hands the loss
module to DeepSpeed, so under ZeRO-3 every parameter the loss touches is used inside a
module's forward, where ZeRO gathers it. The model itself (what a bundle holds) is always
``loss_module.model``.

- CLIP: symmetric contrastive loss over the batch gathered from every worker (Radford et al. 2021).
- Prior: MSE of the predicted unnoised CLIP image embedding from the frozen CLIP's text
  encoding (DALL-E 2 sec. 2.2); embedding statistics estimated from data first.
- Decoder: DDPM L_simple (Ho et al. 2020) on images, conditioned on the frozen CLIP's image
  embedding (or the one ``dalle2 data embed`` stored beside the image) and the caption, dropped
  10% / 50% for guidance (DALL-E 2 sec. 2.1).
- Upsamplers: L_simple on random crops of a quarter of the size, the low-resolution input
  corrupted by blur or BSR degradation (DALL-E 2 sec. 2.1; Ho et al. 2021).
"""

from __future__ import annotations

import abc
import math
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn

from dalle2.clip import tokenize
from dalle2.text_encoder import caption_mask
from dalle2.clip_loss import ContrastiveLoss
from dalle2.data.preprocess import to_model_images
from dalle2.diffusion import ClassifierFreeGuidance, GaussianDiffusion
from dalle2.factory import create_model
from dalle2.train.samples import image_grid, similarity_image

DEFAULT_CONTEXT_LENGTH = 77  # captions of models without CLIP (the upsamplers ignore them)
MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature at 100 (Radford et al. 2021, sec. 2.5)
Batch = dict[str, np.ndarray]


def _images(batch: Batch, device, dtype) -> Tensor:
    """uint8 [B, S, S, 3] -> [B, 3, S, S] in [-1, 1]."""
    return to_model_images(torch.from_numpy(np.array(batch["image"]))).to(device=device, dtype=dtype)  # a writable copy


def _tokens(batch: Batch, context_length: int, device) -> Tensor:
    """[B, L] BPE ids: the pipeline's tokens when it made them at this length, else the captions
    tokenized here (training jobs read untokenized captions: dalle2.train.launch)."""
    tokens = batch.get("tokens")
    if tokens is not None and np.shape(tokens)[1] == context_length:
        return torch.from_numpy(np.array(tokens)).to(device)
    return tokenize([str(c) for c in batch["caption"]], context_length).to(device)


def resize_images(images: Tensor, size: int) -> Tensor:
    """[B, 3, S, S] in [-1, 1] -> [B, 3, size, size]: antialiased bicubic (as the pipeline's PIL
    resize), clamped back into range; unchanged when already that size."""
    if images.shape[-1] == size:
        return images
    resized = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(-1, 1)


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def data_resolution(kind: str, model_config: Any, clip_config: Any = None, *, clip_sees_images: bool = False) -> tuple[int, int]:
    """(image size, caption tokens) the data pipeline delivers for a model of ``kind``: CLIP's
    own for CLIP and the prior (whose CLIP sees the images), the decoder's or upsampler's target
    size for those; captions always at CLIP's context length (the decoder re-tokenizes for its own).

    A decoder whose frozen CLIP runs in the step (``clip_sees_images``) gets the larger of its
    own size and CLIP's: CLIP must embed the image as `dalle2 data embed`, the prior and
    ``variations`` do, from the full-resolution source, not from a 64px image blown up to 224
    (DecoderTask downsamples its own copy for x0)."""
    if kind == "clip":
        return model_config.image_size, model_config.context_length
    context_length = clip_config.context_length if clip_config is not None else DEFAULT_CONTEXT_LENGTH
    if kind == "prior":
        return clip_config.image_size, context_length
    if kind == "decoder" and clip_sees_images and clip_config is not None:
        return max(model_config.image_size, clip_config.image_size), context_length
    return model_config.image_size, context_length


# ------------------------------------------------------------------------------- loss modules


class ContrastiveClipLoss(nn.Module):
    def __init__(self, model: nn.Module, rank: int, world_size: int):
        super().__init__()
        self.model = model
        self.contrastive = ContrastiveLoss(rank, world_size)

    def forward(self, images: Tensor, tokens: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        image_features, text_features = self.model(images, tokens)  # [N, D] each, L2-normalised
        # No clamp here: ClipTask.clamped_parameters keeps the parameter itself in range after every
        # step, as open_clip does; a clamp in the forward would zero its gradient and strand it above.
        return self.contrastive(image_features, text_features, self.model.logit_scale)


class PriorLoss(nn.Module):
    """The prior's loss with its embedding normalisation in float32 (the x0 target is the
    normalised embedding: in bf16 it would be quantised to 3 significant digits)."""

    def __init__(self, model: nn.Module, stats: dict[str, Tensor]):
        super().__init__()
        self.model = model
        # Plain attributes, not buffers: an engine that casts the module to bf16 leaves them alone.
        self.stats = {name: value.detach().float().clone() for name, value in stats.items()}

    def forward(self, image_embed, text_embed, text_hidden, text_mask, generator=None) -> Tensor:
        for name, value in self.stats.items():
            buffer = getattr(self.model, name)
            if buffer.dtype != torch.float32 or buffer.device != image_embed.device:
                buffer.data = value.to(image_embed.device)
        return self.model.loss(image_embed, text_embed, text_hidden, text_mask, generator=generator)


class DiffusionLoss(nn.Module):
    """Mean L_simple of an image network that holds no diffusion (decoder, upsampler)."""

    def __init__(self, model: nn.Module, diffusion: GaussianDiffusion):
        super().__init__()
        self.model = model
        self.diffusion = diffusion

    def forward(self, x0: Tensor, generator: Optional[torch.Generator] = None, **cond) -> Tensor:
        """x0 in float32 (the forward process stays there); the network gets x_t in its own dtype."""
        if hasattr(self.model, "random_drop_masks"):  # the decoder: guidance drops (10% / 50%)
            cond["drop_image_embed"], cond["drop_text"] = self.model.random_drop_masks(x0.shape[0], generator)
        input_dtype = next(self.model.parameters()).dtype
        return self.diffusion.training_loss(self.model, x0, generator=generator, input_dtype=input_dtype, **cond).mean()


# ------------------------------------------------------------------------------- tasks


class Task(abc.ABC):
    """Base of the four tasks. ``model_config`` is the config of the model trained;
    ``clip`` the frozen CLIP (prior, decoder), already on ``device``."""

    kind: str
    uses_clip = False
    needs_preparation = False  # prepare() reads the first batches of a new run
    accepts_embeddings = False  # batches of precomputed CLIP embeddings (dalle2.train.embeddings)

    def __init__(self, kind: str, model_config: Any, *, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1, clip: Optional[nn.Module] = None, precomputed: bool = False):
        self.kind, self.config = kind, model_config
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        if self.uses_clip and clip is None and not (precomputed and self.accepts_embeddings):
            raise ValueError(f"the {kind} task needs a frozen CLIP")
        self.clip = None if clip is None else clip.to(self.device).eval().requires_grad_(False)

    # -- data --------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """The resolution the data pipeline delivers."""
        return self._resolution()[0]

    @property
    def context_length(self) -> int:
        """Caption tokens the data pipeline delivers."""
        return self._resolution()[1]

    def _resolution(self) -> tuple[int, int]:
        clip_config = None if self.clip is None else self.clip.config
        return data_resolution(self.kind, self.config, clip_config, clip_sees_images=self.clip is not None)

    @abc.abstractmethod
    def inputs(self, batch: Batch, dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """The loss module's keyword arguments for a pipeline batch, floats in ``dtype``."""

    # -- model -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return create_model(self.kind, self.config)

    @abc.abstractmethod
    def loss_module(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped so that ``forward(**inputs, generator=None)`` returns the scalar loss."""

    def clamped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, float, float]]:
        """(parameter, low, high): ranges the training loop restores after every optimizer step."""
        return []

    def external_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters the loss uses outside the forward of the module that owns them. ZeRO-3
        gathers a module's parameters around its own forward; these are registered with
        ``deepspeed.zero.register_external_parameter`` (DeepSpeed also detects most such uses
        itself; being explicit does not depend on it)."""
        return []

    # -- state beside the weights (the prior's embedding statistics) -------------------------
    def prepare(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        """Before the first step of a new run."""

    def extra_state(self, model: nn.Module) -> dict[str, Tensor]:
        return {}

    def load_extra_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`extra_state` saved."""

    # -- validation pictures ----------------------------------------------------------------
    def sample_figure(self, model: nn.Module, batch: Batch, *, steps: int, guidance_scale: float, generator: torch.Generator) -> Optional[Image.Image]:
        """A PNG-able picture of samples for a validation batch (None: the model has none)."""
        return None

    def _sample_steps(self, steps: int) -> int:
        return steps or self.config.diffusion.sample_steps


class ClipTask(Task):
    def inputs(self, batch, dtype=torch.float32, generator=None):
        return {"images": _images(batch, self.device, dtype), "tokens": _tokens(batch, self.context_length, self.device)}

    def loss_module(self, model):
        return ContrastiveClipLoss(model, self.rank, self.world_size)

    def clamped_parameters(self, model):
        # CLIP's learned temperature: logit_scale = ln(1 / T) in [0, ln 100] (Radford et al. 2021,
        # sec. 2.5: "clipped to prevent scaling the logits by more than 100"; open_clip clamps it
        # after each step).
        return [(model.model.logit_scale, 0.0, math.log(MAX_LOGIT_SCALE))]

    def external_parameters(self, model):
        # open_clip's CLIP holds positional_embedding, text_projection and logit_scale itself but
        # its forward is not called (encode_image/encode_text are): the loss module uses them.
        return list(model.model.parameters(recurse=False))


class PriorTask(Task):
    uses_clip = True
    needs_preparation = True
    accepts_embeddings = True

    @torch.no_grad()
    def _encode(self, batch: Batch) -> dict[str, Tensor]:
        if "image_embed" in batch:  # computed beforehand by `dalle2 data embed`
            tokens = torch.from_numpy(np.array(batch["tokens"])).to(self.device)
            embeds = {name: torch.from_numpy(np.array(batch[name])).to(self.device).float() for name in ("image_embed", "text_embed", "text_hidden")}
            return {**embeds, "text_mask": caption_mask(tokens)}
        if self.clip is None:
            raise ValueError("a batch of images, but the prior task was built for precomputed embeddings (no CLIP)")
        text = self.clip.encode_text(_tokens(batch, self.context_length, self.device))
        image_embed = self.clip.encode_image(_images(batch, self.device, torch.float32))
        return {"image_embed": image_embed, "text_embed": text.embed, "text_hidden": text.hidden, "text_mask": text.mask}

    def inputs(self, batch, dtype=torch.float32, generator=None):
        """The text conditions in ``dtype``; the image embedding (the target) in float32."""
        encoded = self._encode(batch)
        return {k: v.to(dtype) if v.is_floating_point() and k != "image_embed" else v for k, v in encoded.items()}

    def loss_module(self, model):
        return PriorLoss(model, self.extra_state(model))

    @torch.no_grad()
    def prepare(self, model, batches):
        """Per-dimension mean/std of the CLIP image embeddings of the first batches of every
        worker, summed over workers, so all ranks hold the same statistics."""
        dim = self.config.embed_dim
        moments = torch.zeros(2 * dim + 1, dtype=torch.float64, device=self.device)  # [sum, sum of squares, count]
        for batch in batches:
            embeds = self._encode(batch)["image_embed"].double()  # [B, D]
            moments += torch.cat([embeds.sum(0), embeds.pow(2).sum(0), embeds.new_tensor([len(embeds)])])
        total, squares, count = _all_reduce_sum(moments).split([dim, dim, 1])
        if count.item() < 2:
            raise ValueError("the prior needs at least 2 training images to estimate its embedding statistics")
        mean = total / count
        variance = ((squares - count * mean**2) / (count - 1)).clamp_min(0)
        self.load_extra_state(model, {"image_mean": mean.float(), "image_std": variance.sqrt().float().clamp_min(1e-6)})

    def extra_state(self, model):
        # The float32 statistics as estimated: the engine may have cast the model's buffers to bf16.
        stats = self._stats if getattr(self, "_stats", None) else model.embedding_stats()
        return {name: value.detach().float().cpu() for name, value in stats.items()}

    def load_extra_state(self, model, state):
        self._stats = {name: value.detach().float().cpu() for name, value in state.items()}
        model.load_embedding_stats(state)

    @torch.no_grad()
    def sample_figure(self, model, batch, *, steps, guidance_scale, generator):
        """Cosine similarity of sampled image embeddings (rows) with the true ones (columns):
        a bright diagonal means each caption's sample resembles its own image."""
        encoded = self.inputs(batch, dtype=next(model.parameters()).dtype)
        sampled = model.sample(
            encoded["text_embed"], encoded["text_hidden"], encoded["text_mask"],
            steps=self._sample_steps(steps), guidance_scale=guidance_scale, generator=generator,
        )  # fmt: skip
        sampled = nn.functional.normalize(sampled.float(), dim=-1)
        truth = nn.functional.normalize(encoded["image_embed"].float(), dim=-1)
        return similarity_image(sampled @ truth.T)


class DecoderTask(Task):
    uses_clip = True
    accepts_embeddings = True

    def inputs(self, batch, dtype=torch.float32, generator=None):
        """x0 [B, 3, S, S] in float32 at the decoder's size (the forward process stays in float32);
        the conditions in ``dtype``. On the live path the images arrive at CLIP's size when that
        is larger (:func:`data_resolution`): CLIP embeds them as they are, x0 is a downsampled copy."""
        images = _images(batch, self.device, torch.float32)  # [B, 3, S', S']
        if "image_embed" in batch:
            # Computed beforehand by `dalle2 data embed` from the same (never flipped) image.
            image_embed = torch.from_numpy(np.array(batch["image_embed"])).to(self.device)  # [B, D]
        elif self.clip is None:
            raise ValueError("a batch without image_embed, but the decoder task was built for precomputed embeddings (no CLIP)")
        else:
            with torch.no_grad():
                image_embed = self.clip.encode_image(images)  # [B, D]; resized to CLIP's input inside
        x0 = resize_images(images, self.config.image_size)
        inputs = {"x0": x0, "image_embed": image_embed.to(dtype), "text_tokens": _tokens(batch, self.config.text.context_length, self.device)}
        if self.config.inpainting:  # GLIDE-style: random regions erased, the rest given with a mask channel
            from dalle2.decoder import random_inpainting_masks

            masks = random_inpainting_masks(x0.shape[0], self.config.image_size, generator).to(self.device)
            inputs.update(inpaint_image=x0.to(dtype), inpaint_mask=masks.to(dtype))
        return inputs

    def loss_module(self, model):
        return DiffusionLoss(model, GaussianDiffusion.from_config(self.config.diffusion))

    @torch.no_grad()
    def sample_figure(self, model, batch, *, steps, guidance_scale, generator):
        """Rows: the validation images, then the decoder's samples from their CLIP embeddings and captions."""
        dtype = next(model.parameters()).dtype
        inputs = self.inputs(batch, dtype=dtype)
        truth = inputs["x0"].to(dtype)  # the grid shows plain generations: no inpainting inputs
        guided = ClassifierFreeGuidance(model, guidance_scale, type(model).drop_keys)
        process = GaussianDiffusion.from_config(self.config.diffusion).respace(self._sample_steps(steps))
        samples = process.sample(
            guided, tuple(truth.shape), generator=generator, device=truth.device, clip_x0=1.0,
            image_embed=inputs["image_embed"], text_tokens=inputs["text_tokens"],
        )  # fmt: skip
        return image_grid([truth, samples])


class UpsamplerTask(Task):
    def inputs(self, batch, dtype=torch.float32, generator=None):
        """Random aligned crops of the target and of its degraded low-resolution version."""
        from dalle2.upsampler import degrade, downsample, random_crop_pair

        high_res = _images(batch, self.device, torch.float32)  # [B, 3, H, W]
        low_res = degrade(downsample(high_res, self.config.low_res), self.config.degradation, generator)
        high_crop, low_crop = random_crop_pair(high_res, low_res, self.config.crop_fraction, generator)
        return {"x0": high_crop, "low_res": low_crop.to(dtype)}  # x0 stays float32, as the decoder's

    def loss_module(self, model):
        return DiffusionLoss(model, GaussianDiffusion.from_config(self.config.diffusion))

    @torch.no_grad()
    def sample_figure(self, model, batch, *, steps, guidance_scale, generator):
        """Rows: the low-resolution input (no degradation at sampling), the upsampled sample, the target."""
        from dalle2.upsampler import downsample

        dtype = next(model.parameters()).dtype
        truth = _images(batch, self.device, dtype)
        low_res = downsample(truth, self.config.low_res)
        process = GaussianDiffusion.from_config(self.config.diffusion).respace(self._sample_steps(steps))
        samples = process.sample(model, tuple(truth.shape), generator=generator, device=truth.device, clip_x0=1.0, low_res=low_res)
        return image_grid([low_res, samples, truth])


TASKS: dict[str, type[Task]] = {"clip": ClipTask, "prior": PriorTask, "decoder": DecoderTask, "upsampler": UpsamplerTask}


def make_task(job: str, kind: str, model_config: Any, **kwargs) -> Task:
    """The task of ``job`` (clip | prior | decoder | upsampler) for a model of ``kind``."""
    if job not in TASKS:
        raise ValueError(f"unknown job {job!r}; choose one of {', '.join(TASKS)}")
    return TASKS[job](kind, model_config, **kwargs)
