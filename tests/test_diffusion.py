"""Golden values for the diffusion math (closed forms from the papers) and behaviour of the samplers."""

from __future__ import annotations

import math

import pytest
import torch

from dalle2.config import DiffusionConfig, Prediction, Schedule
from dalle2.diffusion import ClassifierFreeGuidance, GaussianDiffusion, SampleStep, make_betas

SHAPES = [(3, 4), (2, 3, 4, 4)]  # a prior's [N, D] and a decoder's [N, C, H, W]


def cosine_alphas_cumprod(t: int, timesteps: int, s: float = 0.008) -> float:
    """Nichol & Dhariwal 2021 eq. 17, written out independently of the module."""
    f = lambda u: math.cos((u / timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0)


def linear_alphas_cumprod(t: int, timesteps: int) -> float:
    """prod_{i<=t} (1 - beta_i) with betas evenly spaced from 1e-4 to 0.02, scaled by 1000/T."""
    scale = 1000 / timesteps
    first, last = 1e-4 * scale, 0.02 * scale
    return math.prod(1 - (first + i * (last - first) / (timesteps - 1)) for i in range(t + 1))


def toy_model(seed: int = 0, width: int = 4):
    """A fixed random network of x and t, the same for [N, D] and [N, C, H, W] (mixes the last dim)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, width, generator=g, dtype=torch.float64) / width
    return lambda x, t, **cond: torch.tanh(x @ weight.to(x.dtype) + (t.to(x.dtype) / 1000).reshape(-1, *[1] * (x.ndim - 1)))


# -- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("timesteps", [1000, 50])
def test_cosine_betas_match_eq_17(timesteps):
    betas = make_betas(Schedule.COSINE, timesteps)
    assert betas.dtype == torch.float64 and betas.shape == (timesteps,)
    assert bool((betas > 0).all()) and bool((betas <= 0.999).all())
    assert betas[-1] == pytest.approx(0.999)  # the last beta is the clipped one
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    for t in [0, 1, timesteps // 10, timesteps // 2, (9 * timesteps) // 10]:
        # betas[t] takes abar from step t to step t+1 of the continuous schedule
        assert float(alphas_cumprod[t]) == pytest.approx(cosine_alphas_cumprod(t + 1, timesteps), rel=1e-10)


@pytest.mark.parametrize("timesteps", [1000, 250])
def test_linear_betas_match_ddpm(timesteps):
    betas = make_betas(Schedule.LINEAR, timesteps)
    scale = 1000 / timesteps
    assert float(betas[0]) == pytest.approx(1e-4 * scale) and float(betas[-1]) == pytest.approx(0.02 * scale)
    assert bool((betas > 0).all()) and bool((betas <= 0.999).all())
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    for t in [0, 7, timesteps // 2, timesteps - 1]:
        assert float(alphas_cumprod[t]) == pytest.approx(linear_alphas_cumprod(t, timesteps), rel=1e-10)


def test_from_config():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(timesteps=100, schedule=Schedule.LINEAR, prediction=Prediction.V))
    assert diffusion.num_timesteps == 100 and diffusion.prediction is Prediction.V
    assert torch.equal(diffusion.betas, make_betas(Schedule.LINEAR, 100))
    assert torch.equal(diffusion.timestep_map, torch.arange(100))


# -- the forward process -----------------------------------------------------------------------


def test_q_sample_moments_match_eq_4():
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.EPS)
    torch.manual_seed(0)
    x0 = torch.tensor([0.7, -1.3])
    for step in [10, 500, 900]:
        n = 100_000
        t = torch.full((n,), step)
        samples = diffusion.q_sample(x0.expand(n, 2), t)
        abar = cosine_alphas_cumprod(step + 1, 1000)
        expected_std = math.sqrt(1 - abar)
        torch.testing.assert_close(samples.mean(0), math.sqrt(abar) * x0, atol=4 * expected_std / math.sqrt(n) + 1e-6, rtol=0)
        torch.testing.assert_close(samples.var(0), torch.full((2,), 1 - abar), atol=0.02 * (1 - abar), rtol=0)
        mean, variance, log_variance = diffusion.q_mean_variance(x0.expand(1, 2), t[:1])
        torch.testing.assert_close(mean[0], math.sqrt(abar) * x0)
        assert float(variance[0, 0]) == pytest.approx(1 - abar, rel=1e-6)
        assert float(log_variance[0, 0]) == pytest.approx(math.log(1 - abar), rel=1e-5)


def test_q_posterior_matches_eq_7():
    betas = make_betas(Schedule.LINEAR, 100)
    diffusion = GaussianDiffusion(betas, Prediction.EPS)
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    for step in [0, 1, 50, 99]:
        beta = float(betas[step])
        abar = linear_alphas_cumprod(step, 100)
        abar_prev = linear_alphas_cumprod(step - 1, 100) if step > 0 else 1.0
        mean, variance, log_variance = diffusion.q_posterior(x0, x_t, torch.full((4,), step))
        coef_x0 = math.sqrt(abar_prev) * beta / (1 - abar)
        coef_x_t = math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
        expected_mean = coef_x0 * x0 + coef_x_t * x_t
        torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-12)
        beta_tilde = (1 - abar_prev) / (1 - abar) * beta
        torch.testing.assert_close(variance, torch.full_like(x0, beta_tilde), rtol=1e-10, atol=0)
        # the log is clipped at t=0, where beta_tilde_0 = 0, to beta_tilde_1
        beta_tilde_1 = (1 - linear_alphas_cumprod(0, 100)) / (1 - linear_alphas_cumprod(1, 100)) * float(betas[1])
        clipped = beta_tilde if step > 0 else beta_tilde_1
        torch.testing.assert_close(log_variance, torch.full_like(x0, math.log(clipped)), rtol=1e-10, atol=0)
    assert float(diffusion.posterior_variance[0]) == 0.0


@pytest.mark.parametrize("prediction", list(Prediction))
def test_training_target_round_trips_to_x0(prediction):
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), prediction)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.training_target(x0, x_t, t, noise)
    torch.testing.assert_close(diffusion.predict_x0(target, x_t, t), x0, rtol=0, atol=1e-8)
    torch.testing.assert_close(diffusion.predict_eps(x_t, t, x0), noise, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_min_snr_weighs_each_timesteps_x0_error_by_min_snr_gamma(prediction):
    """Measured as loss / ||x0 - x0_hat||^2: the plain losses weigh the x_0 error by SNR (eps),
    1 + SNR (v) and 1 (x_0); Min-SNR-gamma by min(SNR, gamma), and with a floor no timestep's
    factor on its own loss drops below it."""
    gamma, floor, betas = 5.0, 0.3, make_betas(Schedule.COSINE, 1000)
    plain, min_snr = GaussianDiffusion(betas, prediction), GaussianDiffusion(betas, prediction, min_snr_gamma=gamma)
    floored = GaussianDiffusion(betas, prediction, min_snr_gamma=gamma, min_loss_weight=floor)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    error = torch.randn(x0.shape, generator=g, dtype=torch.float64) * 0.1
    t = torch.tensor([0, 100, 300, 500, 800, 999])
    x_t = plain.q_sample(x0, t, noise)
    output = plain.training_target(x0, x_t, t, noise) + error
    model = lambda x, timesteps: output  # noqa: E731
    x0_error = (plain.predict_x0(output, x_t, t) - x0).pow(2).reshape(6, -1).mean(1)
    snr = plain.alphas_cumprod[t] / (1 - plain.alphas_cumprod[t])  # the schedule itself is checked above
    native = {Prediction.EPS: snr, Prediction.V: 1 + snr, Prediction.X0: torch.ones_like(snr)}[prediction]
    weight = lambda process: process.training_loss(model, x0, t=t, noise=noise).double() / x0_error  # noqa: E731
    torch.testing.assert_close(weight(plain), native, rtol=1e-4, atol=0)
    torch.testing.assert_close(weight(min_snr), snr.clamp(max=gamma), rtol=1e-4, atol=0)
    torch.testing.assert_close(weight(floored), torch.maximum(snr.clamp(max=gamma), floor * native), rtol=1e-4, atol=0)
    assert min_snr.respace(10).min_snr_gamma == gamma and floored.respace(10).min_loss_weight == floor
    config = DiffusionConfig(prediction=prediction, min_snr_gamma=gamma, min_loss_weight=floor)
    torch.testing.assert_close(GaussianDiffusion.from_config(config).loss_weights(t), floored.loss_weights(t))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        GaussianDiffusion(betas, prediction, min_snr_gamma=-1.0)


def test_a_process_moves_its_tables_to_a_device_once_and_survives_pickling():
    """Training and sampling index the schedule at every step: each table goes to the sample's
    device once. Ray ships processes by pickling; the copy computes the same values."""
    import pickle

    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 100), Prediction.V, min_snr_gamma=5.0, min_loss_weight=0.05)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    meta = torch.device("meta")  # a device other than the tables' own, with no memory behind it
    first = diffusion._on(diffusion.sqrt_alphas_cumprod, meta)
    assert first.device == meta and diffusion._on(diffusion.sqrt_alphas_cumprod, meta) is first
    assert diffusion.q_sample(x0.to(meta), t.to(meta), noise.to(meta)).device == meta
    copy = pickle.loads(pickle.dumps(diffusion))
    torch.testing.assert_close(copy.q_sample(x0, t, noise), diffusion.q_sample(x0, t, noise), rtol=0, atol=0)
    torch.testing.assert_close(copy.loss_weights(t), diffusion.loss_weights(t), rtol=0, atol=0)
    torch.testing.assert_close(copy.model_timesteps(t), t)
    assert copy.loss_weights(t).dtype == torch.float32 and float(copy.loss_weights(t)[-1]) == pytest.approx(0.05)


# -- respacing ---------------------------------------------------------------------------------


def test_respace_full_is_the_original():
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 200), Prediction.EPS)
    same = diffusion.respace(200)
    assert same.num_timesteps == 200
    assert torch.equal(same.timestep_map, diffusion.timestep_map)
    torch.testing.assert_close(same.betas, diffusion.betas, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(same.alphas_cumprod, diffusion.alphas_cumprod, rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 27, 64, 999])
def test_respace_keeps_alphas_cumprod(steps):
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.X0)
    spaced = diffusion.respace(steps)
    assert spaced.num_timesteps == steps and spaced.timestep_map.shape == (steps,)
    assert bool((spaced.timestep_map[1:] > spaced.timestep_map[:-1]).all())
    assert int(spaced.timestep_map[-1]) == 999  # sampling still starts from (nearly) pure noise
    torch.testing.assert_close(spaced.alphas_cumprod, diffusion.alphas_cumprod[spaced.timestep_map], rtol=1e-10, atol=1e-15)
    # respacing a respaced process composes: its map still points into the original process
    if steps >= 2:
        twice = spaced.respace(2)
        assert twice.timestep_map.tolist() == [int(spaced.timestep_map[0]), 999]
        torch.testing.assert_close(twice.alphas_cumprod, diffusion.alphas_cumprod[twice.timestep_map], rtol=1e-10, atol=1e-15)


# -- samplers ----------------------------------------------------------------------------------


def test_ddim_eta0_is_deterministic():
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.EPS).respace(10)
    model = toy_model()
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    first = diffusion.sample(model, (3, 4), noise=noise.clone())
    second = diffusion.sample(model, (3, 4), noise=noise.clone())
    assert torch.equal(first, second)
    # the same seed gives the same starting noise, hence the same sample
    seeded = [diffusion.sample(model, (3, 4), generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], first)


@pytest.mark.parametrize("shape", SHAPES)
def test_ddim_with_the_true_x0_lands_on_it(shape):
    point = torch.linspace(-0.9, 0.8, math.prod(shape[1:])).reshape(shape[1:]).expand(shape)
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.X0).respace(20)
    result = diffusion.sample(lambda x, t, **cond: point.clone(), shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(result, point)


@pytest.mark.parametrize("prediction", [Prediction.EPS, Prediction.V])
@pytest.mark.parametrize("shape", SHAPES)
def test_ddim_with_the_true_eps_or_v_lands_on_x0(prediction, shape):
    """The oracle reads original timesteps off the full process: this also checks timestep_map."""
    original = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), prediction)
    point = torch.linspace(-0.9, 0.8, math.prod(shape[1:]), dtype=torch.float64).reshape(shape[1:]).expand(shape)

    def oracle(x, t, **cond):
        return original.training_target(point, x, t, original.predict_eps(x, t, point))

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    result = original.respace(25).sample(oracle, shape, noise=noise)
    torch.testing.assert_close(result, point, rtol=0, atol=1e-9)


def test_ddpm_is_reproducible_with_a_generator():
    diffusion = GaussianDiffusion(make_betas(Schedule.LINEAR, 1000), Prediction.EPS).respace(15)
    model = toy_model(seed=1)
    runs = [diffusion.sample(model, (2, 3, 4, 4), sampler="ddpm", generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # eta > 0 DDIM draws noise too, and is reproducible the same way
    ddim = [diffusion.sample(model, (3, 4), eta=1.0, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(ddim[0], ddim[1])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_yield_every_step_with_decreasing_t(sampler):
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.EPS).respace(12)
    progressive = getattr(diffusion, f"{sampler}_sample_progressive")
    steps = list(progressive(toy_model(), (3, 4), generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 12 and all(isinstance(s, SampleStep) for s in steps)
    assert [s.index for s in steps] == list(range(12)) and {s.num_steps for s in steps} == {12}
    assert [s.t for s in steps] == diffusion.timestep_map.flip(0).tolist()
    assert all(s.x.shape == (3, 4) and s.x0.shape == (3, 4) for s in steps)
    seen = []
    generator = torch.Generator().manual_seed(0)
    final = diffusion.sample(toy_model(), (3, 4), sampler=sampler, progress=seen.append, generator=generator)
    assert [s.t for s in seen] == [s.t for s in steps]
    assert torch.equal(final, steps[-1].x)


def test_clip_x0_bounds_the_prediction():
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 100), Prediction.X0).respace(5)
    steps = list(diffusion.ddim_sample_progressive(lambda x, t, **c: 3 * torch.ones_like(x), (2, 4), clip_x0=1.0))
    assert all(float(s.x0.abs().max()) == 1.0 for s in steps)
    assert torch.equal(steps[-1].x, torch.ones(2, 4))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_project_x0_reshapes_every_prediction_before_clipping_and_decides_the_sample(sampler):
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.V).respace(10)
    target = torch.tensor([[-0.5, 0.25, 1.75, 0.0]]).expand(3, 4)
    seen = []

    def project(x0):
        seen.append(x0.clone())
        return target.clone()

    steps = list(getattr(diffusion, f"{sampler}_sample_progressive")(toy_model(), (3, 4), project_x0=project, clip_x0=1.0,
                                                                        generator=torch.Generator().manual_seed(0)))  # fmt: skip
    assert len(seen) == 10 and all(s.shape == (3, 4) for s in seen)  # called once per step with the model's x_0
    clipped = target.clamp(-1, 1)
    assert all(torch.equal(step.x0, clipped) for step in steps)  # what the sampler used: projected, then clipped
    torch.testing.assert_close(steps[-1].x, clipped)  # the last step lands on the prediction


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("shape", SHAPES)
def test_known_region_is_kept(sampler, shape):
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.EPS).respace(10)
    g = torch.Generator().manual_seed(10)
    image = torch.rand(shape, generator=g) * 2 - 1
    mask = torch.zeros(shape[-1])
    mask[: shape[-1] // 2] = 1  # keep the first half of the last dim, broadcast over the rest
    result = diffusion.sample(toy_model(), shape, sampler=sampler, known=(image, mask), generator=g)
    keep = mask.bool().expand(shape)
    assert torch.equal(result[keep], image[keep])
    assert not torch.equal(result[~keep], image[~keep])


def test_bfloat16_noise_samples_in_float32_and_float32_loss():
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.EPS).respace(8)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    result = diffusion.sample(toy_model(), noise.shape, noise=noise, clip_x0=1.0)
    assert result.dtype == torch.float32 and bool(torch.isfinite(result).all())  # the process never runs in bf16
    loss = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.EPS).training_loss(toy_model(), noise)
    assert loss.dtype == torch.float32 and loss.shape == (2,)


# -- classifier-free guidance ------------------------------------------------------------------


class TextConditioned(torch.nn.Module):
    """Toy network that reads `drop_text` like the prior does: True = use the learned null text."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(12)
        self.null_text = torch.nn.Parameter(torch.randn(4, generator=g))
        self.calls = 0

    def forward(self, x, t, *, text, drop_text, scale_by=1.0, extra=None):
        self.calls += 1
        assert extra is None and x.shape[0] == text.shape[0] == drop_text.shape[0] == t.shape[0]
        text = torch.where(drop_text[:, None], self.null_text.expand_as(text), text)
        return scale_by * torch.tanh(x + text * (1 + t[:, None] / 1000))


def test_classifier_free_guidance_matches_two_calls():
    model = TextConditioned()
    g = torch.Generator().manual_seed(13)
    x, text, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.tensor([0, 5, 999])
    keep, drop = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        cond = model(x, t, text=text, drop_text=keep, scale_by=2.0)
        uncond = model(x, t, text=text, drop_text=drop, scale_by=2.0)
        model.calls = 0
        guided = ClassifierFreeGuidance(model, scale=3.5, drop_keys=("drop_text",))
        out = guided(x, t, text=text, scale_by=2.0, extra=None)
    assert model.calls == 1  # one batched forward for both halves
    torch.testing.assert_close(out, uncond + 3.5 * (cond - uncond))
    with torch.no_grad():
        torch.testing.assert_close(ClassifierFreeGuidance(model, 1.0, ("drop_text",))(x, t, text=text, scale_by=2.0), cond)
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(model, 2.0, "drop_text")


# -- learning ----------------------------------------------------------------------------------


def test_training_loss_decreases_on_a_toy_distribution():
    """A tiny MLP learns to denoise points on a circle; the loss at fixed (x0, t, noise) drops."""
    torch.manual_seed(14)
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 100), Prediction.EPS)
    angles = torch.rand(256) * 2 * math.pi
    data = torch.stack([angles.cos(), angles.sin()], dim=1)  # [256, 2]
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2)
    )

    def model(x, t):
        return net(torch.cat([x, t[:, None].float() / 100], dim=1))

    g = torch.Generator().manual_seed(15)
    eval_t = torch.randint(0, 100, (256,), generator=g)
    eval_noise = torch.randn(256, 2, generator=g)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(diffusion.training_loss(model, data, t=eval_t, noise=eval_noise).mean())

    before = eval_loss()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(100):
        loss = diffusion.training_loss(model, data[torch.randint(0, 256, (64,), generator=g)], generator=g).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.6 * before, (before, after)  # ~0.96 -> ~0.43 here


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_one_respaced_step_samples(sampler):
    """A single step goes from pure noise to the model's x_0 (it used to raise IndexError for DDPM)."""
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 1000), Prediction.X0).respace(1)
    target = torch.full((2, 3), 0.25)
    result = diffusion.sample(lambda x, t: target.expand_as(x), (2, 3), sampler=sampler, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result, target)
