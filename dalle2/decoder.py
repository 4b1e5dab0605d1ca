"""The decoder: a GLIDE-style diffusion UNet conditioned on a CLIP image embedding (DALL-E 2, sec. 2.1).

DALL-E 2 modifies GLIDE (Nichol et al. 2021) in two places, both implemented here:

1. the CLIP image embedding is projected and *added to the timestep embedding*;
2. it is projected into ``clip_tokens`` (paper: 4) extra context tokens, *concatenated to the
   output sequence of the GLIDE text encoder*; the UNet's attention layers attend over
   [context tokens; own spatial tokens].

The caption keeps GLIDE's role: its encoder's per-token outputs are context tokens and its pooled
output is added to the timestep embedding. For classifier-free guidance (Ho & Salimans 2022) the
paper drops the CLIP embedding 10% and the caption 50% of the time during training; a dropped
condition is replaced by *learned* null embeddings, chosen per sample by the boolean masks
``drop_image_embed`` / ``drop_text`` (True = use the null), which is what
:class:`dalle2.diffusion.ClassifierFreeGuidance` sets at sampling time.

Context tokens, in order: [clip tokens (4); null caption token (1); caption tokens (L)]. A sample
with its caption dropped (or no caption given) attends to the null caption token instead of its
caption tokens, and uses a learned null pooled caption vector.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle2.config import DecoderConfig
from dalle2.text_encoder import TextEncoder
from dalle2.unet import UNet

IMAGE_CHANNELS = 3
INPAINT_CHANNELS = 4  # masked image (3) + mask (1), as GLIDE's inpainting model


MASK_KINDS = ("nothing_known", "boxes", "strokes")  # drawn with equal probability per training image


def random_inpainting_masks(n: int, size: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """[N, 1, S, S] float masks for training an inpainting decoder, 1 = known pixel, 0 = to paint.

    GLIDE trains its inpainting model by erasing random regions of the training images and
    giving the model the rest with a mask channel (Nichol et al. 2021, sec. 4). Each image gets
    one of: nothing known (the whole image erased: the model stays a plain decoder, which is also
    what it is asked to be outside edits), 1-3 random boxes erased (what rectangular edit masks
    look like), or 1-4 random brush strokes erased (what painted masks look like). Drawn on CPU
    from ``generator``, so a seed gives the same masks on any device.
    """
    g = generator if generator is not None and generator.device.type == "cpu" else None
    masks = torch.ones(n, 1, size, size)
    kinds = torch.randint(0, len(MASK_KINDS), (n,), generator=g)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    for i, kind in enumerate(kinds.tolist()):
        if MASK_KINDS[kind] == "nothing_known":
            masks[i] = 0
        elif MASK_KINDS[kind] == "boxes":
            for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
                h, w = (torch.randint(size // 8 + 1, size // 2 + 1, (2,), generator=g)).tolist()
                top, left = int(torch.randint(0, size - h + 1, (1,), generator=g)), int(torch.randint(0, size - w + 1, (1,), generator=g))
                masks[i, 0, top : top + h, left : left + w] = 0
        else:  # strokes: thick segments between random points
            for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
                (y0, x0, y1, x1), radius = (torch.rand(4, generator=g) * size).tolist(), float(size) * (0.04 + 0.08 * float(torch.rand(1, generator=g)))
                dy, dx = y1 - y0, x1 - x0
                along = (((ys - y0) * dy + (xs - x0) * dx) / max(dy * dy + dx * dx, 1e-6)).clamp(0, 1)
                distance = ((ys - (y0 + along * dy)) ** 2 + (xs - (x0 + along * dx)) ** 2).sqrt()
                masks[i, 0][distance <= radius] = 0
    return masks


class Decoder(nn.Module):
    """``Decoder(x_t, t, image_embed=..., text_tokens=...)`` -> [N, 3, H, W] (eps, x0 or v, per
    ``config.diffusion.prediction``; the network does not care which)."""

    # The conditions ClassifierFreeGuidance should drop for the unconditional half of the batch.
    drop_keys = ("drop_image_embed", "drop_text")

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if config.embed_dim <= 0:
            raise ValueError("DecoderConfig.embed_dim must be set (the factory fills it from the CLIP preset)")
        self.config = config
        width = config.text.width
        in_channels = IMAGE_CHANNELS + (INPAINT_CHANNELS if config.inpainting else 0)
        self.text_encoder = TextEncoder(config.text, activation_checkpointing=config.unet.activation_checkpointing)
        self.unet = UNet(config.unet, config.image_size, in_channels, IMAGE_CHANNELS, context_width=width)
        emb_dim = self.unet.emb_dim
        self.image_embed_to_emb = nn.Linear(config.embed_dim, emb_dim)
        self.image_embed_to_tokens = nn.Linear(config.embed_dim, config.clip_tokens * width)
        self.text_to_emb = nn.Linear(width, emb_dim)  # GLIDE: pooled caption added to the timestep embedding
        # Learned nulls for classifier-free guidance. The image embedding is used on the sphere of
        # radius sqrt(D) (unit variance per dimension), so its null is drawn at that scale.
        self.null_image_embed = nn.Parameter(torch.randn(config.embed_dim))
        self.null_text_token = nn.Parameter(torch.randn(width) * 0.02)
        self.null_text_pooled = nn.Parameter(torch.randn(width) * 0.02)

    def random_drop_masks(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Training-time guidance drops [N] bool each: (image embed at ``image_embed_drop_prob``,
        caption at ``text_drop_prob``); paper: 10% and 50%, drawn independently."""
        device = self.null_image_embed.device
        source = generator.device if generator is not None else device
        draws = torch.rand(2, n, generator=generator, device=source).to(device)
        return draws[0] < self.config.image_embed_drop_prob, draws[1] < self.config.text_drop_prob

    def _drop_mask(self, mask: Optional[Tensor], n: int, device: torch.device) -> Tensor:
        if mask is None:
            return torch.zeros(n, dtype=torch.bool, device=device)
        if mask.shape != (n,):
            raise ValueError(f"drop masks must have shape [{n}], got {tuple(mask.shape)}")
        return mask.to(device=device, dtype=torch.bool)

    def _inpaint_channels(self, x_t: Tensor, image: Optional[Tensor], mask: Optional[Tensor]) -> Optional[Tensor]:
        """[N, 4, H, W] = [image * mask, mask], mask 1 = known pixel; None for a plain decoder."""
        if not self.config.inpainting:
            if image is not None or mask is not None:
                raise ValueError("this decoder has no inpainting channels (config.inpainting is false)")
            return None
        n, _, height, width = x_t.shape
        if image is None and mask is None:  # nothing known: the inpainting decoder as a plain decoder
            return x_t.new_zeros(n, INPAINT_CHANNELS, height, width)
        if image is None or mask is None:
            raise ValueError("inpainting needs both inpaint_image and inpaint_mask")
        if image.shape != x_t.shape or mask.shape != (n, 1, height, width):
            raise ValueError(
                f"inpaint_image must be {tuple(x_t.shape)} and inpaint_mask {(n, 1, height, width)}; "
                f"got {tuple(image.shape)} and {tuple(mask.shape)}"
            )
        mask = mask.to(x_t.dtype)
        return torch.cat([image.to(x_t.dtype) * mask, mask], dim=1)

    def encode_conditions(self, image_embed: Tensor, text_tokens: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Everything of the forward that depends on the CLIP embedding and the caption alone: the
        caption encoder's run and the projections of the embedding. Sampling calls it once per
        request and passes its tensors to every step instead of ``image_embed``/``text_tokens``.

        Returns ``context`` [N, 4 + 1 + L, W] (CLIP tokens, the null caption token, caption tokens),
        ``context_mask`` [N, 4 + 1 + L] (the null caption token is attended only without a caption),
        ``image_emb`` and ``caption_emb`` [N, emb_dim] (the projections added to the timestep
        embedding). Guidance's drops are applied in :meth:`forward`, so one encoding serves both halves."""
        n, dtype = image_embed.shape[0], self.null_image_embed.dtype
        device = self.null_image_embed.device
        if image_embed.shape != (n, self.config.embed_dim):
            raise ValueError(f"image_embed must be [{n}, {self.config.embed_dim}], got {tuple(image_embed.shape)}")
        # CLIP image embedding: on the sphere of radius sqrt(D) (CLIP embeddings compare by cosine).
        embed = F.normalize(image_embed.to(device, dtype), dim=-1) * math.sqrt(self.config.embed_dim)
        clip_tokens = self.image_embed_to_tokens(embed).reshape(n, self.config.clip_tokens, -1)  # [N, 4, W]
        # Caption: per-token outputs + pooled output (GLIDE), or nothing.
        width = self.config.text.width
        if text_tokens is None:
            caption, caption_mask = embed.new_zeros(n, 0, width), torch.zeros(n, 0, dtype=torch.bool, device=device)
            caption_emb = self.text_to_emb(self.null_text_pooled.to(dtype)).expand(n, -1)
        else:
            if text_tokens.ndim != 2 or text_tokens.shape[0] != n:
                raise ValueError(f"text_tokens must be [{n}, L], got {tuple(text_tokens.shape)}")
            encoding = self.text_encoder(text_tokens.to(device))
            caption, caption_mask, caption_emb = encoding.sequence, encoding.mask, self.text_to_emb(encoding.pooled)
        null_token = self.null_text_token.to(dtype).expand(n, 1, width)
        no_caption = torch.full((n, 1), text_tokens is None, dtype=torch.bool, device=device)
        clip_visible = torch.ones(n, self.config.clip_tokens, dtype=torch.bool, device=device)
        return {
            "context": torch.cat([clip_tokens, null_token, caption.to(dtype)], dim=1),
            "context_mask": torch.cat([clip_visible, no_caption, caption_mask], dim=1),
            "image_emb": self.image_embed_to_emb(embed),
            "caption_emb": caption_emb,
        }

    def forward(
        self,
        x_t: Tensor,  # [N, 3, H, W] noised image
        t: Tensor,  # [N] timesteps (long)
        *,
        image_embed: Optional[Tensor] = None,  # [N, embed_dim] CLIP image embedding (any norm: its direction is used)
        text_tokens: Optional[Tensor] = None,  # [N, L] open_clip BPE ids, 0 = padding; None = no caption
        drop_image_embed: Optional[Tensor] = None,  # [N] bool, True = learned null image embedding
        drop_text: Optional[Tensor] = None,  # [N] bool, True = learned null caption
        inpaint_image: Optional[Tensor] = None,  # [N, 3, H, W] image whose known pixels to keep
        inpaint_mask: Optional[Tensor] = None,  # [N, 1, H, W] 1 = known pixel, 0 = to fill
        # or, instead of image_embed and text_tokens, what encode_conditions returned for them:
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        image_emb: Optional[Tensor] = None,
        caption_emb: Optional[Tensor] = None,
    ) -> Tensor:
        n, device, dtype = x_t.shape[0], x_t.device, x_t.dtype
        if context is None:
            if image_embed is None:
                raise ValueError("give image_embed (and text_tokens), or encode_conditions' tensors")
            encoded = self.encode_conditions(image_embed, text_tokens)
            context, context_mask, image_emb, caption_emb = (encoded[k] for k in ("context", "context_mask", "image_emb", "caption_emb"))
        elif image_embed is not None or text_tokens is not None:
            raise ValueError("give image_embed/text_tokens or encode_conditions' tensors, not both")
        if context.shape[0] != n:
            raise ValueError(f"the conditions have {context.shape[0]} rows for {n} samples")
        drop_image = self._drop_mask(drop_image_embed, n, device)
        drop_caption = self._drop_mask(drop_text, n, device)

        # Dropped conditions become the learned nulls, projected as the real ones were.
        k = self.config.clip_tokens
        null_embed = self.null_image_embed.to(dtype)[None]  # [1, D]
        null_tokens = self.image_embed_to_tokens(null_embed).reshape(1, k, -1)
        clip_tokens = torch.where(drop_image[:, None, None], null_tokens, context[:, :k].to(dtype))
        image_emb = torch.where(drop_image[:, None], self.image_embed_to_emb(null_embed), image_emb.to(dtype))
        drop_caption = drop_caption | context_mask[:, k]  # no caption given: the null caption
        caption_emb = torch.where(drop_caption[:, None], self.text_to_emb(self.null_text_pooled.to(dtype)), caption_emb.to(dtype))
        context = torch.cat([clip_tokens, context[:, k:].to(dtype)], dim=1)
        context_mask = torch.cat([context_mask[:, :k], drop_caption[:, None], context_mask[:, k + 1 :] & ~drop_caption[:, None]], dim=1)

        extra_emb = image_emb + caption_emb  # [N, emb_dim]
        inpaint = self._inpaint_channels(x_t, inpaint_image, inpaint_mask)
        x = x_t if inpaint is None else torch.cat([x_t, inpaint], dim=1)
        return self.unet(x, t, extra_emb=extra_emb, context=context, context_mask=context_mask)
