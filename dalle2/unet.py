"""The convolutional trunk shared by the decoder and the upsamplers.

The ablated diffusion UNet of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs") as GLIDE
(Nichol et al. 2021) uses it: residual blocks whose GroupNorm is modulated by the timestep
embedding (scale-shift, "AdaGN"), BigGAN-style residual down/up sampling, and self-attention
at chosen feature-map sizes whose keys and values also include a sequence of context tokens
(GLIDE: the caption encoder's output; DALL-E 2 adds 4 tokens projected from the CLIP image
embedding). The network never knows about noise schedules: it maps (x, t, conditions) to an
output of the same spatial size.

Every dtype follows the input (no hard-coded float32 outside the sinusoidal frequencies), so the
module runs in fp32 on CPU and in bf16 (autocast or ``.to(torch.bfloat16)``) on GPU unchanged;
attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels).
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dalle2.config import UNetConfig
from dalle2.layers import checkpointed, timestep_embedding

Resample = Literal["none", "up", "down"]
NORM_GROUPS = 32  # improved-diffusion's GroupNorm32


def group_norm(channels: int) -> nn.GroupNorm:
    # The largest group count <= 32 dividing the channels, so that tiny widths (e.g. 48) still work.
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: residual branches start as the identity (improved-diffusion)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _resample(x: Tensor, resample: Resample) -> Tensor:
    if resample == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if resample == "down":
        return F.avg_pool2d(x, kernel_size=2)
    return x


def pixel_coordinates(x: Tensor) -> Tensor:
    """[N, 2, H, W]: each pixel's (y, x) position in [-1, 1], in x's dtype and device."""
    n, _, height, width = x.shape
    ys = torch.linspace(-1.0, 1.0, height, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # [2, H, W]
    return grid.expand(n, -1, -1, -1)


@functools.lru_cache(maxsize=64)  # a constant per block shape: built once, not at every forward of every step
def sincos_positions(channels: int, height: int, width: int, device, dtype) -> Tensor:
    """[channels, H, W] fixed 2D position code (as ViT/MAE's 2D sin-cos embedding): a quarter of the
    channels each for sin/cos of y and of x in [-1, 1], at frequencies from one cycle over the
    image up to the feature map's Nyquist rate; channels beyond a multiple of 4 are zero.
    Shared between calls: never modify it in place."""
    per = channels // 4
    code = torch.zeros(channels, height, width, device=device, dtype=torch.float32)
    if per == 0:
        return code.to(dtype)
    top = max(height, width) / 2
    freqs = math.pi * torch.logspace(0.0, math.log10(max(top, 1.0)), per, device=device)  # [per]
    ys = torch.linspace(-1.0, 1.0, height, device=device)[None, :, None] * freqs[:, None, None]  # [per, H, 1]
    xs = torch.linspace(-1.0, 1.0, width, device=device)[None, None, :] * freqs[:, None, None]  # [per, 1, W]
    code[0 * per : 1 * per] = ys.sin().expand(-1, height, width)
    code[1 * per : 2 * per] = ys.cos().expand(-1, height, width)
    code[2 * per : 3 * per] = xs.sin().expand(-1, height, width)
    code[3 * per : 4 * per] = xs.cos().expand(-1, height, width)
    return code.to(dtype)


class ResBlock(nn.Module):
    """Residual block with timestep scale-shift conditioning (Dhariwal & Nichol 2021, sec. 3):
    h = conv(SiLU(GroupNorm(h) * (1 + scale) + shift)), where (scale, shift) = Linear(emb).
    ``resample`` makes it a BigGAN-style up/down sampling block (both branches resampled)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, resample: Resample = "none"):
        super().__init__()
        self.resample = resample
        self.in_norm = group_norm(in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)
        self.out_norm = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # x: [N, C_in, H, W], emb: [N, E] (already passed through SiLU by the caller) -> [N, C_out, H', W']
        h = _resample(F.silu(self.in_norm(x)), self.resample)
        h = self.in_conv(h)
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(_resample(x, self.resample)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions whose keys/values are extended with
    projected context tokens (GLIDE's ``encoder_kv``): each position attends over
    [context tokens; own spatial tokens]."""

    def __init__(self, channels: int, head_channels: int, context_width: Optional[int], positions: bool = False):
        super().__init__()
        self.positions = positions
        if channels % head_channels:
            raise ValueError(f"{channels} channels are not divisible into heads of {head_channels}")
        self.heads = channels // head_channels
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.context_kv = nn.Linear(context_width, 2 * channels) if context_width else None
        self.out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, context: Optional[Tensor] = None, context_mask: Optional[Tensor] = None) -> Tensor:
        # x: [N, C, H, W]; context: [N, S, context_width]; context_mask: [N, S] bool, True = attend
        n, c, height, width = x.shape
        h = self.norm(x)
        if self.positions:
            h = h + sincos_positions(c, height, width, x.device, h.dtype)
        q, k, v = rearrange(self.qkv(h), "n (three h d) y x -> three n h (y x) d", three=3, h=self.heads)
        mask = None
        if self.context_kv is not None and context is not None:
            context_k, context_v = rearrange(self.context_kv(context), "n s (two h d) -> two n h s d", two=2, h=self.heads)
            k = torch.cat([context_k.to(k.dtype), k], dim=2)
            v = torch.cat([context_v.to(v.dtype), v], dim=2)
            if context_mask is not None:
                # Spatial keys are always visible, so no query row is ever fully masked.
                visible = torch.ones(n, height * width, dtype=torch.bool, device=x.device)
                mask = torch.cat([context_mask.to(torch.bool), visible], dim=1)[:, None, None, :]  # [N, 1, 1, S + HW]
        # Contiguous q/k/v: the rearranged views are strided by H*W in d, which sends the CPU to
        # SDPA's slow math path (it was ~60-70% of a decoder step; 2.2x faster per forward).
        y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask)
        return x + self.out(rearrange(y, "n h (y x) d -> n (h d) y x", y=height, x=width))


class _Stage(nn.Module):
    """A ResBlock optionally followed by attention: one entry of the UNet's block lists."""

    def __init__(self, res: ResBlock, attention: Optional[AttentionBlock]):
        super().__init__()
        self.res = res
        self.attention = attention

    def forward(self, x: Tensor, emb: Tensor, context: Optional[Tensor], context_mask: Optional[Tensor]) -> Tensor:
        x = self.res(x, emb)
        return x if self.attention is None else self.attention(x, context, context_mask)


class UNet(nn.Module):
    """UNet(x [N, in, H, W], t [N]) -> [N, out, H, W], any H, W divisible by 2^(levels - 1).

    ``image_size`` is the resolution the attention sizes refer to (``config.attention_resolutions``
    lists feature-map sizes, as GLIDE's "32,16,8" for a 64x64 model); the convolutions work at any
    size, which is what lets the upsamplers train on crops. Conditioning enters in two ways:
    ``extra_emb`` [N, emb_dim] is added to the timestep embedding, and ``context`` tokens
    [N, S, context_width] extend the attention keys/values. A middle attention block exists only
    when the config asks for attention at all (DALL-E 2's upsamplers have none).
    """

    def __init__(self, config: UNetConfig, image_size: int, in_channels: int, out_channels: int, context_width: Optional[int] = None):
        super().__init__()
        self.config = config
        self.levels = len(config.channel_mults)
        ch = config.channels
        self.emb_dim = 4 * ch  # improved-diffusion: time embedding width = 4 x base channels
        self.time_mlp = nn.Sequential(nn.Linear(ch, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim))

        def stage(c_in: int, c_out: int, resolution: int, resample: Resample = "none") -> _Stage:
            res = ResBlock(c_in, c_out, self.emb_dim, config.dropout, resample)
            attend = resample == "none" and resolution in config.attention_resolutions
            return _Stage(res, AttentionBlock(c_out, config.head_channels, context_width, config.attention_positions) if attend else None)

        self.input_conv = nn.Conv2d(in_channels + (2 if config.coordinates else 0), ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch]  # channels of every activation the decoder half will concatenate
        resolution, c = image_size, ch
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.res_blocks):
                self.down.append(stage(c, mult * ch, resolution))
                c = mult * ch
                skips.append(c)
            if level < self.levels - 1:
                self.down.append(stage(c, c, resolution, "down"))
                resolution //= 2
                skips.append(c)

        middle_attention = AttentionBlock(c, config.head_channels, context_width, config.attention_positions) if config.attention_resolutions else None
        self.middle = nn.ModuleList([_Stage(ResBlock(c, c, self.emb_dim, config.dropout), middle_attention),
                                     _Stage(ResBlock(c, c, self.emb_dim, config.dropout), None)])

        self.up = nn.ModuleList()
        self.up_takes_skip: list[bool] = []
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            for _ in range(config.res_blocks + 1):
                self.up.append(stage(c + skips.pop(), mult * ch, resolution))
                self.up_takes_skip.append(True)
                c = mult * ch
            if level > 0:
                self.up.append(stage(c, c, resolution, "up"))
                self.up_takes_skip.append(False)
                resolution *= 2

        self.output = nn.Sequential(group_norm(c), nn.SiLU(), zero_module(nn.Conv2d(c, out_channels, 3, padding=1)))

    def forward(
        self,
        x: Tensor,  # [N, in_channels, H, W]
        t: Tensor,  # [N] timesteps
        extra_emb: Optional[Tensor] = None,  # [N, emb_dim] added to the timestep embedding
        context: Optional[Tensor] = None,  # [N, S, context_width] tokens the attention layers also attend to
        context_mask: Optional[Tensor] = None,  # [N, S] bool, True = attend
    ) -> Tensor:
        multiple = 2 ** (self.levels - 1)
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"UNet input {tuple(x.shape[-2:])} must be divisible by {multiple} ({self.levels} levels)")
        emb = self.time_mlp(timestep_embedding(t, self.config.channels).to(x.dtype))
        if extra_emb is not None:
            emb = emb + extra_emb
        emb = F.silu(emb)  # every ResBlock's projection starts with SiLU (improved-diffusion emb_layers)
        if self.config.coordinates:
            x = torch.cat([x, pixel_coordinates(x)], dim=1)
        h = self.input_conv(x)
        skips = [h]
        recompute = self.config.activation_checkpointing
        for block in self.down:
            h = checkpointed(block, h, emb, context, context_mask, enabled=recompute)
            skips.append(h)
        for block in self.middle:
            h = checkpointed(block, h, emb, context, context_mask, enabled=recompute)
        for block, takes_skip in zip(self.up, self.up_takes_skip):
            if takes_skip:
                skip = skips.pop()
                h = torch.cat([h, skip.to(h.dtype)], dim=1)
            h = checkpointed(block, h, emb, context, context_mask, enabled=recompute)
        return self.output(h)
