"""Per-stage sampling options as ``dalle2 eval`` and its sweep take them on the command line:
``--steps 25`` (every stage) or ``--steps prior=16,decoder=25`` (any subset), the same for ``--sampler``;
what is not given is ``dalle2 generate``'s default for the stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from dalle2.cascade import GenerationOptions, StageOptions
from dalle2.sampling import SAMPLERS

STAGES = ("prior", "decoder", "upsampler")


def _per_stage(text: str, convert: Callable[[str], Any], what: str, example: str) -> dict[str, Any]:
    """``"V"`` (every stage) or ``"prior=V,decoder=V,upsampler=V"`` (any subset) -> {stage: value}."""
    if not text.strip():
        return {}
    try:
        if "=" not in text:
            value = convert(text.strip())
            return {stage: value for stage in STAGES}
        values = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            if name.strip() not in STAGES:
                raise ValueError(name)
            values[name.strip()] = convert(value.strip())
        return values
    except ValueError:
        raise ValueError(f"bad {what} {text!r}: give {example}, or prior={example},decoder={example},upsampler={example}") from None


def _steps_number(text: str) -> int:
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def _sampler_name(text: str) -> str:
    if text not in SAMPLERS:
        raise ValueError(text)
    return text


@dataclass(frozen=True)
class Steps:
    """Sampling steps per diffusion stage; None = dalle2 generate's default (dalle2.cascade.GenerationOptions)."""

    prior: Optional[int] = None
    decoder: Optional[int] = None
    upsampler: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "Steps":
        """``"25"`` (every stage) or ``"prior=16,decoder=25,upsampler=10"`` (any subset)."""
        return cls(**_per_stage(text, _steps_number, "steps", "N"))


@dataclass(frozen=True)
class Samplers:
    """Sampler per diffusion stage (dalle2.sampling.SAMPLERS); None = dalle2 generate's default."""

    prior: Optional[str] = None
    decoder: Optional[str] = None
    upsampler: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "Samplers":
        """``"dpmpp_2m"`` (every stage) or ``"prior=ddim,decoder=dpmpp_2m"`` (any subset)."""
        return cls(**_per_stage(text, _sampler_name, "sampler", "|".join(SAMPLERS)))


def stage_options(name: str, steps: Steps, samplers: Samplers, guidance: float) -> StageOptions:
    """A stage's options: what was asked, else dalle2 generate's default for the stage."""
    default = getattr(GenerationOptions(), name)
    asked_steps, asked_sampler = getattr(steps, name), getattr(samplers, name)
    return StageOptions(default.steps if asked_steps is None else asked_steps, guidance, asked_sampler or default.sampler)
