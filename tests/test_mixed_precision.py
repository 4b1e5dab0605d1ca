"""Mixed precision touches the network only (issue 20): the forward process, the noise, the
targets, the loss and the prior's normalisation stay float32 when the network runs in bf16, as
it does under DeepSpeed's bf16 engine (weights cast, no autocast) or under autocast."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from dalle2.config import Prediction, Schedule
from dalle2.data.preprocess import preprocess_batch
from dalle2.data.shapes import shapes_table
from dalle2.diffusion import GaussianDiffusion, make_betas
from dalle2.factory import create_model
from dalle2.precision import cpu_has_native_bf16, training_autocast_dtype
from dalle2.train.config import ModelSpec, resolve_model_config
from dalle2.train.tasks import PriorLoss, make_task


class ZeroNetwork(nn.Module):
    """A bf16 'network' that outputs zeros, so the per-sample loss is exactly mean(target^2)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
        self.input_dtypes: list[torch.dtype] = []

    def forward(self, x, t, **cond):
        self.input_dtypes.append(x.dtype)
        return torch.zeros_like(x) + self.weight


def reference_v_target(process: GaussianDiffusion, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, in float64 from the schedule's float64 tables."""
    abar = process.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "bf16-autocast"])
def test_low_noise_targets_are_float32_when_the_network_runs_in_bf16(autocast):
    process = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.V)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(10, 3, 8, 8, generator=g) * 2 - 1  # what the decoder task delivers: float32
    noise = torch.randn(10, 3, 8, 8, generator=g)
    t = torch.arange(1, 11)  # the least noisy timesteps, where bf16 rounds sqrt(abar_t) to 1
    network = ZeroNetwork()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = process.training_loss(network, x0, t=t, noise=noise, input_dtype=torch.bfloat16)
    expected = reference_v_target(process, x0, noise, t).pow(2).flatten(1).mean(1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=0)  # float32 precision
    assert network.input_dtypes == [torch.bfloat16]  # only the network's input is cast

    # The same target computed in bf16 (the old forward process) is off by about sigma_t itself.
    sqrt_abar, sigma = (table[t].bfloat16().reshape(-1, 1, 1, 1) for table in (process.sqrt_alphas_cumprod, process.sqrt_one_minus_alphas_cumprod))
    in_bf16 = sqrt_abar * noise.bfloat16() - sigma * x0.bfloat16()
    errors = (in_bf16.double() - reference_v_target(process, x0, noise, t)).abs().flatten(1).amax(1)
    assert (errors > 0.1 * process.sqrt_one_minus_alphas_cumprod[t]).all()


def shapes_batch(count: int, image_size: int, context_length: int) -> dict[str, np.ndarray]:
    table = shapes_table(0, count, image_size=image_size)
    rows = {name: np.array(table[name].to_pylist(), dtype=object) for name in ("key", "caption", "image")}
    return preprocess_batch(rows, image_size=image_size, context_length=context_length)[0]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create_model("clip", "tiny")


@pytest.mark.parametrize("job, kind", [("decoder", "decoder"), ("upsampler", "upsampler_256")])
def test_image_tasks_deliver_float32_x0_and_bf16_conditions(clip, job, kind):
    config = resolve_model_config(ModelSpec(kind=kind, preset="tiny"), clip.config if job == "decoder" else None)
    task = make_task(job, kind, config, clip=clip if job == "decoder" else None)
    inputs = task.inputs(shapes_batch(4, task.image_size, task.context_length), dtype=torch.bfloat16)
    assert inputs["x0"].dtype == torch.float32
    conditions = [name for name, value in inputs.items() if name != "x0" and value.is_floating_point()]
    assert conditions and all(inputs[name].dtype == torch.bfloat16 for name in conditions)


def test_prior_normalisation_stays_float32_under_a_bf16_engine(clip):
    config = resolve_model_config(ModelSpec(kind="prior", preset="tiny"), clip.config)
    task = make_task("prior", "prior", config, clip=clip)
    batch = shapes_batch(8, task.image_size, task.context_length)
    model = task.build_model()
    task.prepare(model, [batch])
    stats = {name: value.clone() for name, value in task.extra_state(model).items()}
    loss_module = PriorLoss(model, task.extra_state(model))
    loss_module.bfloat16()  # what DeepSpeed's bf16 engine does to the module it wraps
    inputs = task.inputs(batch, dtype=torch.bfloat16)
    assert inputs["image_embed"].dtype == torch.float32 and inputs["text_embed"].dtype == torch.bfloat16
    loss = loss_module(**inputs, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    for name, value in stats.items():  # the statistics the target is normalised with: exact float32
        assert getattr(model, name).dtype == torch.float32 and torch.equal(getattr(model, name), value)
    assert model.normalize(inputs["image_embed"]).dtype == torch.float32


def test_training_autocast_is_bf16_only_where_the_cpu_computes_bf16():
    # deepspeed.autocast: auto, as the CPU job configs set it. Where bf16 is emulated (no AVX-512
    # BF16 or AMX, or oneDNN held below them) a decoder step took 20x its float32 time.
    capabilities = torch.cpu.get_capabilities()
    native = bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    if not os.environ.get("ONEDNN_MAX_CPU_ISA"):
        assert cpu_has_native_bf16() is native
    assert training_autocast_dtype("auto", "cpu") is (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert training_autocast_dtype("bf16", "cpu") is torch.bfloat16 and training_autocast_dtype("none", "cpu") is None
    with pytest.raises(ValueError, match="autocast must be none, bf16 or auto"):
        training_autocast_dtype("fp16", "cpu")
    held = subprocess.run(
        [sys.executable, "-c", "from dalle2.precision import cpu_has_native_bf16; print(cpu_has_native_bf16())"],
        env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert held.stdout.strip() == "False"  # oneDNN's ISA is fixed at its first use: a fresh process
