"""Diffusion upsamplers 64->256 and 256->1024 and their training-time input augmentations (DALL-E 2, sec. 2.1).

An upsampler is a UNet without attention and without text that sees the noised high-resolution
image next to its low-resolution conditioning, resized to the same size (GLIDE / SR3). Because it
is fully convolutional it trains on random crops (paper: a quarter of the target size) and samples
at full size. To be robust to the artifacts of the stage before it, the low-resolution image is
corrupted during training (conditioning augmentation, Ho et al. 2021 "Cascaded Diffusion Models"):
a Gaussian blur for 64->256, a BSR-like degradation (Zhang et al. 2021, BSRGAN) for 256->1024.

Images are in [-1, 1]. All randomness goes through an optional ``torch.Generator``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle2.config import Degradation, UpsamplerConfig
from dalle2.unet import UNet

IMAGE_CHANNELS = 3

# Gaussian-blur augmentation (Cascaded Diffusion Models, appendix: sigma ~ U(0.4, 0.6)).
BLUR_SIGMA = (0.4, 0.6)
# BSR-like degradation, ranges scaled down from BSRGAN's for the milder task of 4x upsampling.
BSR_BLUR_SIGMA = (0.2, 1.5)
BSR_RESIZE_SCALE = (0.5, 1.0)  # down-resize by this factor, then back to the original size
BSR_NOISE_STD = (1 / 255, 20 / 255)  # in [0, 1] units (doubled for [-1, 1] images)
BSR_JPEG_QUALITY = (30.0, 95.0)
RESIZE_MODES = ("bilinear", "bicubic", "area")


class Upsampler(nn.Module):
    """``Upsampler(x_t, t, low_res=...)`` -> [N, 3, H, W]; works at any size whose ratio to
    ``low_res``'s size is ``config.image_size / config.low_res`` (full images or crops)."""

    def __init__(self, config: UpsamplerConfig):
        super().__init__()
        if config.image_size % config.low_res:
            raise ValueError(f"image_size {config.image_size} must be a multiple of low_res {config.low_res}")
        self.config = config
        # Input: the noised image and the upsampled conditioning, stacked on channels.
        self.unet = UNet(config.unet, config.image_size, 2 * IMAGE_CHANNELS, IMAGE_CHANNELS)

    @property
    def scale(self) -> int:
        return self.config.image_size // self.config.low_res

    def forward(self, x_t: Tensor, t: Tensor, *, low_res: Tensor) -> Tensor:
        # x_t: [N, 3, H, W]; low_res: [N, 3, H / scale, W / scale] (augmented during training)
        height, width = x_t.shape[-2:]
        if low_res.shape[0] != x_t.shape[0] or tuple(low_res.shape[-2:]) != (height // self.scale, width // self.scale):
            raise ValueError(
                f"low_res must be [{x_t.shape[0]}, 3, {height // self.scale}, {width // self.scale}] "
                f"for x_t of {tuple(x_t.shape)} (scale {self.scale}), got {tuple(low_res.shape)}"
            )
        upsampled = F.interpolate(low_res.to(x_t.dtype), size=(height, width), mode="bilinear", align_corners=False)
        return self.unet(torch.cat([x_t, upsampled], dim=1), t)


# -- crops ------------------------------------------------------------------------------------------


def downsample(images: Tensor, size: int) -> Tensor:
    """[N, C, H, W] -> [N, C, size, size] by area averaging (exact box filter for integer factors),
    which keeps every low-res pixel aligned with its block of high-res pixels."""
    return F.interpolate(images, size=(size, size), mode="area")


def low_res_projection(low_res: Tensor) -> Callable[[Tensor], Tensor]:
    """A sampler's ``project_x0`` that keeps the upsampled image consistent with ``low_res`` (y):
    x0 -> A+ y + (I - A+ A) x0 = x0 + A+(y - A x0), the range-null space decomposition of DDNM
    (Wang et al. 2023, sec. 3), with A = :func:`downsample` (a box filter) and A+ its
    pseudo-inverse, pixel replication. A A+ = I, so A of the result is exactly y.

    The upsampler then decides only what y leaves open (detail inside each low-res pixel's block);
    colors and layout come from the image it was given. An upsampler trained for minutes on a CPU
    otherwise shifts them (backgrounds drift toward gray, orange turns red).
    """

    def project(x0: Tensor) -> Tensor:
        error = low_res.to(x0.dtype) - downsample(x0, low_res.shape[-1])
        return x0 + F.interpolate(error, size=x0.shape[-2:], mode="nearest")

    return project


def random_crop_pair(
    high_res: Tensor, low_res: Tensor, crop_fraction: float, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor]:
    """Aligned random crops of a target [N, C, H, W] and its conditioning [N, C, H/s, W/s].

    Each sample gets its own crop of side ``crop_fraction`` x the size (paper: 0.25 of the target's
    side); offsets are drawn on the low-res grid and multiplied by the scale s, so the low-res crop
    is exactly the conditioning of the high-res crop. Returns ([N, C, h*s, w*s], [N, C, h, w]).
    """
    n, _, height, width = high_res.shape
    low_height, low_width = low_res.shape[-2:]
    if low_res.shape[0] != n or height % low_height or width % low_width or height // low_height != width // low_width:
        raise ValueError(f"low_res {tuple(low_res.shape)} is not an integer downscaling of high_res {tuple(high_res.shape)}")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    scale = height // low_height
    crop_h, crop_w = max(1, round(low_height * crop_fraction)), max(1, round(low_width * crop_fraction))
    source = generator.device if generator is not None else torch.device("cpu")
    tops = torch.randint(0, low_height - crop_h + 1, (n,), generator=generator, device=source).tolist()
    lefts = torch.randint(0, low_width - crop_w + 1, (n,), generator=generator, device=source).tolist()
    low_crops = [low_res[i, :, y : y + crop_h, x : x + crop_w] for i, (y, x) in enumerate(zip(tops, lefts))]
    high_crops = [
        high_res[i, :, y * scale : (y + crop_h) * scale, x * scale : (x + crop_w) * scale] for i, (y, x) in enumerate(zip(tops, lefts))
    ]
    return torch.stack(high_crops), torch.stack(low_crops)


# -- conditioning augmentation -----------------------------------------------------------------------


def _uniform(n: int, bounds: tuple[float, float], generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """[N] float32 draws from U(bounds) on ``device``, drawn on the generator's device."""
    source = generator.device if generator is not None else device
    low, high = bounds
    return (low + (high - low) * torch.rand(n, generator=generator, device=source)).to(device)


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image [N, C, H, W] with its own sigma [N] (separable kernel, replicate padding)."""
    n, c, height, width = images.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.float()[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(images.dtype)  # [N, K]
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (sample, channel) group
    x = images.reshape(1, n * c, height, width)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * c)
    return x.reshape(n, c, height, width)


# JPEG (ITU T.81 Annex K) quantization tables for luminance and chrominance.
_JPEG_LUMA = [
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
]  # fmt: skip
_JPEG_CHROMA = [[17, 18, 24, 47] + [99] * 4, [18, 21, 26, 66] + [99] * 4, [24, 26, 56] + [99] * 5, [47, 66] + [99] * 6] + [[99] * 8] * 4
# ITU-R BT.601 RGB -> YCbCr (rows: Y, Cb, Cr), as JPEG/JFIF uses.
_RGB_TO_YCBCR = [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]


def _dct_matrix(size: int = 8) -> Tensor:
    """Orthonormal DCT-II matrix [size, size]: coefficients = D @ block @ D.T."""
    k = torch.arange(size, dtype=torch.float64)[:, None]
    i = torch.arange(size, dtype=torch.float64)[None]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * size)) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix


def jpeg_compress(images: Tensor, quality: Tensor) -> Tensor:
    """Simulated JPEG round trip of [N, 3, H, W] images in [-1, 1] at per-sample quality [N] (1..100):
    YCbCr, 4:2:0 chroma subsampling, 8x8 DCT, quantization with the IJG-scaled standard tables."""
    n, _, height, width = images.shape
    compute = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype  # rounding needs precision
    x = (images.to(compute) + 1) * 127.5  # [0, 255]
    ycbcr = torch.einsum("oc,nchw->nohw", torch.tensor(_RGB_TO_YCBCR, dtype=compute, device=images.device), x)
    ycbcr[:, 1:] += 128
    pad_h, pad_w = -height % 16, -width % 16  # whole 8x8 blocks after 2x chroma subsampling
    ycbcr = F.pad(ycbcr, (0, pad_w, 0, pad_h), mode="replicate")
    q = quality.to(device=images.device, dtype=compute).clamp(1, 100)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)[:, None, None]  # IJG quality scaling, [N, 1, 1]
    dct = _dct_matrix().to(device=images.device, dtype=compute)
    planes = []
    for channel, table in ((0, _JPEG_LUMA), (1, _JPEG_CHROMA), (2, _JPEG_CHROMA)):
        plane = ycbcr[:, channel : channel + 1]
        if channel:  # chroma at half resolution
            plane = F.avg_pool2d(plane, 2)
        steps = ((torch.tensor(table, dtype=compute, device=images.device) * scale + 50) / 100).floor().clamp(min=1)
        h, w = plane.shape[-2:]
        blocks = plane.reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4) - 128  # [N, bh, bw, 8, 8]
        coefficients = dct @ blocks @ dct.T
        steps = steps[:, None, None]  # [N, 1, 1, 8, 8]
        blocks = dct.T @ (torch.round(coefficients / steps) * steps) @ dct + 128
        plane = blocks.permute(0, 1, 3, 2, 4).reshape(n, 1, h, w)
        if channel:
            plane = F.interpolate(plane, scale_factor=2.0, mode="nearest")
        planes.append(plane)
    ycbcr = torch.cat(planes, dim=1)[:, :, :height, :width]
    ycbcr[:, 1:] -= 128
    rgb = torch.einsum("oc,nchw->nohw", torch.linalg.inv(torch.tensor(_RGB_TO_YCBCR, dtype=torch.float64)).to(ycbcr), ycbcr)
    return (rgb / 127.5 - 1).clamp(-1, 1).to(images.dtype)


def _bsr_degrade(images: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """BSR-like degradation (Zhang et al. 2021): blur, down-resize and Gaussian noise in a random
    order, then JPEG. Blur, noise and quality are per sample; the order and resize per batch."""
    n, _, height, width = images.shape
    device = images.device
    source = generator.device if generator is not None else device

    def blur(x: Tensor) -> Tensor:
        return gaussian_blur(x, _uniform(n, BSR_BLUR_SIGMA, generator, device))

    def resize(x: Tensor) -> Tensor:
        factor = float(_uniform(1, BSR_RESIZE_SCALE, generator, device))
        small = (max(1, round(height * factor)), max(1, round(width * factor)))
        mode = RESIZE_MODES[int(torch.randint(len(RESIZE_MODES), (1,), generator=generator, device=source))]
        shrunk = F.interpolate(x, size=small, mode=mode, **({} if mode == "area" else {"align_corners": False}))
        return F.interpolate(shrunk, size=(height, width), mode="bilinear", align_corners=False)

    def noise(x: Tensor) -> Tensor:
        std = 2 * _uniform(n, BSR_NOISE_STD, generator, device).to(x.dtype)[:, None, None, None]
        return x + std * torch.randn(x.shape, generator=generator, device=source).to(device=device, dtype=x.dtype)

    operations = [blur, resize, noise]
    x = images
    for index in torch.randperm(len(operations), generator=generator, device=source).tolist():
        x = operations[index](x).clamp(-1, 1)
    return jpeg_compress(x, _uniform(n, BSR_JPEG_QUALITY, generator, device))


def degrade(low_res: Tensor, degradation: Degradation, generator: Optional[torch.Generator] = None) -> Tensor:
    """Training-time conditioning augmentation of a low-res batch [N, 3, h, w] in [-1, 1] -> same shape.

    BLUR (64->256): Gaussian blur with sigma ~ U(0.4, 0.6) per sample (Cascaded Diffusion Models).
    BSR (256->1024): the BSR-like chain of :func:`_bsr_degrade`. Never applied at sampling time.
    """
    degradation = Degradation(degradation)
    if degradation is Degradation.BLUR:
        return gaussian_blur(low_res, _uniform(low_res.shape[0], BLUR_SIGMA, generator, low_res.device))
    if degradation is Degradation.BSR:
        return _bsr_degrade(low_res, generator)
    raise ValueError(f"unknown degradation {degradation!r}")
