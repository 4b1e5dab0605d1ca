"""Samplers of a :class:`~dalle2.diffusion.GaussianDiffusion`, as generators that yield every step.

All samplers share one loop (:func:`_progressive`): predict x_0, take one update, paste the
known region (inpainting), yield a :class:`SampleStep`. They differ only in the update: DDPM's
ancestral step (Ho et al. 2020, Algorithm 2), DDIM's (Song et al. 2020, eq. 12), or the
second-order multistep DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), which
reaches DDIM's quality in fewer network evaluations. They are bound as methods of
``GaussianDiffusion``; call them as ``diffusion.ddim_sample_progressive(...)``.
Guidance and respacing are not here: they wrap the model (``ClassifierFreeGuidance``) and the
process (``GaussianDiffusion.respace``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dalle2.diffusion import GaussianDiffusion

# update(x_t, x0, t [N], i) -> x_{t-1}: the sampler-specific part of one step.
Update = Callable[[Tensor, Tensor, Tensor, int], Tensor]
# The samplers by name (k-diffusion's name for DPM-Solver++(2M)): what stage options, the CLI and
# the HTTP API accept.
Sampler = Literal["ddim", "ddpm", "dpmpp_2m"]
SAMPLERS: tuple[str, ...] = ("ddim", "ddpm", "dpmpp_2m")


@dataclass(frozen=True)
class SampleStep:
    """What the samplers yield at every step."""

    index: int  # 0..num_steps-1, in sampling order
    num_steps: int
    t: int  # original-process timestep of this step
    x: Tensor  # the new sample x_{t-1}, shape of the sample
    x0: Tensor  # the model's prediction of x_0 at this step (after clip_x0)


def gaussian_noise(shape: Sequence[int], generator: Optional[torch.Generator], device, dtype) -> Tensor:
    """N(0, I) noise drawn on the generator's device, so one seed gives one sample on any device."""
    source = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=source, dtype=torch.float32).to(device, dtype)


def paste_known(
    diffusion: GaussianDiffusion, x_prev: Tensor, known: tuple[Tensor, Tensor], i: int, generator: Optional[torch.Generator]
) -> Tensor:
    """RePaint-style inpainting (Lugmayr et al. 2022, eq. 8): after the step from index i to i-1, the
    known region (mask 1) of x_{i-1} is the known image noised to i-1 by q(x_{i-1} | x_0), and the
    image itself after the last step. mask broadcasts against x [N, ...]; soft masks blend."""
    image, mask = known
    if i == 0:
        known_prev = image
    else:
        t_prev = torch.full((x_prev.shape[0],), i - 1, dtype=torch.long, device=x_prev.device)
        known_prev = diffusion.q_sample(image, t_prev, gaussian_noise(x_prev.shape, generator, x_prev.device, x_prev.dtype))
    return mask * known_prev + (1 - mask) * x_prev


def _progressive(
    diffusion: GaussianDiffusion,
    model: Callable[..., Tensor],
    shape: Sequence[int],
    update: Update,
    *,
    noise: Optional[Tensor],
    generator: Optional[torch.Generator],
    clip_x0: Optional[float],
    known: Optional[tuple[Tensor, Tensor]],
    project_x0: Optional[Callable[[Tensor], Tensor]],
    device,
    cond: dict,
) -> Iterator[SampleStep]:
    """The loop both samplers share: from x_{T-1} = noise down to x_0, yielding each step."""
    if noise is None:
        if device is None:
            device = generator.device if generator is not None else "cpu"
        noise = gaussian_noise(shape, generator, device, torch.float32)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    x = noise.to(torch.float64 if noise.dtype == torch.float64 else torch.float32)  # the process's dtype, whatever the network's
    if known is not None:
        known = (known[0].to(x.device, x.dtype), known[1].to(x.device, x.dtype))
    num_steps = diffusion.num_timesteps
    for index, i in enumerate(range(num_steps - 1, -1, -1)):
        # no_grad per step, not around the loop: a generator suspended inside a `with` block
        # would leave gradients off in the caller's code between steps.
        with torch.no_grad():
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            x0 = diffusion.predict_x0(model(x, diffusion.model_timesteps(t), **cond), x, t).to(x.dtype)
            if project_x0 is not None:
                x0 = project_x0(x0)
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
            x = update(x, x0, t, i)
            if known is not None:
                x = paste_known(diffusion, x, known, i, generator)
        yield SampleStep(index=index, num_steps=num_steps, t=int(diffusion.timestep_map[i]), x=x, x0=x0)


