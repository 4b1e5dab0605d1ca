"""Each training task turns a pipeline batch into a loss that a plain optimizer can lower
(no Ray, no DeepSpeed), and draws its validation picture."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from dalle2.data.preprocess import preprocess_batch, to_model_images
from dalle2.data.shapes import shapes_table
from dalle2.factory import create_model
from dalle2.train.config import ModelSpec, resolve_model_config
from dalle2.train.tasks import data_resolution, make_task

STEPS = 12


def pipeline_batch(count: int, image_size: int, context_length: int) -> dict[str, np.ndarray]:
    """What a worker receives from the Ray Data pipeline (dalle2.data.ray_reader)."""
    table = shapes_table(0, count, image_size=image_size)
    rows = {name: np.array(table[name].to_pylist(), dtype=object) for name in ("key", "caption", "image")}
    batch, drops = preprocess_batch(rows, image_size=image_size, context_length=context_length)
    assert not drops
    return batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a small shared machine, OpenMP threads that spin-wait for each
    other slow these tiny models down many times over when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def frozen_clip():
    torch.manual_seed(0)
    return create_model("clip", "tiny")


def make(job: str, kind: str, clip=None):
    config = resolve_model_config(ModelSpec(kind=kind, preset="tiny"), None if clip is None else clip.config)
    task = make_task(job, kind, config, clip=clip)
    size, context = data_resolution(kind, config, None if clip is None else clip.config)
    assert (task.image_size, task.context_length) == (size, context)
    return task, pipeline_batch(8, size, context)


def overfit(task, batch) -> tuple[float, float]:
    """Loss before and after a few AdamW steps on one batch, with the same noise and timesteps
    each step (a seeded generator), so the objective is fixed and must go down."""
    torch.manual_seed(0)
    model = task.build_model()
    loss_module = task.loss_module(model)
    optimizer = torch.optim.AdamW(loss_module.parameters(), lr=2e-3)

    def loss() -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        return loss_module(**task.inputs(batch, generator=generator), generator=generator)

    first = loss().item()
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    return first, loss().item()


def test_clip_task_learns():
    task, batch = make("clip", "clip")
    first, last = overfit(task, batch)
    assert last < first * 0.8
    assert task.external_parameters(task.build_model())  # open_clip's own parameters, for ZeRO-3


def test_prior_task_estimates_statistics_and_learns(frozen_clip):
    task, batch = make("prior", "prior", frozen_clip)
    model = task.build_model()
    task.prepare(model, [batch, batch])
    with torch.no_grad():
        embeds = frozen_clip.encode_image(to_model_images(torch.from_numpy(np.array(batch["image"]))))
    torch.testing.assert_close(model.image_mean, embeds.mean(0), atol=1e-5, rtol=1e-4)
    twice = torch.cat([embeds, embeds])  # the two batches given to prepare
    torch.testing.assert_close(model.image_std, twice.std(0), atol=1e-5, rtol=1e-3)
    saved = task.extra_state(model)
    assert set(saved) == {"image_mean", "image_std"} and saved["image_mean"].dtype == torch.float32

    first, last = overfit(task, batch)
    assert last < first * 0.9
    figure = task.sample_figure(model.eval(), batch, steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert figure.size == (8 * 16, 8 * 16)  # an 8 x 8 similarity heatmap


def test_prior_task_takes_precomputed_embeddings(frozen_clip):
    """Batches of `dalle2 data embed` rows give the prior the same inputs as running the CLIP."""
    task, batch = make("prior", "prior", frozen_clip)
    from_images = task.inputs(batch)
    embedded = {
        "key": batch["key"], "tokens": batch["tokens"],
        "text_embed": from_images["text_embed"].numpy(), "image_embed": from_images["image_embed"].numpy(),
        "text_hidden": from_images["text_hidden"].half().numpy(),  # stored as float16
    }  # fmt: skip
    without_clip = make_task("prior", "prior", task.config, precomputed=True)
    from_rows = without_clip.inputs(embedded)
    for name, value in from_images.items():
        torch.testing.assert_close(from_rows[name], value, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="built for precomputed embeddings"):
        without_clip.inputs(batch)


def test_decoder_task_learns_and_draws(frozen_clip):
    task, batch = make("decoder", "decoder", frozen_clip)
    inputs = task.inputs(batch)
    assert inputs["text_tokens"].shape == (8, task.config.text.context_length)  # its own context, not CLIP's
    assert inputs["image_embed"].shape == (8, frozen_clip.config.embed_dim)
    first, last = overfit(task, batch)
    assert last < first * 0.9
    figure = task.sample_figure(task.build_model().eval(), batch, steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert figure.size[1] > figure.size[0] / 8 * 1.5  # two rows: truth and samples


def test_decoder_task_takes_precomputed_embeddings(frozen_clip):
    """The decoder on `dalle2 data embed` rows: the row's image_embed, no CLIP on the worker."""
    task, batch = make("decoder", "decoder", frozen_clip)
    from_images = task.inputs(batch)
    embedded = {**batch, "image_embed": from_images["image_embed"].numpy() + 1.0}  # not what this CLIP would say
    without_clip = make_task("decoder", "decoder", task.config, precomputed=True)
    from_rows = without_clip.inputs(embedded)
    torch.testing.assert_close(from_rows["image_embed"], from_images["image_embed"] + 1.0)  # taken, not recomputed
    torch.testing.assert_close(from_rows["x0"], from_images["x0"])
    assert torch.equal(from_rows["text_tokens"], from_images["text_tokens"])
    with pytest.raises(ValueError, match="built for precomputed embeddings"):
        without_clip.inputs(batch)
    with pytest.raises(ValueError, match="needs a frozen CLIP"):
        make_task("decoder", "decoder", task.config)


