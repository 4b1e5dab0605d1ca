"""The Gaussian diffusion process shared by the prior ([N, D]) and the decoders ([N, C, H, W]).

Networks never hold betas: they implement ``model(x_t, t, **cond) -> output`` where ``t`` is a
LongTensor [N] of timesteps of the *original* process (0..T-1). Everything about the noise
schedule, the training target and the samplers lives here, for any tensor shape.

References: Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (improved DDPM: cosine schedule,
respacing), Song et al. 2020 (DDIM), Salimans & Ho 2022 (v-prediction), Ho & Salimans 2022
(classifier-free guidance), Lugmayr et al. 2022 (RePaint inpainting).

Mixed precision touches the network only (as improved-diffusion's fp16_util and diffusers'
training scripts): schedule quantities are kept in float64 and used in float32 (float64 for a
float64 sample), so x_t, the noise, the target and the loss are float32 also when the network runs
in bf16. Near t = 0 sqrt(abar_t) is within bf16's spacing (about 0.004) of 1 and sigma_t is about
that size: in bf16 the least noisy targets would be partly unlearnable. The network's input is
cast to its own dtype at the call (``input_dtype``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from dalle2.config import DiffusionConfig, Prediction, Schedule
from dalle2.sampling import SAMPLERS, Sampler, SampleStep, ddim_sample_progressive, ddpm_sample_progressive, dpmpp_2m_sample_progressive, gaussian_noise

__all__ = ["ClassifierFreeGuidance", "GaussianDiffusion", "SampleStep", "even_timesteps", "make_betas", "process_dtype"]

COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal 2021 eq. 17: keeps beta_0 from being vanishingly small
MAX_BETA = 0.999  # Nichol & Dhariwal 2021: clip betas to avoid a singularity at t = T


def make_betas(schedule: Schedule, timesteps: int) -> Tensor:
    """Betas [T] (float64) of a noise schedule.

    Cosine: Nichol & Dhariwal 2021 eq. 17, abar(t) = f(t) / f(0) with
    f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2, and beta_t = 1 - abar(t+1)/abar(t) clipped at 0.999.
    Linear: Ho et al. 2020, betas from 1e-4 to 0.02 for T=1000, both ends scaled by 1000/T so
    that any T describes the same continuous process.
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    schedule = Schedule(schedule)
    if schedule is Schedule.LINEAR:
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if schedule is Schedule.COSINE:
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=MAX_BETA)
    raise ValueError(f"unknown schedule {schedule!r}")


def process_dtype(x: Tensor) -> torch.dtype:
    """The dtype the forward process and the samplers compute in for a tensor like ``x``: float32,
    or float64 when x is float64 (tests' golden values). Never bf16/fp16: see the module docstring."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def even_timesteps(num_timesteps: int, steps: int) -> Tensor:
    """`steps` evenly spaced indices of 0..num_timesteps-1 (LongTensor, increasing, ends kept).

    As improved-diffusion's ``space_timesteps`` with one section; a single step keeps the last
    timestep so that sampling still starts from pure noise.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    stride = (num_timesteps - 1) / (steps - 1)  # >= 1, so the rounded indices are distinct
    return torch.tensor([round(i * stride) for i in range(steps)])