def ddpm_sample_progressive(
    diffusion: GaussianDiffusion,
    model: Callable[..., Tensor],
    shape: Sequence[int],
    *,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    clip_x0: Optional[float] = None,
    known: Optional[tuple[Tensor, Tensor]] = None,
    project_x0: Optional[Callable[[Tensor], Tensor]] = None,
    device=None,
    **cond,
) -> Iterator[SampleStep]:
    """Ancestral sampling (DDPM Algorithm 2) with the posterior variance beta_tilde (DDPM eq. 7):
    x_{t-1} = mu_tilde(x_t, x0_hat) + sqrt(beta_tilde_t) z, and no noise at the last step.

    noise: x_T (its device is the sample's; the sample is float32, float64 for float64 noise, also
    for a bf16 network: see dalle2.diffusion); else drawn from `generator` on `device`.
    clip_x0: clamp the predicted x_0 to [-clip_x0, clip_x0] (images: 1.0; embeddings: None).
    known: (image, mask) for inpainting, see :func:`paste_known`.
    project_x0: applied to every predicted x_0 before clipping (guided-diffusion's ``denoised_fn``),
    e.g. :func:`dalle2.upsampler.low_res_projection`. cond goes to the model.
    """

    def update(x: Tensor, x0: Tensor, t: Tensor, i: int) -> Tensor:
        mean, _, log_variance = diffusion.q_posterior(x0, x, t)
        if i == 0:
            return mean
        return mean + (0.5 * log_variance).exp() * gaussian_noise(x.shape, generator, x.device, x.dtype)

    return _progressive(
        diffusion, model, shape, update, noise=noise, generator=generator, clip_x0=clip_x0, known=known, project_x0=project_x0,
        device=device, cond=cond,
    )  # fmt: skip


def ddim_sample_progressive(
    diffusion: GaussianDiffusion,
    model: Callable[..., Tensor],
    shape: Sequence[int],
    *,
    eta: float = 0.0,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    clip_x0: Optional[float] = None,
    known: Optional[tuple[Tensor, Tensor]] = None,
    project_x0: Optional[Callable[[Tensor], Tensor]] = None,
    device=None,
    **cond,
) -> Iterator[SampleStep]:
    """DDIM (Song et al. 2020, eq. 12):
    x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat + sigma_t z, with
    sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}) (eq. 16).

    eta = 0 is deterministic given the noise; eta = 1 is DDPM-like. eps_hat is recomputed from
    the (clipped) x0_hat. Other arguments as :func:`ddpm_sample_progressive`.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    def update(x: Tensor, x0: Tensor, t: Tensor, i: int) -> Tensor:
        eps = diffusion.predict_eps(x, t, x0)
        abar, abar_prev = float(diffusion.alphas_cumprod[i]), float(diffusion.alphas_cumprod_prev[i])
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        # 1 - abar_prev - sigma^2 >= 0 in exact arithmetic; max() guards against rounding.
        x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x_prev = x_prev + sigma * gaussian_noise(x.shape, generator, x.device, x.dtype)
        return x_prev

    return _progressive(
        diffusion, model, shape, update, noise=noise, generator=generator, clip_x0=clip_x0, known=known, project_x0=project_x0,
        device=device, cond=cond,
    )  # fmt: skip


def dpmpp_2m_sample_progressive(
    diffusion: GaussianDiffusion,
    model: Callable[..., Tensor],
    shape: Sequence[int],
    *,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    clip_x0: Optional[float] = None,
    known: Optional[tuple[Tensor, Tensor]] = None,
    project_x0: Optional[Callable[[Tensor], Tensor]] = None,
    device=None,
    **cond,
) -> Iterator[SampleStep]:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2): a second-order multistep solver of the probability-flow
    ODE in data prediction, deterministic given the noise. With alpha = sqrt(abar), sigma =
    sqrt(1 - abar), lambda = log(alpha / sigma) and h_i = lambda_{i-1} - lambda_i,

        x_{i-1} = (sigma_{i-1} / sigma_i) x_i - alpha_{i-1} (exp(-h_i) - 1) D_i,
        D_i = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i+1},   r_i = h_{i+1} / h_i,

    with D = x0_i at the first step (DDIM's update, eta = 0: the first-order solver is DDIM) and
    at the last, where sigma = 0 and the ODE ends on the prediction itself. Data prediction is
    what makes clipping, ``project_x0`` and large guidance scales stable (paper, sec. 4).

    It works on whatever process it is given, so respacing decides the timesteps (evenly spaced
    in t). ``known`` pastes the known region after every step as the other samplers do; the
    solver's history then holds predictions made from the pasted samples, which is an
    approximation (RePaint's resampling assumes a stochastic sampler). Other arguments as
    :func:`ddpm_sample_progressive`.
    """
    previous: dict[str, object] = {}  # the last step's x_0 prediction and its h

    def log_snr(abar: float) -> float:  # lambda = log(alpha / sigma) = log(abar / (1 - abar)) / 2
        return 0.5 * (math.log(abar) - math.log1p(-abar))

    def update(x: Tensor, x0: Tensor, t: Tensor, i: int) -> Tensor:
        abar, abar_next = float(diffusion.alphas_cumprod[i]), float(diffusion.alphas_cumprod_prev[i])
        if abar_next >= 1.0:  # the last step: sigma = 0, lambda = inf, the sample is the prediction
            return x0
        h = log_snr(abar_next) - log_snr(abar)
        data = x0
        if "x0" in previous and i > 1:
            r = float(previous["h"]) / h
            data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous["x0"]
        previous.update(x0=x0, h=h)
        sigma_ratio = math.sqrt((1 - abar_next) / (1 - abar))
        return sigma_ratio * x - math.sqrt(abar_next) * math.expm1(-h) * data

    return _progressive(
        diffusion, model, shape, update, noise=noise, generator=generator, clip_x0=clip_x0, known=known, project_x0=project_x0,
        device=device, cond=cond,
    )  # fmt: skip
