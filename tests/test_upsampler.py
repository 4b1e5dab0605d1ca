"""Diffusion upsamplers: presets, forward on full images and crops, augmentations, aligned crops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dalle2.config import Degradation, Schedule, UpsamplerConfig, from_dict, read_preset_file
from dalle2.cascade import StageOptions, upsample
from dalle2.upsampler import Upsampler, degrade, downsample, gaussian_blur, jpeg_compress, low_res_projection, random_crop_pair

PRESETS = ("tiny", "small", "base", "paper")
PAPER_PARAMETERS = {"upsampler_256": 700e6, "upsampler_1024": 300e6}  # DALL-E 2, Table 3
KINDS = tuple(PAPER_PARAMETERS)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny networks gain nothing from intra-op threads, and on a shared 2-core machine
    # oversubscription makes them many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def preset_config(kind: str, name: str) -> UpsamplerConfig:
    return from_dict(UpsamplerConfig, read_preset_file(kind, name))


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter, so that the zero-initialised output layers do not hide the inputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random low-frequency images [n, 3, size, size] in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_with_their_sizes(kind, name):
    config = preset_config(kind, name)
    with torch.device("meta"):
        model = Upsampler(config)
    parameters = count(model)
    if name == "tiny":
        assert parameters < 5e6
    if name == "paper":
        assert abs(parameters / PAPER_PARAMETERS[kind] - 1) < 0.15, parameters
        assert config.unet.attention_resolutions == ()  # paper: no attention
    crop = round(config.image_size * config.crop_fraction)
    assert crop % 2 ** (len(config.unet.channel_mults) - 1) == 0  # training crops fit the UNet
    expected = (Degradation.BLUR, Schedule.COSINE) if kind == "upsampler_256" else (Degradation.BSR, Schedule.LINEAR)
    assert (config.degradation, config.diffusion.schedule) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_forward_on_full_images_and_on_crops(kind):
    torch.manual_seed(0)
    config = preset_config(kind, "tiny")
    model = perturbed(Upsampler(config))
    crop = round(config.image_size * config.crop_fraction)
    t = torch.tensor([5, 700])
    with torch.no_grad():
        for size in (config.image_size, crop):
            low = smooth_images(2, size // model.scale)
            x_t = torch.randn(2, 3, size, size)
            output = model(x_t, t, low_res=low)
            assert output.shape == x_t.shape and torch.isfinite(output).all()
            assert not torch.allclose(output, model(x_t, t, low_res=-low), atol=1e-4)  # the conditioning is read
    with pytest.raises(ValueError, match="low_res"):
        model(torch.randn(2, 3, config.image_size, config.image_size), t, low_res=smooth_images(2, config.image_size))


def test_runs_in_bfloat16_unchanged():
    model = perturbed(Upsampler(preset_config("upsampler_256", "tiny"))).to(torch.bfloat16)
    config = model.config
    with torch.no_grad():
        output = model(torch.randn(2, 3, config.image_size, config.image_size).bfloat16(), torch.tensor([1, 2]),
                       low_res=smooth_images(2, config.low_res).bfloat16())
    assert output.dtype == torch.bfloat16 and torch.isfinite(output.float()).all()


@pytest.mark.parametrize("degradation", list(Degradation))
def test_degradations_keep_shape_and_change_the_input(degradation):
    low = smooth_images(3, 32) * 0.5 + 0.1 * torch.randn(3, 3, 32, 32)
    degraded = degrade(low, degradation, generator=torch.Generator().manual_seed(0))
    assert degraded.shape == low.shape and degraded.dtype == low.dtype
    assert degraded.abs().max() <= 1
    assert (degraded - low).abs().mean() > 0.01
    again = degrade(low, degradation, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(degraded, again)  # one seed, one augmentation
    other = degrade(low, degradation, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(degraded, other)


def test_gaussian_blur_keeps_constants_and_smooths_noise():
    constant = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(constant, torch.tensor([0.5, 1.5])), constant)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(noise, torch.tensor([0.5, 1.5]))
    assert blurred[1].std() < blurred[0].std() < noise.std()  # larger sigma, smoother


def test_jpeg_error_grows_as_quality_falls():
    images = smooth_images(1, 32) + 0.05 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = images.clamp(-1, 1)
    errors = [(jpeg_compress(images, torch.tensor([q])) - images).abs().mean().item() for q in (95.0, 50.0, 10.0)]
    assert errors[0] < errors[1] < errors[2]
    assert errors[0] < 0.05


@pytest.mark.parametrize("scale", [2, 4])
def test_random_crops_are_aligned(scale):
    high = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    low = downsample(high, 64 // scale)
    high_crop, low_crop = random_crop_pair(high, low, crop_fraction=0.25, generator=torch.Generator().manual_seed(1))
    assert high_crop.shape == (5, 3, 16, 16) and low_crop.shape == (5, 3, 16 // scale, 16 // scale)
    # The low-res crop is exactly the downsampled high-res crop, for every sample's own offset.
    torch.testing.assert_close(downsample(high_crop, 16 // scale), low_crop)
    # Each crop is a window of its own image.
    for i in range(5):
        windows = high[i].unfold(1, 16, 1).unfold(2, 16, 1)  # [3, 49, 49, 16, 16]
        assert (windows - high_crop[i][:, None, None]).abs().amax(dim=(0, 3, 4)).min() == 0
    with pytest.raises(ValueError, match="downscaling"):
        random_crop_pair(high, torch.rand(5, 3, 24, 24), crop_fraction=0.25)


def test_low_res_projection_moves_only_block_means_onto_the_low_res_image():
    generator = torch.Generator().manual_seed(0)
    low_res = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    x0 = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    project = low_res_projection(low_res)
    projected = project(x0)

    def detail(x):  # what is left inside each 4x4 block once its mean is taken out
        return x - F.interpolate(downsample(x, 8), size=32, mode="nearest")

    torch.testing.assert_close(downsample(projected, 8), low_res)
    torch.testing.assert_close(detail(projected), detail(x0))
    torch.testing.assert_close(project(projected), projected)  # an image that already agrees stays as it is


def test_upsampling_keeps_the_colors_of_its_input_unless_asked_to_sample_freely():
    """An untrained upsampler draws anything; with low-res consistency (the default) its output
    still downsamples to the image it was given."""
    upsampler = perturbed(Upsampler(preset_config("upsampler_256", "tiny")))
    generator = torch.Generator().manual_seed(1)
    low_res = 0.6 * F.interpolate(torch.rand(2, 3, 4, 4, generator=generator) * 2 - 1, size=32, mode="bilinear", align_corners=False)

    def error(**kwargs):
        images = upsample([upsampler], low_res, 64, StageOptions(steps=6), torch.Generator().manual_seed(2), **kwargs)
        assert images.shape == (2, 3, 64, 64) and float(images.abs().max()) <= 1.0
        return float((downsample(images, 32) - low_res).abs().mean())

    kept, free = error(), error(low_res_consistency=False)
    # not 0: clipping x_0 to [-1, 1] after the projection cuts this untrained model's wild detail
    assert kept < 0.03 and free > 0.2, (kept, free)
