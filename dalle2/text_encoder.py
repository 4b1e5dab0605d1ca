"""GLIDE's caption encoder: a Transformer over the caption's BPE tokens (Nichol et al. 2021, sec. 4).

The decoder does not reuse CLIP's text tower: like GLIDE it learns its own encoder, whose
per-token outputs become context tokens for the UNet's attention layers and whose pooled output
is added to the timestep embedding. Tokens are open_clip BPE ids [N, L], 0-padded after the
end-of-text token; the pooled output is read at the end-of-text token. Id 0 is also a real token
("!"), so which positions are real is told by :func:`caption_mask`, not by the id.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from dalle2.config import TextEncoderConfig
from dalle2.layers import Block, checkpointed



def caption_mask(tokens: Tensor) -> Tensor:
    """[N, L] bool, True from the start of each caption through its end-of-text token.

    open_clip pads with id 0, but 0 is also the BPE id of "!": ``tokens != 0`` would hide every
    "!" of a caption. The end-of-text token has the largest id of the vocabulary and ends every
    caption (``tokenize`` keeps it when it truncates), so the first position holding the row's
    largest id is where the caption ends. A row of only padding keeps its first position.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    end = tokens.argmax(dim=1)  # [N]: the first occurrence of the row's largest id
    return positions[None, :] <= end[:, None]


class TextEncoding(NamedTuple):
    sequence: Tensor  # [N, L, width] per-token outputs (after the final LayerNorm)
    pooled: Tensor  # [N, width] output at the last real token
    mask: Tensor  # [N, L] bool, True = real token through end-of-text (caption_mask)


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
        mask = caption_mask(tokens)  # a caption of only padding keeps its first position: never a fully masked row
        key_mask = mask
        x = self.token_proj(self.token_embedding(tokens)) + self.positional_embedding[:length]
        for block in self.blocks:
            x = checkpointed(block, x, key_mask[:, None, None, :], enabled=self.activation_checkpointing)
        x = self.final_norm(x)
        last = tokens.argmax(dim=1)  # [N] the end-of-text token (caption_mask)
        pooled = x[torch.arange(n, device=tokens.device), last]
        return TextEncoding(sequence=x, pooled=pooled, mask=mask)
