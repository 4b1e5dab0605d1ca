"""Inference precision (issue 20): the networks under bf16 autocast, the samplers in float32.

Measured on the 2-core CPU with this test's tiny cascade (random weights with the zero-initialised
output layers filled in, so every network draws something), 2 prompts x 2 images, 32 -> 64 px,
guidance 3: pixel differences between bf16 and fp32 from the same seed were, on the 0..255
scale, mean 0.53 / 99th percentile 4 / max 9 at 8 steps per stage, and 0.41 / 3 / 9 at 25 steps
(the images' own standard deviation: about 100). The bounds below leave about 2.5x that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalle2.factory import create_model
from dalle2.images import InvalidInput
from dalle2.cascade import GenerationOptions, StageOptions, UnCLIP, text_to_image
from dalle2.precision import Precision, inference_precision, resolve_precision


def _drawing(model, seed: int):
    """A random model whose zero-initialised layers (improved-diffusion's zero_module) are filled in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return UnCLIP(
        clip=create_model("clip", "tiny").eval(),
        prior=_drawing(create_model("prior", "tiny"), 1),
        decoder=_drawing(create_model("decoder", "tiny"), 2),
        upsamplers=[_drawing(create_model("upsampler_256", "tiny"), 3)],
    )


def _pixels(pipe, precision) -> np.ndarray:
    options = GenerationOptions(
        n=2, seed=0, prior=StageOptions(steps=8), decoder=StageOptions(steps=8, guidance_scale=3.0),
        upsampler=StageOptions(steps=8), precision=precision,
    )  # fmt: skip
    images = text_to_image(pipe, ["a red circle", "a blue square at the top"], options)
    return np.stack([np.asarray(image, dtype=np.float64) for image in images])


def test_bf16_samples_stay_close_to_fp32_from_the_same_seed(pipe):
    full, half = _pixels(pipe, "fp32"), _pixels(pipe, "bf16")
    assert full.std() > 30  # the networks draw something: the comparison is not of two blank images
    difference = np.abs(full - half)
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 10 and difference.max() <= 24
    assert not np.array_equal(full, half)  # bf16 really ran


def test_the_default_precision_follows_the_device():
    assert resolve_precision(None, "cpu") is Precision.FP32
    assert resolve_precision(None, "cuda") is Precision.BF16
    assert resolve_precision("fp16", "cuda") is Precision.FP16
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", "cpu")


def test_autocast_casts_the_networks_not_the_sampler():
    linear = torch.nn.Linear(4, 4)
    with inference_precision("bf16", "cpu"):
        assert linear(torch.randn(2, 4)).dtype == torch.bfloat16
        assert (torch.randn(2, 4) * torch.randn(2, 4)).dtype == torch.float32  # elementwise math stays float32
    with inference_precision("fp32", "cpu"):
        assert linear(torch.randn(2, 4)).dtype == torch.float32


def test_bad_precisions_are_clear_errors(pipe):
    with pytest.raises(InvalidInput, match="precision must be one of") as error:
        text_to_image(pipe, ["a red circle"], GenerationOptions(precision="int8"))
    assert error.value.param == "precision"
    with pytest.raises(ValueError, match="fp16 inference needs a CUDA device"):
        with inference_precision("fp16", "cpu"):
            pass
