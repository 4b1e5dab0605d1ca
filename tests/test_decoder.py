"""The GLIDE-style decoder: presets, conditioning contracts, and a tiny run that learns."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dalle2.config import DecoderConfig, DiffusionConfig, Prediction, TextEncoderConfig, UNetConfig, from_dict, read_preset_file
from dalle2.decoder import Decoder
from dalle2.diffusion import GaussianDiffusion
from dalle2.unet import AttentionBlock, UNet, pixel_coordinates, sincos_positions

# CLIP embedding dims of the presets' CLIP models (the factory fills them in; fixed here so these
# tests do not depend on building CLIP). Parameter counts barely depend on them.
EMBED_DIMS = {"tiny": 64, "small": 512, "base": 512, "paper": 1024}
PAPER_PARAMETERS = 3.5e9  # DALL-E 2, Table 3 (GLIDE UNet + its 24 x 2048 text Transformer)
SOS, EOS = 49406, 49407  # open_clip's start/end-of-text ids


def preset_config(name: str, **changes) -> DecoderConfig:
    config = from_dict(DecoderConfig, read_preset_file("decoder", name))
    return dataclasses.replace(config, embed_dim=EMBED_DIMS[name], **changes)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter: the zero-initialised output layers otherwise make the
    freshly built network output exactly 0, which would hide any dependence on its inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def caption_tokens(rows: list[list[int]], length: int) -> torch.Tensor:
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = [SOS, *row, EOS]
        tokens[i, : len(ids)] = torch.tensor(ids)
    return tokens


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny networks gain nothing from intra-op threads, and on a shared 2-core machine
    # oversubscription makes them many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> Decoder:
    torch.manual_seed(0)
    return perturbed(Decoder(preset_config("tiny")))


def inputs(n: int = 2, size: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, 3, size, size, generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator)
    embed = torch.randn(n, EMBED_DIMS["tiny"], generator=generator)
    return x_t, t, embed


@pytest.mark.parametrize("name", list(EMBED_DIMS))
def test_presets_build_with_their_sizes(name):
    with torch.device("meta"):
        model = Decoder(preset_config(name))
    parameters = count(model)
    if name == "tiny":
        assert parameters < 5e6
    if name == "paper":
        assert abs(parameters / PAPER_PARAMETERS - 1) < 0.15, parameters
    # GLIDE and DALL-E 2 predict eps; the tiny CPU preset predicts v (Salimans & Ho 2022), which
    # gets clean backgrounds and shapes in far fewer steps on a CPU budget.
    assert model.config.diffusion.prediction is (Prediction.V if name == "tiny" else Prediction.EPS)


def test_preset_sizes_grow_from_tiny_to_paper():
    with torch.device("meta"):
        counts = [count(Decoder(preset_config(name))) for name in EMBED_DIMS]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_forward_shapes_with_and_without_caption(tiny):
    x_t, t, embed = inputs()
    tokens = caption_tokens([[320, 2368], [320, 1929, 530]], length=16)
    with torch.no_grad():
        plain = tiny(x_t, t, image_embed=embed)
        captioned = tiny(x_t, t, image_embed=embed, text_tokens=tokens)
        dropped = tiny(x_t, t, image_embed=embed, text_tokens=tokens,
                       drop_image_embed=torch.tensor([True, False]), drop_text=torch.tensor([False, True]))
    for output in (plain, captioned, dropped):
        assert output.shape == x_t.shape and torch.isfinite(output).all()
    assert not torch.allclose(plain, captioned)


def test_dropped_image_embed_uses_the_learned_null(tiny):
    x_t, t, embed = inputs()
    other = torch.randn_like(embed)
    drop = torch.tensor([True, False])
    with torch.no_grad():
        first = tiny(x_t, t, image_embed=embed, drop_image_embed=drop)
        second = tiny(x_t, t, image_embed=other, drop_image_embed=drop)
    torch.testing.assert_close(first[0], second[0])  # dropped: the embedding is not read
    assert not torch.allclose(first[1], second[1], atol=1e-4)  # kept: it is


def test_dropped_caption_equals_no_caption(tiny):
    x_t, t, embed = inputs()
    tokens = caption_tokens([[320, 2368], [320, 1929, 530]], length=16)
    other_tokens = caption_tokens([[1125, 539, 320], [2368]], length=16)
    drop = torch.tensor([True, True])
    with torch.no_grad():
        without = tiny(x_t, t, image_embed=embed)
        dropped = tiny(x_t, t, image_embed=embed, text_tokens=tokens, drop_text=drop)
        dropped_other = tiny(x_t, t, image_embed=embed, text_tokens=other_tokens, drop_text=drop)
        kept = tiny(x_t, t, image_embed=embed, text_tokens=tokens)
        kept_other = tiny(x_t, t, image_embed=embed, text_tokens=other_tokens)
    torch.testing.assert_close(dropped, without)
    torch.testing.assert_close(dropped_other, without)
    assert not torch.allclose(kept, kept_other, atol=1e-4)


def test_caption_padding_is_ignored(tiny):
    x_t, t, embed = inputs()
    rows = [[320, 2368], [320, 1929, 530]]
    with torch.no_grad():
        short = tiny(x_t, t, image_embed=embed, text_tokens=caption_tokens(rows, length=8))
        long = tiny(x_t, t, image_embed=embed, text_tokens=caption_tokens(rows, length=tiny.config.text.context_length))
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-4)


def test_random_drop_masks_follow_the_config(tiny):
    image, text = tiny.random_drop_masks(20000, generator=torch.Generator().manual_seed(0))
    assert image.dtype == torch.bool and image.shape == (20000,)
    assert abs(image.float().mean().item() - 0.1) < 0.01
    assert abs(text.float().mean().item() - 0.5) < 0.02
    again, _ = tiny.random_drop_masks(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image, again)


def test_inpainting_channels_read_only_known_pixels():
    torch.manual_seed(0)
    model = perturbed(Decoder(preset_config("tiny", inpainting=True)))
    assert model.unet.input_conv.in_channels == 3 + 4 + (2 if model.config.unet.coordinates else 0)  # image, inpaint, (y, x)
    x_t, t, embed = inputs()
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., :, :16] = 1  # left half known
    changed_hole = image.clone()
    changed_hole[..., :, 16:] = -image[..., :, 16:]
    with torch.no_grad():
        output = model(x_t, t, image_embed=embed, inpaint_image=image, inpaint_mask=mask)
        same = model(x_t, t, image_embed=embed, inpaint_image=changed_hole, inpaint_mask=mask)
        nothing_known = model(x_t, t, image_embed=embed)
    assert output.shape == x_t.shape
    torch.testing.assert_close(output, same)
    assert not torch.allclose(output, nothing_known, atol=1e-4)


def test_attention_position_code_tells_every_position_apart():
    code = sincos_positions(64, 16, 16, "cpu", torch.float32)  # [C, H, W]
    assert code.shape == (64, 16, 16) and code.abs().max() <= 1.0
    vectors = code.reshape(64, -1).T  # [H*W, C]
    distances = torch.cdist(vectors, vectors) + torch.eye(16 * 16) * 1e9
    assert distances.min() > 0.1


@pytest.mark.parametrize("positions", [False, True])
def test_attention_knows_where_it_is_only_with_the_position_code(positions):
    # Attention over spatial tokens is permutation-equivariant: on a feature map that is the same
    # everywhere it answers the same everywhere, so "at the top left" cannot be drawn from the
    # condition tokens it attends to. The position code breaks that symmetry.
    torch.manual_seed(0)
    block = perturbed(AttentionBlock(64, 32, context_width=16, positions=positions))
    uniform = torch.randn(1, 64, 1, 1).expand(2, 64, 8, 8).contiguous()
    with torch.no_grad():
        out = block(uniform, torch.randn(2, 3, 16))
    spread = (out - out.mean(dim=(2, 3), keepdim=True)).abs().max().item()
    assert spread > 1e-2 if positions else spread < 1e-5


def test_coordinate_channels_follow_the_input_size():
    coords = pixel_coordinates(torch.zeros(2, 3, 4, 5))
    assert coords.shape == (2, 2, 4, 5)
    assert coords[0, :, 0, 0].tolist() == [-1.0, -1.0] and coords[0, :, -1, -1].tolist() == [1.0, 1.0]
    assert torch.equal(coords[0, 0, :, 0], torch.linspace(-1, 1, 4))  # channel 0 is y (rows)
    unet = perturbed(UNet(UNetConfig(channels=32, channel_mults=(1, 2), res_blocks=1, coordinates=True), 32, 3, 3))
    assert unet.input_conv.in_channels == 3 + 2
    for size in (16, 32, 48):  # any size, as the upsamplers' crops need
        with torch.no_grad():
            assert unet(torch.zeros(1, 3, size, size), torch.tensor([5])).shape == (1, 3, size, size)


def test_bad_inputs_are_clear_errors(tiny):
    x_t, t, embed = inputs()
    with pytest.raises(ValueError, match="image_embed"):
        tiny(x_t, t, image_embed=embed[:, :10])
    with pytest.raises(ValueError, match="context_length"):
        tiny(x_t, t, image_embed=embed, text_tokens=torch.ones(2, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="inpainting"):
        tiny(x_t, t, image_embed=embed, inpaint_image=x_t, inpaint_mask=torch.ones(2, 1, 32, 32))
    with pytest.raises(ValueError, match="drop masks"):
        tiny(x_t, t, image_embed=embed, drop_text=torch.tensor([True]))


def test_runs_in_bfloat16_unchanged():
    torch.manual_seed(0)
    model = perturbed(Decoder(preset_config("tiny"))).to(torch.bfloat16)
    x_t, t, embed = inputs()
    tokens = caption_tokens([[320, 2368], [320]], length=8)
    with torch.no_grad():
        output = model(x_t.bfloat16(), t, image_embed=embed, text_tokens=tokens, drop_text=torch.tensor([False, True]))
    assert output.dtype == torch.bfloat16 and torch.isfinite(output.float()).all()


# -- a tiny decoder learns to reproduce images from their embeddings --------------------------------


def target_images(n: int = 4, size: int = 32) -> torch.Tensor:
    """n distinct smooth images [n, 3, size, size] in [-1, 1]: rotated stripes plus a disc."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for k in range(n):
        angle = 2 * math.pi * k / n
        u, v = x * math.cos(angle) + y * math.sin(angle), x * math.sin(angle) - y * math.cos(angle)
        disc = ((x - 0.5 * math.cos(angle)) ** 2 + (y - 0.5 * math.sin(angle)) ** 2 < 0.2).float() * 2 - 1
        images.append(torch.stack([torch.sin(3 * u), torch.cos(2 * v + k), disc]))
    return torch.stack(images)


