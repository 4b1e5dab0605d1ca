"""The unCLIP pipeline: shapes through the cascade, bad input, edits, variations, bundles."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle2.bundle import save_bundle
from dalle2.cli import main as cli_main
from dalle2.config import DecoderConfig, DiffusionConfig, Prediction, TextEncoderConfig, UNetConfig
from dalle2.decoder import Decoder
from dalle2.diffusion import GaussianDiffusion
from dalle2.factory import create_model
from dalle2.images import InvalidInput, image_to_tensor
from dalle2.cascade import (
    GenerationOptions,
    StageOptions,
    UnCLIP,
    edit,
    interpolations,
    text_diff,
    text_to_image,
    variations,
)

FAST = GenerationOptions(n=1, seed=0, prior=StageOptions(steps=3), decoder=StageOptions(steps=3, guidance_scale=2.0), upsampler=StageOptions(steps=2))


def _tiny_pipe(with_upsamplers=True):
    torch.manual_seed(0)
    kinds = ["upsampler_256", "upsampler_1024"] if with_upsamplers else []
    return UnCLIP(
        clip=create_model("clip", "tiny").eval(),
        prior=create_model("prior", "tiny").eval(),
        decoder=create_model("decoder", "tiny").eval(),
        upsamplers=[create_model(k, "tiny").eval() for k in kinds],
    )


@pytest.fixture(scope="module")
def pipe():
    return _tiny_pipe()


def _options(**changes):
    return GenerationOptions(**{**FAST.__dict__, **changes})


def _picture(size=48, mode="RGB"):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return image.convert(mode)


def test_text_to_image_through_the_whole_cascade(pipe):
    assert pipe.sizes == [32, 64, 128]
    stages = []
    images = text_to_image(pipe, ["a red circle", "a blue square"], _options(n=2), progress=lambda s, step: stages.append(s))
    assert len(images) == 4 and all(im.size == (128, 128) and im.mode == "RGB" for im in images)
    assert stages == ["prior"] * 3 + ["decoder"] * 3 + ["upsampler_64"] * 2 + ["upsampler_128"] * 2


@pytest.mark.parametrize("size", [32, 64])
def test_output_size_stops_the_cascade_early(pipe, size):
    (image,) = text_to_image(pipe, ["a red circle"], _options(size=size))
    assert image.size == (size, size)


def test_upsamplers_keep_the_decoders_image_unless_asked_to_sample_freely(pipe):
    """GenerationOptions.low_res_consistency reaches every upsampler. These untrained models draw
    noise in [-1, 1], and clipping it undoes part of the projection, so the kept error is not ~0
    here; tests/test_upsampler.py checks the projection's exactness on a tame image."""
    (decoded,) = text_to_image(pipe, ["a red circle"], _options(size=32))

    def error(**changes) -> float:
        (upsampled,) = text_to_image(pipe, ["a red circle"], _options(**changes))
        down = np.asarray(upsampled.resize((32, 32), Image.BOX), dtype=np.float64)
        return float(np.abs(down - np.asarray(decoded, dtype=np.float64)).mean())

    kept, free = error(), error(low_res_consistency=False)
    assert kept < free / 2, (kept, free)


def test_same_seed_same_images(pipe):
    a = text_to_image(pipe, ["a red circle"], _options(size=32))
    b = text_to_image(pipe, ["a red circle"], _options(size=32))
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_bad_requests_are_clear_errors(pipe):
    cases = [
        (dict(prompts=[""]), "prompt"),
        (dict(prompts=["   "]), "prompt"),
        (dict(options=_options(n=0)), "n"),
        (dict(options=_options(n=11)), "n"),
        (dict(options=_options(size=256)), "size"),
        (dict(options=_options(decoder=StageOptions(steps=0))), "decoder_steps"),
    ]
    for kwargs, param in cases:
        with pytest.raises(InvalidInput) as error:
            text_to_image(pipe, kwargs.get("prompts", ["a cat"]), kwargs.get("options", FAST))
        assert error.value.param == param


