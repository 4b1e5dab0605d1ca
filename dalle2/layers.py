"""Layers shared by several networks: timestep embeddings and the pre-LayerNorm Transformer
block (the prior and the decoder's text encoder)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from typing import Optional

from einops import rearrange
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps [N] -> [N, dim] float32 (Vaswani et al. 2017; DDPM appendix B)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([angles.cos(), angles.sin()], dim=-1), (0, dim % 2))


def checkpointed(module: nn.Module, *args: Any, enabled: bool) -> Any:
    """``module(*args)``, recomputed in the backward pass instead of keeping its activations when
    ``enabled`` and the module trains with grad on (activation checkpointing, Chen et al. 2016:
    memory of one block's activations per block boundary, for one extra forward). Non-reentrant
    (``use_reentrant=False``): works with inputs that need no grad, keyword-free modules, and
    DeepSpeed ZeRO-3, whose parameter-gathering hooks run again around the recomputation."""
    if enabled and module.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash / memory-efficient
    kernels on GPU, in whatever dtype the inputs have)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def keys_values(self, x: Tensor) -> Tensor:
        """[N, 2, heads, S, d]: the keys and values of tokens x [N, S, W], to pass later as ``past``."""
        _, k, v = rearrange(self.qkv(x), "n s (three h d) -> three n h s d", three=3, h=self.heads)
        return torch.stack([k, v], dim=1)

    def forward(self, x: Tensor, mask: Tensor, past: Optional[Tensor] = None) -> Tensor:
        # x: [N, S, W]; past: [N, 2, heads, P, d] keys/values of P earlier tokens (a KV cache), which
        # come first among the keys; mask: bool, broadcastable to [N, heads, S, P + S], True = may attend
        q, k, v = rearrange(self.qkv(x), "n s (three h d) -> three n h s d", three=3, h=self.heads)
        if past is not None:
            k, v = torch.cat([past[:, 0].to(k.dtype), k], dim=2), torch.cat([past[:, 1].to(v.dtype), v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(rearrange(y, "n h s d -> n s (h d)"))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block (GPT-2; GLIDE's ``ResidualAttentionBlock``)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, mask: Tensor, past: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, past)
        return x + self.mlp(self.norm2(x))