@pytest.mark.slow
def test_overfits_a_handful_of_images_from_their_embeddings():
    torch.manual_seed(0)
    # A smaller trunk than the tiny preset keeps this around 15-20 s on one core. x0-prediction: the
    # test is about the conditioning path, and an x0 model memorises in far fewer steps than eps.
    config = DecoderConfig(
        image_size=32,
        unet=UNetConfig(channels=16, channel_mults=(1, 2), res_blocks=1, attention_resolutions=(16,), head_channels=16),
        text=TextEncoderConfig(width=32, layers=1, heads=2, token_embed_width=8),
        embed_dim=EMBED_DIMS["tiny"],
        diffusion=DiffusionConfig(prediction=Prediction.X0),
    )
    model = Decoder(config)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    images = target_images()  # [4, 3, 32, 32]
    embeds = torch.nn.functional.normalize(torch.randn(4, config.embed_dim), dim=-1)
    generator = torch.Generator().manual_seed(1)

    # A fixed evaluation set: 16 timesteps across the schedule x 4 images, fixed noise.
    eval_t = torch.linspace(0, diffusion.num_timesteps - 1, 16).long().repeat_interleave(4)
    eval_images, eval_embeds = images.repeat(16, 1, 1, 1), embeds.repeat(16, 1)
    eval_noise = torch.randn(eval_images.shape, generator=generator)

    def eval_loss() -> float:
        with torch.no_grad():
            return diffusion.training_loss(model, eval_images, t=eval_t, noise=eval_noise, image_embed=eval_embeds).mean().item()

    before = eval_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(400):
        loss = diffusion.training_loss(model, images, generator=generator, image_embed=embeds).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    after = eval_loss()
    assert after < before / 10, (before, after)

    with torch.no_grad():
        samples = diffusion.respace(10).sample(
            model, images.shape, sampler="ddim", generator=torch.Generator().manual_seed(2), clip_x0=1.0, image_embed=embeds
        )
    errors = (samples[:, None] - images[None]).pow(2).mean(dim=(2, 3, 4))  # [sample, target]
    own = errors.diagonal()
    others = errors.masked_fill(torch.eye(4, dtype=torch.bool), float("inf")).min(dim=1).values
    assert (own < 0.1).all() and (own < others / 5).all(), errors
