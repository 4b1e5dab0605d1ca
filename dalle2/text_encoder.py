"""GLIDE's caption encoder: a Transformer over the caption's BPE tokens (Nichol et al. 2021, sec. 4).

The decoder does not reuse CLIP's text tower: like GLIDE it learns its own encoder, whose
per-token outputs become context tokens for the UNet's attention layers and whose pooled output
is added to the timestep embedding. Tokens are open_clip BPE ids [N, L] with 0 = padding; the
pooled output is read at the last real token (open_clip's end-of-text token).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from dalle2.config import TextEncoderConfig
from dalle2.layers import Block, checkpointed

PAD_TOKEN = 0  # open_clip pads captions with 0


class TextEncoding(NamedTuple):
    sequence: Tensor  # [N, L, width] per-token outputs (after the final LayerNorm)
    pooled: Tensor  # [N, width] output at the last real token
    mask: Tensor  # [N, L] bool, True = real token (padding is False)


class TextEncoder(nn.Module):
    """Bidirectional Transformer over caption tokens [N, L] (L <= context_length) -> :class:`TextEncoding`.

    With ``config.token_embed_width`` smaller than the width, the token embedding is factorized
    (vocab -> token_embed_width -> width, as ALBERT does) so that the 49k-token vocabulary does not
    dominate a tiny model.
    """

    def __init__(self, config: TextEncoderConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing  # the decoder passes its UNet's flag
        embed_width = config.token_embed_width or config.width
        self.token_embedding = nn.Embedding(config.vocab_size, embed_width)
        self.token_proj = nn.Linear(embed_width, config.width, bias=False) if embed_width != config.width else nn.Identity()
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.blocks = nn.ModuleList(Block(config.width, config.heads) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: Tensor) -> TextEncoding:
        n, length = tokens.shape
        if length > self.config.context_length:
            raise ValueError(f"{length} caption tokens exceed the text encoder's context_length {self.config.context_length}")
        if length == 0:
            raise ValueError("text_tokens has no positions; pass text_tokens=None (or drop_text) for no caption")
        mask = tokens != PAD_TOKEN
        # A caption of only padding would leave its queries nothing to attend to (NaN): let every
        # caption see its first position.
        key_mask = mask.clone()
        key_mask[:, 0] = True
        x = self.token_proj(self.token_embedding(tokens)) + self.positional_embedding[:length]
        for block in self.blocks:
            x = checkpointed(block, x, key_mask[:, None, None, :], enabled=self.activation_checkpointing)
        x = self.final_norm(x)
        # Last real token: open_clip ends every caption with <end_of_text> before the padding.
        positions = torch.arange(length, device=tokens.device)
        last = torch.where(key_mask, positions, 0).argmax(dim=1)  # [N]
        pooled = x[torch.arange(n, device=tokens.device), last]
        return TextEncoding(sequence=x, pooled=pooled, mask=mask)
