"""The diffusion deployments: the prior, the decoder and the upsamplers (one deployment each).

Each runs the library's own stage function (``sample_image_embeds``, ``decode``, ``upsample``)
once per request, with the request's own generator and options, while ``@serve.batch`` and
:mod:`serve.lockstep` make all requests of a batch share one network forward per diffusion step.
So a request's images do not depend on what it was batched with (up to float rounding in a
larger forward), and its seed replays it.
"""

from __future__ import annotations

from threading import Event

import torch
from ray import serve

from dalle2.clip import TextEncoding
from dalle2.images import edit_mask, image_to_tensor
from dalle2.cascade import StageOptions, decode, sample_image_embeds, upsample
from dalle2.prior import DiffusionPrior
from serve.lockstep import SharedForward
from serve.messages import DiffusionJob, EncodedText, Latents, Pixels, PriorJob, stage_generator
from serve.model_stage import ModelStage, batched


class _PriorOnSharedNet:
    """The prior's own sampling (``DiffusionPrior.sample``: respacing, guidance, best of the
    candidates, denormalisation) with its transformer replaced by the shared forward."""

    sample = DiffusionPrior.sample

    def __init__(self, prior: DiffusionPrior, net: SharedForward):
        self._prior = prior
        self.net = net

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._prior, name)


def _images_of(items) -> int:
    return sum(upstream.images.shape[0] for upstream, _, _ in items)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
class Prior(ModelStage):
    """Caption encoding -> CLIP image embeddings (DALL-E 2 section 2.2)."""

    kind, stage, batched_method = "prior", "prior", "_sample_batch"

    @torch.no_grad()
    def probe(self) -> None:
        self.model.sample(torch.zeros(1, self.model.config.embed_dim, device=self.device), steps=1, candidates=1,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip

    async def sample(self, text: EncodedText, job: PriorJob) -> Latents:
        return await self.submit(self._sample_batch, text, job)

    @batched(batch_size_fn=lambda items: sum(job.draws for _, job, _ in items))
    async def _sample_batch(self, items: list[tuple[EncodedText, PriorJob, Event]]) -> list[Latents | Exception]:
        return await self.run_batch(self.model.net, items, self._sample_one)

    def _sample_one(self, net: SharedForward, item: tuple[EncodedText, PriorJob, Event]) -> Latents:
        encoded, job, _ = item
        generator = stage_generator(job.seed, None)  # the prior is the first stage that draws noise
        text = encoded.text
        rows = TextEncoding(*(x.to(self.device).repeat_interleave(job.draws, dim=0) for x in (text.embed, text.hidden, text.mask)))
        embeds = sample_image_embeds(_PriorOnSharedNet(self.model, net), rows, job.options, generator)  # [draws, D]
        images = job.draws * job.copies
        return Latents(
            image_embeds=embeds.repeat_interleave(job.copies, dim=0).cpu(),
            text_tokens=encoded.tokens.repeat_interleave(images, dim=0),
            rng_state=generator.get_state(),
        )


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
class Decoder(ModelStage):
    """CLIP image embeddings (+ caption) -> images at the decoder's size (DALL-E 2 section 2.1).
    Edits: the known pixels are kept (inpainting), see ``dalle2.cascade.edit``."""

    kind, stage, batched_method = "decoder", "decoder", "_decode_batch"

    def probe(self) -> None:
        embeds = torch.zeros(1, self.model.config.embed_dim, device=self.device)
        decode(self.model, embeds, None, StageOptions(1, 1.0), torch.Generator().manual_seed(0))

    async def decode(self, latents: Latents, job: DiffusionJob) -> Pixels:
        return await self.submit(self._decode_batch, latents, job)

    @batched(batch_size_fn=lambda items: sum(latents.image_embeds.shape[0] for latents, _, _ in items))
    async def _decode_batch(self, items: list[tuple[Latents, DiffusionJob, Event]]) -> list[Pixels | Exception]:
        return await self.run_batch(self.model, items, self._decode_one)

    def _decode_one(self, decoder: SharedForward, item: tuple[Latents, DiffusionJob, Event]) -> Pixels:
        latents, job, _ = item
        generator = stage_generator(job.seed, latents.rng_state)
        embeds = latents.image_embeds.to(self.device)
        tokens = None if latents.text_tokens is None else latents.text_tokens.to(self.device)
        known = None
        if job.known is not None:
            image, mask = job.known
            n, size = embeds.shape[0], self.model.config.image_size
            keep = edit_mask(mask, image, size).to(self.device)  # [1, 1, S, S] 1 = keep
            pixels = image_to_tensor(image, size).to(self.device)  # [1, 3, S, S]
            known = (pixels.expand(n, -1, -1, -1), keep.expand(n, -1, -1, -1))
        images = decode(decoder, embeds, tokens, job.options, generator, known=known)
        return Pixels(images.cpu(), generator.get_state())


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
class Upsampler(ModelStage):
    """One diffusion upsampler of the cascade (64->256 or 256->1024 in the paper). The app binds
    this class once per upsampler bundle, named after its kind (Upsampler256, Upsampler1024)."""

    kind, stage, batched_method = "upsampler", "upsampler", "_upsample_batch"

    def stage_name(self) -> str:
        return f"upsampler_{self.model.config.image_size}"

    def probe(self) -> None:
        config = self.model.config
        low = torch.zeros(1, 3, config.low_res, config.low_res, device=self.device)
        upsample([self.model], low, config.image_size, StageOptions(1, 1.0), torch.Generator().manual_seed(0))

    async def upsample(self, pixels: Pixels, job: DiffusionJob) -> Pixels:
        return await self.submit(self._upsample_batch, pixels, job)

    @batched(batch_size_fn=_images_of)
    async def _upsample_batch(self, items: list[tuple[Pixels, DiffusionJob, Event]]) -> list[Pixels | Exception]:
        return await self.run_batch(self.model, items, self._upsample_one)

    def _upsample_one(self, upsampler: SharedForward, item: tuple[Pixels, DiffusionJob, Event]) -> Pixels:
        pixels, job, _ = item
        generator = stage_generator(job.seed, pixels.rng_state)
        size = self.model.config.image_size
        images = upsample([upsampler], pixels.images.to(self.device), size, job.options, generator)
        return Pixels(images.cpu(), generator.get_state())