def test_long_prompts_are_truncated_not_an_error(pipe):
    (image,) = text_to_image(pipe, ["a red circle " * 200], _options(size=32))
    assert image.size == (32, 32)


def test_variations_accept_any_mode_and_size(pipe):
    images = variations(pipe, [_picture(48, "RGBA"), _picture(20, "L")], _options(n=2, size=64))
    assert len(images) == 4 and all(im.size == (64, 64) for im in images)


def test_interpolations_and_text_diffs(pipe):
    images = interpolations(pipe, _picture(32), _picture(40), weights=(0, 0.5, 1), options=_options(size=32))
    assert len(images) == 3
    diffs = text_diff(pipe, _picture(32), "a red circle", "a blue circle", amounts=(0, 0.5), options=_options(size=32))
    assert len(diffs) == 2


def _half_mask(size, transparent_left=True):
    alpha = np.full((size, size), 255, np.uint8)
    alpha[:, : size // 2] = 0  # transparent = repaint (OpenAI's convention)
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., 3] = alpha
    return Image.fromarray(rgba, "RGBA")


@pytest.mark.parametrize("size", [32, 128])
def test_edit_leaves_unmasked_pixels_unchanged(pipe, size):
    image = _picture(32)
    for prompt in (None, "a green triangle"):
        (result,) = edit(pipe, image, _half_mask(32), prompt, _options(size=size))
        original = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), np.int16) if size != 32 else np.asarray(image, np.int16)
        kept = np.abs(np.asarray(result, np.int16)[:, size // 2 :] - original[:, size // 2 :])
        assert kept.max() <= 1, f"kept pixels changed by up to {kept.max()}"
        repainted = np.abs(np.asarray(result, np.int16)[:, : size // 2] - original[:, : size // 2])
        assert repainted.mean() > 5


def test_edit_mask_must_match_the_image(pipe):
    with pytest.raises(InvalidInput) as error:
        edit(pipe, _picture(32), _half_mask(16), None, FAST)
    assert error.value.param == "mask"


def test_bundles_round_trip_into_the_same_cascade(tmp_path, pipe):
    first, second = pipe.upsamplers
    models = {"clip": pipe.clip, "prior": pipe.prior, "decoder": pipe.decoder, "upsampler_256": first, "upsampler_1024": second}
    for kind, model in models.items():
        save_bundle(model, kind, str(tmp_path / kind))
    loaded = UnCLIP.from_bundles(str(tmp_path))
    assert loaded.sizes == pipe.sizes
    a = text_to_image(pipe, ["a red circle"], _options())
    b = text_to_image(loaded, ["a red circle"], _options())
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_a_cascade_needs_clip_and_decoder(tmp_path, pipe):
    save_bundle(pipe.clip, "clip", str(tmp_path / "clip"))
    with pytest.raises(FileNotFoundError, match="no decoder bundle"):
        UnCLIP.from_bundles(str(tmp_path))


def test_generate_command_writes_a_png_grid(tmp_path, pipe):
    save_bundle(pipe.clip, "clip", str(tmp_path / "b" / "clip"))
    save_bundle(pipe.prior, "prior", str(tmp_path / "b" / "prior"))
    save_bundle(pipe.decoder, "decoder", str(tmp_path / "b" / "decoder"))
    out = tmp_path / "grid.png"
    argv = ["generate", "a red circle", "a blue square", "--bundles", str(tmp_path / "b"), "--n", "2", "--seed", "0",
            "--out", str(out), "--prior-steps", "2", "--decoder-steps", "2", "--quiet"]  # fmt: skip
    assert cli_main(argv) == 0
    grid = Image.open(out)
    assert grid.size == (2 * 34 + 2, 2 * 34 + 2)  # 2x2 images of 32px with 2px padding


@pytest.mark.slow
def test_variations_stay_close_to_their_image_in_clip_space():
    """A decoder that learned to draw 4 images from their CLIP embeddings: a variation of image i is
    nearer image i than any other image in CLIP space (paper section 3.1)."""
    torch.manual_seed(0)
    pipe = _tiny_pipe(with_upsamplers=False)
    # A small x0-predicting decoder: it memorises a handful of images in a few hundred steps
    # (a tiny eps-predicting one needs far longer; see tests/test_decoder.py).
    pipe.decoder = Decoder(
        DecoderConfig(
            image_size=32,
            unet=UNetConfig(channels=16, channel_mults=(1, 2), res_blocks=1, attention_resolutions=(16,), head_channels=16),
            text=TextEncoderConfig(width=32, layers=1, heads=2, token_embed_width=8),
            embed_dim=pipe.clip.config.embed_dim,
            diffusion=DiffusionConfig(prediction=Prediction.X0),
        )
    )
    g = torch.Generator().manual_seed(0)
    # Four images with distinct colors and layouts.
    images = torch.full((4, 3, 32, 32), -1.0)
    images[0, 0, :16] = 1  # red top
    images[1, 1, :, 16:] = 1  # green right
    images[2, 2, 8:24, 8:24] = 1  # blue square
    images[3, :2, 16:] = 1  # yellow bottom
    with torch.no_grad():
        embeds = pipe.clip.encode_image(images)
    decoder = pipe.decoder.train()
    process = GaussianDiffusion.from_config(decoder.config.diffusion)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    for _ in range(400):
        loss = process.training_loss(decoder, images, generator=g, image_embed=embeds).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder.eval()

    pictures = [Image.fromarray(((im.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)) for im in images]
    results = variations(pipe, pictures, _options(n=2, decoder=StageOptions(steps=10, guidance_scale=1.0)))
    with torch.no_grad():
        result_embeds = pipe.clip.encode_image(torch.cat([image_to_tensor(r, 32) for r in results]))
    similarity = F.normalize(result_embeds, dim=-1) @ F.normalize(embeds, dim=-1).T  # [8 variations, 4 images]
    nearest = similarity.argmax(dim=1)
    assert nearest.tolist() == [0, 0, 1, 1, 2, 2, 3, 3], similarity


def test_upsampler_guidance_is_refused_not_ignored(pipe):
    """DALL-E 2's upsamplers have no condition to drop: a guidance scale for them would do nothing."""
    with pytest.raises(InvalidInput, match="upsamplers take no guidance") as error:
        text_to_image(pipe, ["a red circle"], _options(upsampler=StageOptions(steps=2, guidance_scale=2.0)))
    assert error.value.param == "upsampler_guidance_scale"


def test_text_diff_normalises_each_text_embedding_before_the_difference(pipe, monkeypatch):
    """Paper section 3.3: z_d = norm(z_t - z_t0) of unit text embeddings. Scaling one caption's
    embedding (CLIP's norms differ by caption) must not change the direction moved toward."""
    import dalle2.cascade as cascade

    decoded = []
    monkeypatch.setattr(cascade, "_decode_shared_noise", lambda pipe, embeds, size, options, progress: decoded.append(embeds) or [])
    real_encode = cascade.encode_prompts
    image = _picture()
    text_diff(pipe, image, "a red circle", "a blue square", amounts=(0.5,), options=_options())
    monkeypatch.setattr(
        cascade, "encode_prompts",
        lambda clip, prompts: (lambda text, tokens: (type(text)(text.embed * torch.tensor([[1.0], [7.0]]), text.hidden, text.mask), tokens))(*real_encode(clip, prompts)),
    )  # fmt: skip
    text_diff(pipe, image, "a red circle", "a blue square", amounts=(0.5,), options=_options())
    torch.testing.assert_close(decoded[0], decoded[1])
