"""Conditioning computed once per request: the prior's caption (a KV cache of its causal caption
tokens) and the decoder's caption encoding and CLIP-embedding projections, reused at every step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dalle2.decoder import Decoder
from dalle2.diffusion import ClassifierFreeGuidance, GaussianDiffusion
from dalle2.factory import create_model
from dalle2.layers import timestep_embedding
from dalle2.cascade import StageOptions, decode
from dalle2.prior import DiffusionPrior


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter: zero-initialised output layers would hide what the inputs do."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def prior() -> DiffusionPrior:
    torch.manual_seed(0)
    return perturbed(create_model("prior", "tiny"))


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    torch.manual_seed(0)
    return perturbed(create_model("decoder", "tiny"))


def prior_text(config, n: int = 4, length: int = 9):
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[:, 6:] = False
    mask[1, 2:] = False
    return torch.randn(n, config.embed_dim, generator=g), torch.randn(n, length, config.text_width, generator=g), mask


def full_sequence_prior(net, x_t, t, text_embed, text_hidden, text_mask, dropped):
    """The prior as the paper writes it: one causal Transformer over [caption, text embedding, time,
    noised image, query] (the forward before the KV cache), from the network's own layers."""
    n = x_t.shape[0]
    text_embed = F.normalize(text_embed, dim=-1) * math.sqrt(text_embed.shape[-1])
    text_token = torch.where(dropped[:, None], net.null_text_embed, net.text_embed_in(text_embed))
    time = net.time_in(timestep_embedding(t, net.config.width))
    fixed = torch.stack([text_token, time, net.image_in(x_t), net.query.expand(n, -1)], dim=1)
    tokens = torch.cat([net.caption_in(text_hidden), fixed], dim=1)
    length = tokens.shape[1]
    tokens = tokens + net.positions[-length:]
    key_valid = torch.cat([text_mask & ~dropped[:, None], text_mask.new_ones(n, 4)], dim=1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = ((causal & key_valid[:, None, :]) | torch.eye(length, dtype=torch.bool))[:, None]
    for block in net.blocks:
        tokens = block(tokens, mask)
    return net.out(net.norm(tokens[:, -1]))


def test_the_priors_caption_cache_equals_the_full_causal_sequence(prior):
    net, config = prior.net, prior.config
    text_embed, hidden, mask = prior_text(config)
    g = torch.Generator().manual_seed(3)
    x_t, t = torch.randn(4, config.embed_dim, generator=g), torch.tensor([0, 250, 600, 999])
    dropped = torch.tensor([False, True, False, True])
    with torch.no_grad():
        reference = full_sequence_prior(net, x_t, t, text_embed, hidden, mask, dropped)
        cached = net(x_t, t, **net.encode_caption(text_embed, hidden, mask), drop_text=dropped)
        direct = net(x_t, t, text_embed=text_embed, text_hidden=hidden, text_mask=mask, drop_text=dropped)
        no_caption = net(x_t, t, text_embed=text_embed)
        no_caption_reference = full_sequence_prior(
            net, x_t, t, text_embed, hidden[:, :0], mask[:, :0], torch.zeros(4, dtype=torch.bool)
        )  # fmt: skip
    torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(direct, cached, rtol=0, atol=0)
    torch.testing.assert_close(no_caption, no_caption_reference, rtol=1e-5, atol=1e-5)


def test_the_priors_caption_is_encoded_once_per_request(prior, monkeypatch):
    text_embed, hidden, mask = prior_text(prior.config, n=2)
    calls = {"encode_caption": 0, "caption_in": 0}
    encode = prior.net.encode_caption

    def counted(*args, **kwargs):
        calls["encode_caption"] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(prior.net, "encode_caption", counted)
    handle = prior.net.caption_in.register_forward_hook(lambda *_: calls.__setitem__("caption_in", calls["caption_in"] + 1))
    try:
        sampled = prior.sample(
            text_embed, hidden, mask, steps=6, guidance_scale=2.0, sampler="dpmpp_2m", generator=torch.Generator().manual_seed(4)
        )  # fmt: skip
    finally:
        handle.remove()
    assert calls == {"encode_caption": 1, "caption_in": 1}  # 6 steps x 2 candidates x guidance's 2 halves: one encoding
    # The same sample as giving the raw caption to every step (encoded anew each time).
    monkeypatch.undo()
    candidates = prior.config.candidates
    guided = ClassifierFreeGuidance(prior.net, 2.0, ("drop_text",))
    x0 = prior.diffusion.respace(6).sample(
        guided, (2 * candidates, prior.config.embed_dim), sampler="dpmpp_2m", generator=torch.Generator().manual_seed(4),
        text_embed=text_embed.repeat_interleave(candidates, 0), text_hidden=hidden.repeat_interleave(candidates, 0),
        text_mask=mask.repeat_interleave(candidates, 0),
    )  # fmt: skip
    embeds = prior.denormalize(x0).reshape(2, candidates, -1)
    best = torch.einsum("ncd,nd->nc", F.normalize(embeds, dim=-1), F.normalize(text_embed, dim=-1)).argmax(1)
    torch.testing.assert_close(sampled, embeds[torch.arange(2), best], rtol=1e-5, atol=1e-5)


def decoder_inputs(config, n: int = 3):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, 1000, (n, config.text.context_length), generator=g)
    tokens[:, 7:] = 0
    tokens[:, 6] = 49407  # end of text
    return torch.randn(n, config.embed_dim, generator=g), tokens


