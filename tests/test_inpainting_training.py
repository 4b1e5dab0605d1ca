"""Inpainting that is trained (issue 20): an inpainting decoder learns from GLIDE-style random
masks, its extra input channels get gradients, and edits use those channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2.data.preprocess import preprocess_batch
from dalle2.data.shapes import shapes_table
from dalle2.decoder import random_inpainting_masks
from dalle2.factory import create_model
from dalle2.cascade import GenerationOptions, StageOptions, UnCLIP, edit
from dalle2.train.config import ModelSpec, resolve_model_config
from dalle2.train.tasks import make_task


def test_training_masks_cover_nothing_known_boxes_and_strokes():
    masks = random_inpainting_masks(96, 32, torch.Generator().manual_seed(0))
    assert masks.shape == (96, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    known = masks.flatten(1).mean(1)
    assert (known == 0).sum() >= 16  # whole image erased: the plain decoder
    partial = known[(known > 0) & (known < 1)]
    assert len(partial) >= 48 and partial.min() < 0.6 and partial.max() > 0.9  # small and large holes
    # Box holes are rectangles; stroke holes are not: both kinds are there.
    holes = [(1 - m[0]) for m, k in zip(masks, known) if 0 < k < 1]
    rectangular = [bool(h[h.any(1)][:, h.any(0)].all()) for h in holes]
    assert any(rectangular) and not all(rectangular)
    torch.testing.assert_close(masks, random_inpainting_masks(96, 32, torch.Generator().manual_seed(0)))  # seeded


@pytest.fixture(scope="module")
def task_and_batch():
    torch.manual_seed(0)
    clip = create_model("clip", "tiny").eval()
    config = resolve_model_config(ModelSpec(kind="decoder", preset="tiny", overrides={"inpainting": True}), clip.config)
    task = make_task("decoder", "decoder", config, clip=clip)
    table = shapes_table(0, 16, image_size=task.image_size)
    rows = {name: np.array(table[name].to_pylist(), dtype=object) for name in ("key", "caption", "image")}
    batch, _ = preprocess_batch(rows, image_size=task.image_size, context_length=task.context_length)
    return clip, task, batch


def test_the_decoder_task_feeds_masked_images_and_the_channels_learn(task_and_batch):
    _, task, batch = task_and_batch
    inputs = task.inputs(batch, generator=torch.Generator().manual_seed(1))
    assert inputs["inpaint_mask"].shape == (16, 1, 32, 32) and torch.equal(inputs["inpaint_image"], inputs["x0"])
    assert 0 < inputs["inpaint_mask"].mean() < 1
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):  # the zero-initialised output layer passes no gradient back before its first step
        optimizer.zero_grad()
        task.loss_module(model)(**inputs, generator=torch.Generator().manual_seed(2)).backward()
        optimizer.step()
    weight = model.unet.input_conv.weight.grad  # [C, 3 image + 4 inpainting (+ 2 coordinates), 3, 3]
    assert weight[:, 3:7].abs().sum() > 0  # the masked image and the mask reach the loss


def test_an_edit_with_a_briefly_trained_inpainting_decoder_keeps_the_unmasked_pixels(task_and_batch):
    clip, task, batch = task_and_batch
    model = task.build_model()
    module = task.loss_module(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(3)
    for _ in range(15):
        loss = module(**task.inputs(batch, generator=g), generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pipe = UnCLIP(clip=clip, prior=None, decoder=model.eval())
    image = Image.fromarray(batch["image"][0])
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[8:24, 8:24] = 0  # repaint the middle (OpenAI's convention: transparent = paint here)
    mask = Image.fromarray(np.dstack([np.zeros((32, 32, 3), np.uint8), alpha]), "RGBA")
    (result,) = edit(pipe, image, mask, None, GenerationOptions(n=1, seed=0, decoder=StageOptions(steps=4)))
    result, original = np.asarray(result, np.int16), np.asarray(image, np.int16)
    keep = alpha == 255
    assert np.abs(result[keep] - original[keep]).max() <= 1
    assert np.abs(result[~keep] - original[~keep]).mean() > 1  # the hole was painted anew
