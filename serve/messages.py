"""What the deployments hand each other, and the request's noise source that travels with it.

The ingress chains the stages by passing each stage's ``DeploymentResponse`` straight into the
next stage's call, so these objects go from replica to replica (Ray's object store) and never
through the ingress, except the last one. Tensors are on the CPU between stages.

    TextEncoder   -> EncodedText (prompt rows)  -> Prior   -> Latents
    ImageEncoder  -> Latents                               -> Decoder -> Pixels -> Upsampler.. -> Pixels

Noise: a request's seed seeds one ``torch.Generator`` that the stages use in turn, exactly as
``dalle2.cascade`` threads one generator through the stages of a call. Each stage sends the
generator's state along with its output; the next stage resumes from it. So an image made over
HTTP is the image ``text_to_image`` (or ``variations``, ``edit``) makes in-process from the same
seed, and batching several requests never mixes their noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from dalle2.clip import TextEncoding
from dalle2.cascade import StageOptions


def stage_generator(seed: int, state: Optional[Tensor]) -> torch.Generator:
    """The request's generator: resumed from the state the previous stage sent, else seeded.

    Always a CPU generator (the samplers draw on the generator's device and move the noise), so
    a seed gives the same images whatever device each stage runs on."""
    generator = torch.Generator(device="cpu")
    if state is None:
        generator.manual_seed(seed)
    else:
        generator.set_state(state)
    return generator


@dataclass(frozen=True)
class StageTiming:
    """How one stage served one request (shown in the ``Server-Timing`` response header)."""

    stage: str  # "text_encoder", "prior", "decoder", "upsampler_256", ...
    replica: str  # the Serve replica id: proves which deployment replica did the work
    seconds: float
    batch_requests: int  # requests in the batch this one was part of
    forwards: int  # network forward passes that batch ran (shared by its requests)


@dataclass
class EncodedText:
    """CLIP text encoding of one prompt: rows [1, ...] of ``TextEncoding`` and its token ids [1, L]."""

    text: TextEncoding
    tokens: Tensor
    timings: tuple[StageTiming, ...] = ()


@dataclass
class Latents:
    """CLIP image embeddings for the decoder: [N, D], the caption's tokens [N, L] (None when the
    embedding came from an image), the generator state after the stage that made them."""

    image_embeds: Tensor
    text_tokens: Optional[Tensor]
    rng_state: Optional[Tensor]
    timings: tuple[StageTiming, ...] = ()


@dataclass
class Pixels:
    """Images [N, 3, S, S] in [-1, 1] and the generator state after the stage that made them."""

    images: Tensor
    rng_state: Tensor
    timings: tuple[StageTiming, ...] = ()


@dataclass(frozen=True)
class PriorJob:
    """``draws`` embeddings from the prior for one prompt, each then repeated ``copies`` times:
    text-to-image draws n (``text_to_image``), an edit draws 1 and repeats it n times (``edit``)."""

    seed: int
    options: StageOptions
    draws: int = 1
    copies: int = 1


@dataclass(frozen=True)
class DiffusionJob:
    """Options of one request at a decoder or upsampler stage. ``known`` (edits): the image and the
    mask (transparent = repaint) as PIL images; the decoder cuts them to its own size."""

    seed: int
    options: StageOptions
    known: Optional[tuple] = field(default=None)
