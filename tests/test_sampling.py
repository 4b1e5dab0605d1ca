"""DPM-Solver++(2M) against closed forms, and beside DDIM (tests/test_diffusion.py has DDIM's and DDPM's)."""

from __future__ import annotations

import math

import pytest
import torch

from dalle2.config import Prediction, Schedule
from dalle2.diffusion import ClassifierFreeGuidance, GaussianDiffusion, make_betas
from test_diffusion import SHAPES, TextConditioned, toy_model

# The Gaussian toy: data x0 ~ N(MEAN, STD^2) in every dimension.
MEAN, STD = 0.5, 0.3


def gaussian_oracle(original: GaussianDiffusion):
    """The exact network for Gaussian data, in the process's prediction type: E[x0 | x_t] =
    MEAN + a STD^2 / (a^2 STD^2 + 1 - a^2) (x_t - a MEAN) with a = sqrt(abar_t) (the Gaussian
    posterior), converted to eps or v as training targets are. t are original timesteps."""

    def model(x, t, **cond):
        abar = original.alphas_cumprod[t].to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        a = abar.sqrt()
        x0 = MEAN + a * STD**2 / (abar * STD**2 + 1 - abar) * (x - a * MEAN)
        return original.training_target(x0, x, t, original.predict_eps(x, t, x0))

    return model


def standard_noise(n: int) -> torch.Tensor:
    """[n, 1] float64 noise with empirical mean 0 and std 1 exactly. Both samplers are affine maps of
    the noise under the Gaussian oracle, so their samples' moments are then the maps' own: the
    comparison carries no Monte Carlo error."""
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (noise - noise.mean()) / noise.std()


def moments_error(process: GaussianDiffusion, oracle, sampler: str) -> tuple[float, float]:
    noise = standard_noise(4096)
    x = process.sample(oracle, noise.shape, noise=noise.clone(), sampler=sampler)
    return abs(float(x.mean()) - MEAN), abs(float(x.std()) - STD)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_dpmpp_2m_matches_a_gaussians_mean_and_variance_at_10_steps_better_than_ddim(prediction):
    original = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), prediction)
    oracle, process = gaussian_oracle(original), original.respace(10)
    dpm_mean, dpm_std = moments_error(process, oracle, "dpmpp_2m")
    ddim_mean, ddim_std = moments_error(process, oracle, "ddim")
    # Stated tolerance at 10 steps: the mean within 1e-3, the std within 0.05 (1/6 of 0.3).
    # Measured: DPM-Solver++ std error 0.046, DDIM's 0.067; both means within 2e-5.
    assert dpm_mean < 1e-3 and dpm_std < 0.05
    assert dpm_std < 0.75 * ddim_std
    # Second order: 20 steps cut its error by more than DDIM's halving (measured 0.0089 vs 0.033).
    _, dpm_std_20 = moments_error(original.respace(20), oracle, "dpmpp_2m")
    _, ddim_std_20 = moments_error(original.respace(20), oracle, "ddim")
    assert dpm_std_20 < 0.25 * dpm_std and dpm_std_20 < 0.5 * ddim_std_20


def test_dpmpp_2m_beats_ddim_on_the_linear_schedule_too():
    original = GaussianDiffusion(make_betas(Schedule.LINEAR, 1000), Prediction.EPS)
    oracle = gaussian_oracle(original)
    for steps in (10, 20):
        process = original.respace(steps)
        assert moments_error(process, oracle, "dpmpp_2m")[1] < moments_error(process, oracle, "ddim")[1]


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("shape", SHAPES)
def test_dpmpp_2m_with_the_true_x0_lands_on_it_as_ddim_does(prediction, shape):
    """An oracle that knows the one data point (a point-mass data distribution), in any prediction type."""
    original = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), prediction)
    point = torch.linspace(-0.9, 0.8, math.prod(shape[1:]), dtype=torch.float64).reshape(shape[1:]).expand(shape)

    def oracle(x, t, **cond):
        return original.training_target(point, x, t, original.predict_eps(x, t, point))

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for sampler in ("ddim", "dpmpp_2m"):
        result = original.respace(8).sample(oracle, shape, noise=noise.clone(), sampler=sampler)
        torch.testing.assert_close(result, point, rtol=0, atol=1e-9)


def test_first_order_steps_are_ddims_and_later_steps_are_not():
    """The first step has no history (first order = DDIM with eta 0), so 2 steps equal DDIM's; 3 differ."""
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.V)
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for steps, equal in ((1, True), (2, True), (6, False)):
        process = diffusion.respace(steps)
        ddim = process.sample(toy_model(), (3, 4), noise=noise.clone(), sampler="ddim")
        dpm = process.sample(toy_model(), (3, 4), noise=noise.clone(), sampler="dpmpp_2m")
        assert torch.allclose(ddim, dpm, rtol=0, atol=1e-12) is equal, steps


def test_the_same_seed_gives_the_same_sample():
    process = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.EPS).respace(7)
    runs = [process.sample(toy_model(), (2, 3, 4, 4), sampler="dpmpp_2m", generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_guidance_through_the_solver_equals_two_calls():
    """ClassifierFreeGuidance's one doubled forward gives the sample that mixing two separate calls gives."""
    network = TextConditioned()
    text = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    process = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.EPS).respace(6)
    keep, drop = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)

    def two_calls(x, t, **cond):
        conditional, unconditional = network(x, t, text=text, drop_text=keep), network(x, t, text=text, drop_text=drop)
        return unconditional + 2.5 * (conditional - unconditional)

    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    network.calls = 0
    guided = process.sample(ClassifierFreeGuidance(network, 2.5, ("drop_text",)), (3, 4), noise=noise.clone(), sampler="dpmpp_2m", text=text)
    assert network.calls == 6  # one doubled forward per step
    reference = process.sample(two_calls, (3, 4), noise=noise.clone(), sampler="dpmpp_2m")
    torch.testing.assert_close(guided, reference)


@pytest.mark.parametrize("shape", SHAPES)
def test_known_region_projection_clipping_and_steps(shape):
    process = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.EPS).respace(9)
    g = torch.Generator().manual_seed(10)
    image = torch.rand(shape, generator=g) * 2 - 1
    mask = torch.zeros(shape[-1])
    mask[: shape[-1] // 2] = 1
    steps = list(process.dpmpp_2m_sample_progressive(toy_model(), shape, known=(image, mask), clip_x0=0.5, generator=g))
    assert [s.t for s in steps] == process.timestep_map.flip(0).tolist() and [s.index for s in steps] == list(range(9))
    keep = mask.bool().expand(shape)
    assert torch.equal(steps[-1].x[keep], image[keep]) and not torch.equal(steps[-1].x[~keep], image[~keep])
    assert all(float(s.x0.abs().max()) <= 0.5 for s in steps)
    target = torch.full(shape, 0.25)
    projected = process.sample(toy_model(), shape, sampler="dpmpp_2m", project_x0=lambda x0: target.clone(), generator=g)
    torch.testing.assert_close(projected, target)


def test_unknown_sampler_is_refused():
    process = GaussianDiffusion(make_betas(Schedule.COSINE, 100), Prediction.EPS).respace(3)
    with pytest.raises(ValueError, match="dpmpp_2m"):
        process.sample(toy_model(), (2, 4), sampler="euler")