class GaussianDiffusion:
    """A discrete Gaussian diffusion q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

    Indices ``t`` given to the methods are indices of *this* process (0..num_timesteps-1); for a
    respaced process the model receives ``timestep_map[t]``, the original timestep.
    """

    def __init__(
        self, betas: Tensor, prediction: Prediction, timestep_map: Optional[Tensor] = None, min_snr_gamma: float = 0.0, min_loss_weight: float = 0.0
    ):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.prediction = Prediction(prediction)
        if min_snr_gamma < 0 or not 0 <= min_loss_weight <= 1:
            raise ValueError(f"need min_snr_gamma >= 0 (0 = off) and min_loss_weight in [0, 1], got {min_snr_gamma}, {min_loss_weight}")
        self.min_snr_gamma, self.min_loss_weight = float(min_snr_gamma), float(min_loss_weight)
        self.num_timesteps = int(betas.shape[0])
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).flatten().cpu()
        if self.timestep_map.shape[0] != self.num_timesteps:
            raise ValueError("timestep_map needs one entry per timestep")

        # All [T], float64. Names follow DDPM's notation: abar = alphas_cumprod.
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log1p(-self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()
        # DDPM eq. 7: beta_tilde_t and the two coefficients of the posterior mean.
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # beta_tilde_0 = 0: clip the log at t=0 to beta_tilde_1 (as improved-diffusion does). A
        # one-step process has no beta_tilde_1; its only step adds no noise, so beta_0 stands in.
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else betas[:1]
        clipped = torch.cat([first, self.posterior_variance[1:]])
        self.posterior_log_variance_clipped = clipped.log()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1 - self.alphas_cumprod
        self.loss_weight_table = self._min_snr_weights()  # [T] float32, see loss_weights
        # Each table's copy on each device it was asked for: moved once, not at every step.
        self._device_tables: dict[tuple[int, torch.device], Tensor] = {}

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "GaussianDiffusion":
        """The full training process of a config (respace it to ``config.sample_steps`` for sampling)."""
        return cls(make_betas(config.schedule, config.timesteps), config.prediction, min_snr_gamma=config.min_snr_gamma, min_loss_weight=config.min_loss_weight)

    def __repr__(self) -> str:
        return f"GaussianDiffusion(num_timesteps={self.num_timesteps}, prediction={self.prediction.value})"

    def respace(self, steps: int) -> "GaussianDiffusion":
        """Keep `steps` evenly spaced timesteps (improved-diffusion, Nichol & Dhariwal 2021 sec. 4).

        The new process keeps abar at each kept step and recomputes
        beta_i = 1 - abar_{k_i} / abar_{k_{i-1}}; ``timestep_map`` sends new indices to the
        original timesteps, which is what the model receives. ``respace(T)`` is the original.
        """
        kept = even_timesteps(self.num_timesteps, steps)
        alphas_cumprod = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        return GaussianDiffusion(1 - alphas_cumprod / previous, self.prediction, self.timestep_map[kept], self.min_snr_gamma, self.min_loss_weight)

    # -- helpers -----------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        # The cache is keyed by the tables' ids, which do not survive pickling (Ray ships processes).
        return {**self.__dict__, "_device_tables": {}}

    def _on(self, table: Tensor, device: torch.device) -> Tensor:
        """One of this process's tables on ``device``, copied there once (tables never change)."""
        key = (id(table), torch.device(device))
        if key not in self._device_tables:
            self._device_tables[key] = table.to(device)
        return self._device_tables[key]

    def _at(self, table: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """table[t] on x's device in float32 (float64 for a float64 x), shaped [N, 1, ...] to
        broadcast against x: a bf16 x is promoted, never the coefficients rounded to bf16."""
        values = self._on(table, x.device)[t.to(x.device)]
        return values.to(process_dtype(x)).reshape(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Original-process timesteps [N] for indices t [N] of this process: what the network sees."""
        return self._on(self.timestep_map, t.device)[t]

    # -- the forward process -----------------------------------------------------------------

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4)."""
        mean = self._at(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = self._at(self.one_minus_alphas_cumprod, t, x0).expand_as(x0)
        log_variance = self._at(self.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0: Tensor, t: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps ~ N(0, I) (DDPM eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7).

        mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t)(1 - abar_{t-1}) / (1 - abar_t) x_t,
        variance = beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
        """
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        variance = self._at(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # -- what the network predicts -----------------------------------------------------------

    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x_0 from the network's output.

        x0: the output itself; eps: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (DDPM eq. 4
        solved for x_0); v: x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, sec. 4).
        """
        if self.prediction is Prediction.X0:
            return model_output
        if self.prediction is Prediction.EPS:
            x_t_coef, output_coef = self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod
        else:
            x_t_coef, output_coef = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        return self._at(x_t_coef, t, x_t) * x_t - self._at(output_coef, t, x_t) * model_output

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1) (DDPM eq. 4 solved for eps)."""
        numerator = self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0
        return numerator / self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def training_target(self, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network must output: x_0, eps (DDPM eq. 14) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        if self.prediction is Prediction.X0:
            return x0
        if self.prediction is Prediction.EPS:
            return noise
        return self._at(self.sqrt_alphas_cumprod, t, x_t) * noise - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x0

    def loss_weights(self, t: Tensor) -> Tensor:
        """Per-timestep factors [N] (float32) on the prediction's squared error: all 1 for the plain
        loss; with ``min_snr_gamma``, Min-SNR-gamma (Hang et al. 2023), at least ``min_loss_weight``.

        Written as a weight on ||x_0 - x0_hat||^2, the plain losses weigh a timestep by SNR_t for
        eps, 1 + SNR_t for v and 1 for x_0 (SNR_t = abar_t / (1 - abar_t)), so the eps and v losses
        spend most of their gradient on the least noisy timesteps, where only invisible detail is
        left to learn. Min-SNR-gamma weighs the x_0 error by min(SNR_t, gamma) instead: the factor
        is min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x_0.
        For v and x_0 that also shrinks the noisiest timesteps toward 0, and those place the
        objects; ``min_loss_weight`` keeps a floor under them.
        """
        return self._on(self.loss_weight_table, t.device)[t]

    def _min_snr_weights(self) -> Tensor:
        """[T] float32: :meth:`loss_weights` of every timestep (all 1 without ``min_snr_gamma``)."""
        if not self.min_snr_gamma:
            return torch.ones(self.num_timesteps, dtype=torch.float32)
        snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        plain = {Prediction.EPS: snr, Prediction.V: 1 + snr, Prediction.X0: torch.ones_like(snr)}[self.prediction]
        # (a process whose last beta is 1 has SNR 0 there: 0 / 0 would be NaN for eps)
        return (snr.clamp(max=self.min_snr_gamma) / plain.clamp_min(1e-300)).clamp(min=self.min_loss_weight).float()

    def training_loss(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        *,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        input_dtype: Optional[torch.dtype] = None,
        **cond,
    ) -> Tensor:
        """Per-sample MSE [N] between the network output and its target (DDPM Algorithm 1, L_simple),
        times :meth:`loss_weights` (all 1 unless the process has a ``min_snr_gamma``).

        t is drawn uniformly from 0..T-1 when not given. x0 is promoted to float32 (see
        :func:`process_dtype`); x_t, the noise, the target and the loss stay there, and only the
        network's input is cast, to ``input_dtype`` (the network's own dtype, e.g. bf16 under
        DeepSpeed; None = x_t's). The conditions in ``cond`` go to the network as given.
        """
        x0 = x0.to(process_dtype(x0))
        n = x0.shape[0]
        if t is None:
            source = generator.device if generator is not None else x0.device
            t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=source).to(x0.device)
        if noise is None:
            noise = gaussian_noise(x0.shape, generator, x0.device, x0.dtype)
        x_t = self.q_sample(x0, t, noise.to(x0.dtype))
        output = model(x_t.to(input_dtype or x_t.dtype), self.model_timesteps(t), **cond)
        target = self.training_target(x0, x_t, t, noise.to(x0.dtype))
        return (output.to(target.dtype) - target).pow(2).reshape(n, -1).mean(dim=1) * self.loss_weights(t).to(target.dtype)

    # -- sampling (the loops live in dalle2/sampling.py; these are the same functions as methods) --

    ddpm_sample_progressive = ddpm_sample_progressive
    ddim_sample_progressive = ddim_sample_progressive
    dpmpp_2m_sample_progressive = dpmpp_2m_sample_progressive

    def sample(
        self,
        model: Callable[..., Tensor],
        shape,
        *,
        sampler: Sampler = "ddim",
        progress: Optional[Callable[[SampleStep], None]] = None,
        **kwargs,
    ) -> Tensor:
        """Drain a progressive sampler and return the final sample, calling progress(step) at each step."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        final = None
        for step in getattr(self, f"{sampler}_sample_progressive")(model, shape, **kwargs):
            if progress is not None:
                progress(step)
            final = step.x
        return final


class ClassifierFreeGuidance:
    """A model that mixes conditional and unconditional outputs (Ho & Salimans 2022, eq. 6).

    output = uncond + scale * (cond - uncond), with both halves from ONE batched forward: the
    batch is doubled, every tensor condition with leading dim N is repeated, and each key of
    ``drop_keys`` (boolean per-sample masks the network understands, True = use its learned
    null condition) is False for the first half and True for the second.
    """

    def __init__(self, model: Callable[..., Tensor], scale: float, drop_keys: tuple[str, ...]):
        if isinstance(drop_keys, str) or not drop_keys:
            raise ValueError(f"drop_keys must be a non-empty tuple of keyword names, got {drop_keys!r}")
        self.model = model
        self.scale = float(scale)
        self.drop_keys = tuple(drop_keys)

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        n = x.shape[0]
        if self.scale == 1.0:  # uncond + 1 * (cond - uncond) = cond: skip the doubled batch
            keep = torch.zeros(n, dtype=torch.bool, device=x.device)
            return self.model(x, t, **{**cond, **{key: keep for key in self.drop_keys}})
        doubled = {
            key: torch.cat([value, value]) if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n else value
            for key, value in cond.items()
        }
        drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(x.device)
        doubled.update({key: drop for key in self.drop_keys})
        output = self.model(torch.cat([x, x]), torch.cat([t, t]), **doubled)
        conditional, unconditional = output[:n], output[n:]
        return unconditional + self.scale * (conditional - unconditional)
