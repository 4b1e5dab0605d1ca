"""The CLIP deployments: captions -> text encodings (for the prior), images -> image embeddings
(for variations, and edits without a caption). One forward per batch: CLIP is not iterative.

Both load the same clip bundle; they are separate deployments so that text-to-image traffic and
variations traffic scale (and sit on GPUs) independently.
"""

from __future__ import annotations

import asyncio
import time

import torch
from PIL import Image
from ray import serve

from dalle2.clip import TextEncoding
from dalle2.images import InvalidInput, image_to_tensor
from dalle2.cascade import encode_prompts
from serve.messages import EncodedText, Latents
from serve.model_stage import ModelStage, batched, raise_if_error


def _row(tensor: torch.Tensor, i: int) -> torch.Tensor:
    # clone: a pickled view would carry the whole batch's storage to the next stage
    return tensor[i : i + 1].detach().cpu().clone()


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
class TextEncoder(ModelStage):
    kind, stage, batched_method = "clip", "text_encoder", "_encode_batch"

    @torch.no_grad()
    def probe(self) -> None:
        encode_prompts(self.model, ["health check"])

    def _encode_prompts(self, prompts: list[str]) -> tuple[TextEncoding, torch.Tensor]:
        with self.in_precision():
            return encode_prompts(self.model, prompts)  # float32 out whatever ran inside

    async def encode(self, prompt: str) -> EncodedText:
        return raise_if_error(await self._encode_batch(prompt))

    @batched()
    async def _encode_batch(self, prompts: list[str]) -> list[EncodedText | Exception]:
        start = time.perf_counter()
        good = [i for i, p in enumerate(prompts) if isinstance(p, str) and p.strip()]
        results: list = [InvalidInput("prompt must be a non-empty string", "prompt")] * len(prompts)
        if good:
            text, tokens = await asyncio.to_thread(self._encode_prompts, [prompts[i] for i in good])
            for row, i in enumerate(good):
                encoding = TextEncoding(_row(text.embed, row), _row(text.hidden, row), _row(text.mask, row))
                results[i] = EncodedText(encoding, _row(tokens, row))
        return self.stamp(results, prompts, start, forwards=1 if good else 0)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
class ImageEncoder(ModelStage):
    """CLIP image embeddings, each repeated ``copies`` times: the decoder's input for variations
    (DALL-E 2 section 3.1: decode an image's embedding with fresh noise)."""

    kind, stage, batched_method = "clip", "image_encoder", "_encode_batch"

    @torch.no_grad()
    def probe(self) -> None:
        size = self.model.config.image_size
        self.model.encode_image(torch.zeros(1, 3, size, size, device=self.device))
    async def encode(self, image: Image.Image, copies: int = 1) -> Latents:
        return raise_if_error(await self._encode_batch((image, copies)))

    @batched(batch_size_fn=lambda items: sum(copies for _, copies in items))
    async def _encode_batch(self, items: list[tuple[Image.Image, int]]) -> list[Latents]:
        start = time.perf_counter()
        size = self.model.config.image_size

        @torch.no_grad()
        def encode() -> torch.Tensor:  # the same as dalle2.cascade.image_embeds_of
            batch = torch.cat([image_to_tensor(image, size) for image, _ in items]).to(self.device)
            with self.in_precision():
                return self.model.encode_image(batch).float().cpu()

        embeds = await asyncio.to_thread(encode)
        results = [
            Latents(embeds[i : i + 1].repeat_interleave(copies, dim=0), text_tokens=None, rng_state=None)
            for i, (_, copies) in enumerate(items)
        ]
        return self.stamp(results, items, start, forwards=1)
