"""The diffusion prior: CLIP text embedding -> CLIP image embedding (DALL-E 2, section 2.2).

A decoder-only Transformer with a causal mask over the ordered sequence

    [caption tokens (L), CLIP text embedding, timestep embedding, noised image embedding, query]

whose output at the final query token predicts the *unnoised* image embedding
(x0-prediction, MSE). The caption is dropped 10% of the time (a learned null) so that
sampling can use classifier-free guidance. Sampling draws ``candidates`` (paper: 2)
embeddings per caption and keeps the one with the higher dot product with the text
embedding.

The network works in a normalised embedding space: per-dimension mean/std of CLIP
image embeddings, computed from data (:meth:`DiffusionPrior.fit_embedding_stats`) and
saved with the model, so that a saved prior alone reproduces its outputs.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dalle2.config import PriorConfig
from dalle2.diffusion import ClassifierFreeGuidance, GaussianDiffusion, SampleStep
from dalle2.layers import Block, checkpointed, timestep_embedding
from dalle2.sampling import Sampler

# Positions of the fixed tokens that follow the L caption tokens.
_TEXT_EMBED, _TIME, _NOISED_IMAGE, _QUERY = range(4)
_FIXED_TOKENS = 4


class PriorTransformer(nn.Module):
    """The prior network: ``forward(x_t, t, **cond)`` predicts the normalised x0 [N, D]."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        if config.embed_dim <= 0 or config.text_width <= 0:
            raise ValueError("PriorConfig needs embed_dim and text_width (filled from the CLIP config)")
        self.config = config
        width = config.width
        self.caption_in = nn.Linear(config.text_width, width)
        self.text_embed_in = nn.Linear(config.embed_dim, width)
        self.time_in = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.image_in = nn.Linear(config.embed_dim, width)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.null_text_embed = nn.Parameter(torch.randn(width) * 0.02)  # learned null for guidance
        self.positions = nn.Parameter(torch.randn(config.context_length + _FIXED_TOKENS, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, config.embed_dim)

    def encode_caption(
        self,
        text_embed: torch.Tensor,  # [N, D] CLIP text embedding
        text_hidden: Optional[torch.Tensor] = None,  # [N, L, text_width] CLIP per-token states
        text_mask: Optional[torch.Tensor] = None,  # [N, L] bool, True = real token
    ) -> dict[str, torch.Tensor]:
        """Everything of the forward that depends on the caption alone, once per request.

        The caption tokens come first in a causal sequence, so their states at every layer never
        see the timestep or the noised embedding: their keys and values are a KV cache that every
        diffusion step reuses, and each step runs the Transformer over the 4 fixed tokens only.
        Returns the keyword arguments of :meth:`forward` that replace the caption: ``text_token``
        [N, W], ``caption_kv`` [N, layers, 2, heads, L, head_width], ``caption_mask`` [N, L]."""
        n = text_embed.shape[0]
        if text_hidden is None:
            text_hidden = text_embed.new_zeros(n, 0, self.config.text_width)
            text_mask = torch.zeros(n, 0, dtype=torch.bool, device=text_embed.device)
        elif text_mask is None:
            text_mask = torch.ones(text_hidden.shape[:2], dtype=torch.bool, device=text_embed.device)
        length = text_hidden.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"{length} caption tokens exceed context_length {self.config.context_length}")
        # The text embedding is used on the unit sphere (scaled to unit variance per dimension),
        # so that the prior is indifferent to CLIP's embedding norm.
        text_embed = F.normalize(text_embed, dim=-1) * math.sqrt(text_embed.shape[-1])
        tokens = self.caption_in(text_hidden) + self.positions[-(length + _FIXED_TOKENS) : self.positions.shape[0] - _FIXED_TOKENS]
        # Causal mask minus padding; every token sees itself so that no row is fully masked.
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=tokens.device)
        mask = ((causal & text_mask[:, None, :]) | eye)[:, None]  # [N, 1, L, L]
        keys_values = []
        for index, block in enumerate(self.blocks):
            keys_values.append(block.attn.keys_values(block.norm1(tokens)))  # [N, 2, heads, L, d]
            if length and index + 1 < len(self.blocks):
                tokens = checkpointed(block, tokens, mask, enabled=self.config.activation_checkpointing)
        return {"text_token": self.text_embed_in(text_embed), "caption_kv": torch.stack(keys_values, dim=1), "caption_mask": text_mask}

    def forward(
        self,
        x_t: torch.Tensor,  # [N, D] noised, normalised image embedding
        t: torch.Tensor,  # [N] timesteps
        *,
        text_embed: Optional[torch.Tensor] = None,  # [N, D] CLIP text embedding
        text_hidden: Optional[torch.Tensor] = None,  # [N, L, text_width] CLIP per-token states
        text_mask: Optional[torch.Tensor] = None,  # [N, L] bool, True = real token
        drop_text: Optional[torch.Tensor] = None,  # [N] bool, True = use the learned null caption
        # or, instead of text_embed/text_hidden/text_mask, what encode_caption returned for them:
        text_token: Optional[torch.Tensor] = None,
        caption_kv: Optional[torch.Tensor] = None,
        caption_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if text_token is None:
            if text_embed is None:
                raise ValueError("give text_embed (and text_hidden, text_mask), or encode_caption's tensors")
            encoded = self.encode_caption(text_embed, text_hidden, text_mask)
            text_token, caption_kv, caption_mask = encoded["text_token"], encoded["caption_kv"], encoded["caption_mask"]
        n, length = x_t.shape[0], caption_mask.shape[1]
        if text_token.shape[0] != n:
            raise ValueError(f"the caption has {text_token.shape[0]} rows for {n} samples")
        dropped = torch.zeros(n, dtype=torch.bool, device=x_t.device) if drop_text is None else drop_text

        text_token = torch.where(dropped[:, None], self.null_text_embed.to(x_t.dtype), text_token.to(x_t.dtype))
        fixed = torch.stack(
            [
                text_token,
                self.time_in(timestep_embedding(t, self.config.width).to(x_t.dtype)),
                self.image_in(x_t),
                self.query.to(x_t.dtype).expand(n, -1),
            ],
            dim=1,
        )  # [N, 4, W]
        fixed = fixed + self.positions[-_FIXED_TOKENS:]  # the sequence is aligned from the end

        # The fixed tokens follow every caption token (so see all of them, minus padding and dropped
        # captions) and attend causally among themselves.
        caption_visible = (caption_mask & ~dropped[:, None])[:, None, :].expand(n, _FIXED_TOKENS, length)
        causal = torch.ones(_FIXED_TOKENS, _FIXED_TOKENS, dtype=torch.bool, device=x_t.device).tril().expand(n, -1, -1)
        mask = torch.cat([caption_visible, causal], dim=2)[:, None]  # [N, 1, 4, L + 4]
        for index, block in enumerate(self.blocks):
            fixed = checkpointed(block, fixed, mask, caption_kv[:, index], enabled=self.config.activation_checkpointing)
        return self.out(self.norm(fixed[:, -1]))


class DiffusionPrior(nn.Module):
    """The prior users hold: network + diffusion process + embedding normalisation stats."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        self.net = PriorTransformer(config)
        # Saved in the bundle's stats file (not the weights): they come from data, not training.
        self.register_buffer("image_mean", torch.zeros(config.embed_dim), persistent=False)
        self.register_buffer("image_std", torch.ones(config.embed_dim), persistent=False)

    @functools.cached_property
    def diffusion(self) -> GaussianDiffusion:
        """The schedule, built on first use rather than in ``__init__``: it is process metadata on
        the CPU in float64, and deepspeed.zero.Init (dalle2.train.sharded) casts every float tensor
        made while a model is constructed to the training dtype (bf16 cannot count to 1000)."""
        with torch.device("cpu"):  # even for a model built on meta
            return GaussianDiffusion.from_config(self.config.diffusion)

    # --- embedding normalisation -------------------------------------------------------
    @torch.no_grad()
    def fit_embedding_stats(self, image_embeds: torch.Tensor) -> None:
        """Per-dimension mean/std of the training set's CLIP image embeddings [N, D]."""
        if image_embeds.shape[0] < 2:
            raise ValueError("need at least 2 image embeddings to estimate their statistics")
        self.image_mean.copy_(image_embeds.float().mean(0))
        self.image_std.copy_(image_embeds.float().std(0).clamp_min(1e-6))

    def embedding_stats(self) -> dict[str, torch.Tensor]:
        return {"image_mean": self.image_mean, "image_std": self.image_std}

    def load_embedding_stats(self, stats: dict[str, torch.Tensor]) -> None:
        for name in ("image_mean", "image_std"):
            if name not in stats:
                raise ValueError(f"prior stats lack {name!r}")
            getattr(self, name).copy_(stats[name])

    def normalize(self, image_embed: torch.Tensor) -> torch.Tensor:
        return (image_embed - self.image_mean) / self.image_std  # float32 stats: a float32 result

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.image_std + self.image_mean

    # --- training -------------------------------------------------------------------------
    def loss(
        self,
        image_embed: torch.Tensor,
        text_embed: torch.Tensor,
        text_hidden: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Mean MSE of the x0 prediction (DALL-E 2, eq. in section 2.2), caption dropped 10%."""
        n = image_embed.shape[0]
        source = generator.device if generator is not None else image_embed.device
        drop_text = torch.rand(n, generator=generator, device=source).to(image_embed.device) < self.config.text_drop_prob
        losses = self.diffusion.training_loss(
            self.net,
            self.normalize(image_embed.float()),  # the x0 target in float32, whatever the network's dtype
            generator=generator,
            input_dtype=next(self.net.parameters()).dtype,
            text_embed=text_embed,
            text_hidden=text_hidden,
            text_mask=text_mask,
            drop_text=drop_text,
        )
        return losses.mean()

    # --- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        text_embed: torch.Tensor,  # [N, D]
        text_hidden: Optional[torch.Tensor] = None,  # [N, L, W]
        text_mask: Optional[torch.Tensor] = None,  # [N, L]
        *,
        steps: Optional[int] = None,
        guidance_scale: float = 1.0,
        candidates: Optional[int] = None,
        sampler: Sampler = "ddim",
        generator: Optional[torch.Generator] = None,
        progress: Optional[Callable[[SampleStep], None]] = None,
    ) -> torch.Tensor:
        """CLIP image embeddings [N, D] for the captions, best of ``candidates`` each."""
        candidates = candidates or self.config.candidates
        n, dim = text_embed.shape

        def repeat(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if x is None else x.repeat_interleave(candidates, dim=0)

        model = self.net if guidance_scale == 1.0 else ClassifierFreeGuidance(self.net, guidance_scale, ("drop_text",))
        process = self.diffusion.respace(steps or self.config.diffusion.sample_steps)
        # The caption's part of the network, once per caption (not per step, not per candidate).
        caption = {name: repeat(value) for name, value in self.net.encode_caption(text_embed, text_hidden, text_mask).items()}
        x0 = process.sample(
            model,
            (n * candidates, dim),
            sampler=sampler,
            progress=progress,
            generator=generator,
            device=text_embed.device,
            **caption,
        )
        embeds = rearrange(self.denormalize(x0), "(n c) d -> n c d", c=candidates)
        # Paper: keep the candidate with the higher dot product with the text embedding
        # (both on the unit sphere, so CLIP's norms don't decide).
        scores = torch.einsum("ncd,nd->nc", F.normalize(embeds, dim=-1), F.normalize(text_embed, dim=-1))
        best = scores.argmax(dim=1)
        return embeds[torch.arange(n, device=embeds.device), best]
