"""The diffusion prior: conditioning it relies on, and that it learns a mapping."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dalle2.factory import load_config
from dalle2.prior import DiffusionPrior, PriorTransformer


@pytest.fixture(scope="module")
def config():
    return load_config("prior", "tiny")


def _inputs(config, n=3, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, length, config.text_width, generator=g)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[:, 4:] = False  # the last two caption positions are padding
    return dict(
        x_t=torch.randn(n, config.embed_dim, generator=g),
        t=torch.tensor([10, 500, 999]),
        text_embed=torch.randn(n, config.embed_dim, generator=g),
        text_hidden=hidden,
        text_mask=mask,
    )


def test_prediction_shape_and_padding_is_ignored(config):
    net = PriorTransformer(config).eval()
    inputs = _inputs(config)
    out = net(**inputs)
    assert out.shape == (3, config.embed_dim)
    inputs["text_hidden"][:, 4:] += 100.0  # change only padded tokens
    torch.testing.assert_close(net(**inputs), out)


def test_caption_tokens_condition_the_output(config):
    net = PriorTransformer(config).eval()
    inputs = _inputs(config)
    out = net(**inputs)
    inputs["text_hidden"][:, :2] += 1.0
    assert not torch.allclose(net(**inputs), out)


def test_dropped_text_uses_the_learned_null(config):
    net = PriorTransformer(config).eval()
    a, b = _inputs(config, seed=1), _inputs(config, seed=2)
    b["x_t"] = a["x_t"]  # same noised image, different captions
    drop = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(net(**a, drop_text=drop), net(**b, drop_text=drop))
    assert not torch.allclose(net(**a), net(**b))


def test_causal_order_the_query_sees_everything_before_it(config):
    # The final query token attends to the noised embedding: changing x_t changes the output.
    net = PriorTransformer(config).eval()
    inputs = _inputs(config)
    out = net(**inputs)
    inputs["x_t"] = inputs["x_t"] + 1.0
    assert not torch.allclose(net(**inputs), out)


def test_too_many_caption_tokens_is_a_clear_error(config):
    net = PriorTransformer(config)
    inputs = _inputs(config, length=config.context_length + 1)
    inputs["text_mask"] = torch.ones(3, config.context_length + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="exceed context_length"):
        net(**inputs)


def test_sampling_keeps_the_candidate_closest_to_the_text(config):
    prior = DiffusionPrior(dataclasses.replace(config, candidates=4)).eval()
    text = torch.randn(2, config.embed_dim)
    picked = prior.sample(text, steps=4, generator=torch.Generator().manual_seed(0))
    # Redraw the same 4 candidates per caption and check the pick is the best of them.
    all_four = prior.sample(text.repeat_interleave(4, 0), steps=4, candidates=1, generator=torch.Generator().manual_seed(0))
    scores = F.cosine_similarity(all_four.view(2, 4, -1), F.normalize(text, dim=-1)[:, None], dim=-1)
    best = all_four.view(2, 4, -1)[torch.arange(2), scores.argmax(1)]
    torch.testing.assert_close(picked, best)


def test_sampling_with_guidance_and_progress(config):
    prior = DiffusionPrior(config).eval()
    steps = []
    out = prior.sample(torch.randn(2, config.embed_dim), steps=5, guidance_scale=3.0, progress=steps.append)
    assert out.shape == (2, config.embed_dim) and torch.isfinite(out).all()
    assert len(steps) == 5


def _toy_mapping(text, generator):
    dim = text.shape[1]
    w1 = torch.randn(dim, dim, generator=generator) / dim**0.5
    w2 = torch.randn(dim, dim, generator=generator) / dim**0.5
    return torch.tanh(text @ w1) @ w2 * 3 + 1.0


@pytest.mark.slow
def test_tiny_prior_learns_a_fixed_mapping(config):
    """Held-out cosine >= 0.9 between sampled and true image embeddings (issue requirement)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(4096 + 256, config.embed_dim, generator=g)
    image = _toy_mapping(text, torch.Generator().manual_seed(1))
    train_text, train_image, test_text, test_image = text[:4096], image[:4096], text[4096:], image[4096:]

    prior = DiffusionPrior(config)
    prior.fit_embedding_stats(train_image)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-3)
    for _ in range(350):
        idx = torch.randint(0, 4096, (256,), generator=g)
        loss = prior.loss(train_image[idx], train_text[idx], generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    prior.eval()
    predicted = prior.sample(test_text, steps=16, generator=torch.Generator().manual_seed(2))
    cosine = F.cosine_similarity(predicted, test_image).mean().item()
    mean_baseline = F.cosine_similarity(train_image.mean(0, keepdim=True), test_image).mean().item()
    assert cosine >= 0.9, f"held-out cosine {cosine:.3f} (mean-embedding baseline {mean_baseline:.3f})"
