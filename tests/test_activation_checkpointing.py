"""Activation checkpointing (``activation_checkpointing: true``) changes memory, not math: the same
loss and the same gradients as without, for the prior, the decoder (UNet + text encoder) and an
upsampler, and far fewer bytes kept for the backward pass."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dalle2.factory import create_model, load_config
from dalle2.prior import DiffusionPrior


def with_checkpointing(kind: str, config):
    """``config`` with activation checkpointing on (and dropout, to check the RNG is replayed)."""
    if kind == "prior":
        return dataclasses.replace(config, activation_checkpointing=True)
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, activation_checkpointing=True))


def with_dropout(kind: str, config):
    if kind == "prior":
        return config
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, dropout=0.1))


def loss_of(kind: str, model: torch.nn.Module, seed: int) -> torch.Tensor:
    """A training loss of ``model`` on fixed random inputs, with fixed noise, timesteps and dropout."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    torch.manual_seed(seed)
    if kind == "prior":
        n, dim = 4, config.embed_dim
        hidden = torch.randn(n, config.context_length, config.text_width, generator=generator)
        mask = torch.arange(config.context_length)[None] < torch.tensor([[3], [5], [1], [9]])
        return model.loss(torch.randn(n, dim, generator=generator), torch.randn(n, dim, generator=generator), hidden, mask, generator=generator)
    size = config.image_size // (4 if kind.startswith("upsampler") else 1)
    x0 = torch.rand(2, 3, size, size, generator=generator) * 2 - 1
    diffusion = __import__("dalle2.diffusion", fromlist=["GaussianDiffusion"]).GaussianDiffusion.from_config(config.diffusion)
    if kind == "decoder":
        tokens = torch.randint(1, 1000, (2, config.text.context_length), generator=generator)
        tokens[:, 6:] = 0
        cond = {"image_embed": torch.randn(2, config.embed_dim, generator=generator), "text_tokens": tokens}
    else:
        low = size * config.low_res // config.image_size
        cond = {"low_res": torch.rand(2, 3, low, low, generator=generator) * 2 - 1}
    return diffusion.training_loss(model, x0, generator=generator, **cond).mean()


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every weight: zero-initialised output layers would otherwise hide most gradients."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of ``fn()``."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["prior", "decoder", "upsampler_256"])
def test_checkpointing_gives_the_same_loss_and_gradients(kind):
    config = with_dropout(kind, load_config(kind, "tiny"))
    plain = perturb(create_model(kind, config)).train()
    recomputed = create_model(kind, with_checkpointing(kind, config)).train()
    recomputed.load_state_dict(plain.state_dict())
    if isinstance(plain, DiffusionPrior):
        recomputed.load_embedding_stats(plain.embedding_stats())

    losses = []
    for model in (plain, recomputed):
        loss = loss_of(kind, model, seed=3)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    grads = {name: p.grad for name, p in plain.named_parameters()}
    compared = 0
    for name, p in recomputed.named_parameters():
        if grads[name] is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=f"gradient of {name}")
        compared += 1
    assert compared > 10

    # It is really on: far fewer bytes saved for backward; and off in eval mode (sampling).
    kept_plain = saved_bytes(lambda: loss_of(kind, plain, seed=3))
    kept_recomputed = saved_bytes(lambda: loss_of(kind, recomputed, seed=3))
    assert kept_recomputed < 0.6 * kept_plain, (kept_recomputed, kept_plain)
    recomputed.eval()
    assert saved_bytes(lambda: loss_of(kind, recomputed, seed=3)) == saved_bytes(lambda: loss_of(kind, plain.eval(), seed=3))