@pytest.mark.parametrize("kind", ["upsampler_256", "upsampler_1024"])
def test_upsampler_task_learns_on_crops(kind):
    task, batch = make("upsampler", kind)
    inputs = task.inputs(batch, generator=torch.Generator().manual_seed(0))
    crop = round(task.config.low_res * task.config.crop_fraction)
    assert inputs["low_res"].shape == (8, 3, crop, crop)
    high = crop * task.config.image_size // task.config.low_res
    assert inputs["x0"].shape == (8, 3, high, high)
    first, last = overfit(task, batch)
    assert last < first * 0.9


ZERO3_CLIP_SCRIPT = """
import json, os, sys
import torch
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
sys.path.insert(0, os.environ["TESTS_DIR"])
from test_train_tasks import make
from dalle2.train.config import load_job_config
from dalle2.train.loop import build_engine

task, batch = make("clip", "clip")
job = load_job_config("clip", overrides={"deepspeed": {"zero_stage": 3}, "loop": {"batch_size": 8}, "optim": {"lr": 5e-4}})
torch.manual_seed(0)
engine = build_engine(job, task, task.build_model(), world_size=1)
losses = []
for _ in range(6):
    loss = engine(**task.inputs(batch))
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
with torch.no_grad():  # the model alone (not the loss module) gathers open_clip's own parameters too
    image, text = engine.module.model(**task.inputs(batch))
print(json.dumps({"losses": losses, "features": [list(image.shape), list(text.shape)]}))
"""


def test_clip_trains_under_zero3():
    """CLIP under ZeRO-3 (one process, world size 1: parameters are still partitioned and
    gathered per module). open_clip's CLIP holds parameters that the loss reaches through
    encode_image/encode_text rather than its own forward: they must be gathered there too."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "TESTS_DIR": os.path.dirname(__file__), "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", ZERO3_CLIP_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["losses"][-1] < result["losses"][0]
    assert result["features"] == [[8, 64], [8, 64]]  # the tiny CLIP's embedding dim


def test_tasks_refuse_to_run_without_their_clip():
    config = resolve_model_config(ModelSpec(kind="prior"))
    with pytest.raises(ValueError, match="the prior task needs a frozen CLIP"):
        make_task("prior", "prior", config)


CLAMP_SCRIPT = r"""
import json, math, os, sys
import torch
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
sys.path.insert(0, os.environ["TESTS_DIR"])
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from test_train_tasks import make
from dalle2.train.config import load_job_config
from dalle2.train.loop import build_engine, clamp_parameter

stage, precision = int(sys.argv[1]), sys.argv[2]
task, batch = make("clip", "clip")
job = load_job_config("clip", overrides={"deepspeed": {"zero_stage": stage, "precision": precision}, "loop": {"batch_size": 8}})
engine = build_engine(job, task, task.build_model(), world_size=1)
(parameter, low, high), = task.clamped_parameters(engine.module.model)

def value():  # what the optimizer steps from (the fp32 master), or the parameter itself
    master = safe_get_full_fp32_param(parameter)
    return float(master.flatten()[0]) if master is not None else float(parameter.flatten()[0])

# Push the temperature far above its range, as a run whose gradient drives it up would.
if safe_get_full_fp32_param(parameter) is not None:
    safe_set_full_fp32_param(parameter, torch.full_like(safe_get_full_fp32_param(parameter), 9.0))
else:
    parameter.data.fill_(9.0)
clamp_parameter(parameter, low, high)
after_clamp = value()
for group in engine.optimizer.param_groups:
    group["lr"] = 0.0  # a step that changes nothing must not bring the old value back
loss = engine(**task.inputs(batch, next(engine.module.parameters()).dtype))
engine.backward(loss)
engine.step()
with torch.no_grad():
    scale = float(engine.module.model.logit_scale.flatten()[0])  # what the next forward uses (exp)
print(json.dumps({"after_clamp": after_clamp, "after_step": value(), "scale": scale, "high": high}))
"""


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (2, "bf16"), (3, "bf16")])
def test_clip_temperature_is_clamped_after_each_step(stage, precision):
    """open_clip keeps logit_scale in [0, ln 100] by clamping the parameter after every step; under
    DeepSpeed the fp32 master copy the optimizer steps from must be clamped too."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "TESTS_DIR": os.path.dirname(__file__), "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", CLAMP_SCRIPT, str(stage), precision], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["high"] == pytest.approx(np.log(100))
    assert result["after_clamp"] == pytest.approx(result["high"], rel=1e-6)
    assert result["after_step"] == pytest.approx(result["high"], rel=1e-6)
    assert result["scale"] == pytest.approx(100.0, rel=1e-2)  # bf16 rounding of ln 100