def test_the_decoders_encoded_conditions_equal_its_raw_inputs(decoder):
    embed, tokens = decoder_inputs(decoder.config, n=4)
    g = torch.Generator().manual_seed(6)
    x_t, t = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 300, 700, 999])
    drops = dict(drop_image_embed=torch.tensor([False, True, False, True]), drop_text=torch.tensor([False, False, True, True]))
    with torch.no_grad():
        for caption in (tokens, None):
            raw = decoder(x_t, t, image_embed=embed, text_tokens=caption, **drops)
            encoded = decoder(x_t, t, **decoder.encode_conditions(embed, caption), **drops)
            torch.testing.assert_close(encoded, raw, rtol=0, atol=0)
        # a dropped caption is the absent caption, through the encoded path too
        dropped = decoder(x_t, t, **decoder.encode_conditions(embed, tokens), drop_text=torch.ones(4, dtype=torch.bool))
        absent = decoder(x_t, t, **decoder.encode_conditions(embed, None))
        torch.testing.assert_close(dropped, absent, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        decoder(x_t, t, image_embed=embed, **decoder.encode_conditions(embed, None))


def test_the_decoders_caption_is_encoded_once_per_request(decoder):
    embed, tokens = decoder_inputs(decoder.config, n=2)
    calls = {"text_encoder": 0, "image_embed_to_tokens_rows": 0}
    hooks = [
        decoder.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("text_encoder", calls["text_encoder"] + 1)),
        decoder.image_embed_to_tokens.register_forward_hook(
            lambda module, args, out: calls.__setitem__("image_embed_to_tokens_rows", calls["image_embed_to_tokens_rows"] + args[0].shape[0])
        ),
    ]
    options = StageOptions(steps=5, guidance_scale=3.0, sampler="dpmpp_2m")
    try:
        images = decode(decoder, embed, tokens, options, torch.Generator().manual_seed(7))
    finally:
        for hook in hooks:
            hook.remove()
    # One caption encoding for 5 steps of a doubled batch; the embeddings' tokens projected once
    # (2 rows) plus the learned null's single row at each step.
    assert calls == {"text_encoder": 1, "image_embed_to_tokens_rows": 2 + 5}
    # The same images as giving the raw inputs to every step.
    process = GaussianDiffusion.from_config(decoder.config.diffusion).respace(5)
    reference = process.sample(
        ClassifierFreeGuidance(decoder, 3.0, decoder.drop_keys), (2, 3, 32, 32), sampler="dpmpp_2m", clip_x0=1.0,
        generator=torch.Generator().manual_seed(7), image_embed=embed, text_tokens=tokens,
    )  # fmt: skip
    torch.testing.assert_close(images, reference, rtol=1e-4, atol=1e-4)  # float rounding of other batch shapes

