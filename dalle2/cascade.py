"""The unCLIP pipeline (DALL-E 2, Fig. 2): caption -> CLIP text -> prior -> decoder -> upsamplers.

One explicit chain of plain functions. The CLI, the tests and the Ray Serve deployments
(one deployment per stage) call the same stage functions:

    encode_prompts      CLIP text encoder: tokens, text embedding, per-token states
    sample_image_embeds the prior, best of 2 per caption, classifier-free guidance
    decode              the decoder at its base resolution (64x64 in the paper)
    upsample            the upsampler cascade up to the asked size

and the uses of section 3 of the paper are built from them: :func:`text_to_image`,
:func:`variations`, :func:`interpolations`, :func:`text_diff`, :func:`edit`. Every
stage runs all images of a request (n per prompt, several prompts) as one batch, and
guidance's doubled batch is one forward.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from dalle2.bundle import Bundle, load_bundle
from dalle2.clip import Clip, TextEncoding
from dalle2.data.storage import list_files, relative_path
from dalle2.decoder import Decoder
from dalle2.diffusion import ClassifierFreeGuidance, GaussianDiffusion
from dalle2.images import InvalidInput, edit_mask, image_to_tensor, tensor_to_images
from dalle2.precision import Precision, inference_precision, resolve_precision
from dalle2.prior import DiffusionPrior
from dalle2.sampling import SAMPLERS, Sampler, SampleStep
from dalle2.upsampler import Upsampler, low_res_projection

# progress(stage name, step): "prior", "decoder", "upsampler_256", ...
Progress = Callable[[str, SampleStep], None]
MAX_IMAGES = 10  # per request, as OpenAI's Images API


@dataclass(frozen=True)
class StageOptions:
    steps: Optional[int] = None  # None = the model config's sample_steps (paper: 64 prior, 27/15 upsamplers)
    guidance_scale: float = 1.0
    sampler: Sampler = "ddim"  # dalle2.sampling.SAMPLERS: "ddim", "ddpm" or "dpmpp_2m" (DPM-Solver++(2M))


# What dalle2 generate, the HTTP API, the demo and dalle2 eval use unless told otherwise: DPM-Solver++(2M)
# (README, "Fewer steps"). The earlier defaults were DDIM at each model's own sample_steps (32 prior,
# 25 decoder, 27 upsampler in the tiny preset). Chosen by the `python -m dalle2.eval.sweep` of the
# demo's bundles (docs/sampler-sweep/, 192 held-out captions): 10 + 10 + 10 is the fewest evaluations
# whose all-three-right rate, CLIP score and CLIP-feature FID are all within 2 noise units of DDIM
# 25 + 25 + 25; 6 + 6 is not (CLIP score -0.039).
DEFAULT_PRIOR = StageOptions(steps=10, guidance_scale=1.0, sampler="dpmpp_2m")
DEFAULT_DECODER = StageOptions(steps=10, guidance_scale=3.0, sampler="dpmpp_2m")
DEFAULT_UPSAMPLER = StageOptions(steps=10, guidance_scale=1.0, sampler="dpmpp_2m")


@dataclass(frozen=True)
class GenerationOptions:
    n: int = 1  # images per prompt / per input image
    seed: Optional[int] = None
    size: Optional[int] = None  # output side; None = as far as the cascade reaches
    prior: StageOptions = DEFAULT_PRIOR
    decoder: StageOptions = DEFAULT_DECODER
    upsampler: StageOptions = DEFAULT_UPSAMPLER
    low_res_consistency: bool = True  # upsamplers keep the colors and layout of the image below them
    precision: Optional[Precision] = None  # the networks' precision; None = bf16 on CUDA, fp32 on CPU (dalle2.precision)


@dataclass
class UnCLIP:
    """The loaded cascade. Upsamplers are ordered by resolution; each starts where the last ends."""

    clip: Clip
    prior: Optional[DiffusionPrior]
    decoder: Decoder
    upsamplers: list[Upsampler] = field(default_factory=list)

    def __post_init__(self):
        size = self.decoder.config.image_size
        for upsampler in self.upsamplers:
            if upsampler.config.low_res != size:
                raise ValueError(f"upsampler {upsampler.config.low_res}->{upsampler.config.image_size} does not follow a {size}px stage")
            size = upsampler.config.image_size

    @property
    def sizes(self) -> list[int]:
        return [self.decoder.config.image_size] + [u.config.image_size for u in self.upsamplers]

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @classmethod
    def from_bundles(cls, folder: str, device: torch.device | str = "cpu") -> "UnCLIP":
        """Load every bundle in the subfolders of ``folder`` (local path, file:// or s3://):
        one clip and one decoder, an optional prior, and any upsamplers."""
        by_kind = {kind: [bundle.model for bundle in bundles] for kind, bundles in load_bundles(folder, device).items()}
        for needed in ("clip", "decoder", "prior"):
            if len(by_kind.get(needed, [])) > 1:
                raise ValueError(f"{folder}: more than one {needed} bundle")
        for needed in ("clip", "decoder"):
            if needed not in by_kind:
                raise FileNotFoundError(f"{folder}: no {needed} bundle (a cascade needs clip and decoder)")
        upsamplers = sorted(by_kind.get("upsampler", []), key=lambda u: u.config.image_size)
        return cls(by_kind["clip"][0], by_kind.get("prior", [None])[0], by_kind["decoder"][0], upsamplers)


def load_bundles(folder: str, device: torch.device | str = "cpu") -> dict[str, list[Bundle]]:
    """The bundles in the subfolders of ``folder``, by kind without its size suffix:
    {"clip": [...], "prior": [...], "decoder": [...], "upsampler": [...]}."""
    by_kind: dict[str, list[Bundle]] = {}
    for config_file in list_files(folder, "/config.json"):
        if relative_path(folder, config_file).count("/") != 1:
            continue  # only bundles directly below the folder
        bundle = load_bundle(config_file.rsplit("/", 1)[0], device=device)
        by_kind.setdefault(bundle.kind.split("_")[0], []).append(bundle)
    return by_kind


def _generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _stage_progress(progress: Optional[Progress], stage: str) -> Optional[Callable[[SampleStep], None]]:
    return None if progress is None else (lambda step: progress(stage, step))


def check_options(pipe: UnCLIP, options: GenerationOptions) -> int:
    """Validate a request's options against the loaded cascade; returns the output size."""
    if not 1 <= options.n <= MAX_IMAGES:
        raise InvalidInput(f"n must be between 1 and {MAX_IMAGES}, got {options.n}", "n")
    size = options.size or pipe.sizes[-1]
    if size not in pipe.sizes:
        raise InvalidInput(f"size {size} is not one this cascade produces; choose one of {pipe.sizes}", "size")
    for name, stage in (("prior", options.prior), ("decoder", options.decoder), ("upsampler", options.upsampler)):
        if stage.steps is not None and not 1 <= stage.steps <= 1000:
            raise InvalidInput(f"{name} steps must be between 1 and 1000, got {stage.steps}", f"{name}_steps")
        if not 0 <= stage.guidance_scale <= 50:
            raise InvalidInput(f"{name} guidance scale must be between 0 and 50", f"{name}_guidance_scale")
        if stage.sampler not in SAMPLERS:
            raise InvalidInput(f"{name} sampler must be one of {', '.join(SAMPLERS)}, got {stage.sampler!r}", f"{name}_sampler")
    if options.upsampler.guidance_scale != 1.0:
        # DALL-E 2's upsamplers see no text and were never trained with a dropped condition
        # (section 2.1): there is no unconditional model to guide away from.
        raise InvalidInput("the upsamplers take no guidance (they are not text-conditioned): leave it at 1", "upsampler_guidance_scale")
    return size


# --- stages ------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(clip: Clip, prompts: Sequence[str]) -> tuple[TextEncoding, torch.Tensor]:
    """CLIP text encoding of the prompts and their token ids. Prompts longer than CLIP's
    context are truncated to it (CLIP's own behaviour); empty prompts are an error."""
    if not prompts or any(not p or not p.strip() for p in prompts):
        raise InvalidInput("prompt must be a non-empty string", "prompt")
    tokens = clip.tokenize(list(prompts)).to(next(clip.parameters()).device)
    text = clip.encode_text(tokens)  # float32 out also under autocast: the later stages' conditions and scores
    return TextEncoding(text.embed.float(), text.hidden.float(), text.mask), tokens


@torch.no_grad()
def sample_image_embeds(
    prior: DiffusionPrior, text: TextEncoding, options: StageOptions, generator: torch.Generator, progress=None
) -> torch.Tensor:
    """CLIP image embeddings [N, D], one per row of ``text`` (best of the prior's candidates)."""
    return prior.sample(
        text.embed,
        text.hidden,
        text.mask,
        steps=options.steps,
        guidance_scale=options.guidance_scale,
        sampler=options.sampler,
        generator=generator,
        progress=progress,
    )


@torch.no_grad()
def decode(
    decoder: Decoder,
    image_embeds: torch.Tensor,  # [N, D]
    text_tokens: Optional[torch.Tensor],  # [N, L] (any tokenizer context; re-cut to the decoder's) or None
    options: StageOptions,
    generator: torch.Generator,
    progress=None,
    known: Optional[tuple[torch.Tensor, torch.Tensor]] = None,  # (image [N,3,H,W], keep mask [N,1,H,W]) for edits
) -> torch.Tensor:
    """Images [N, 3, S, S] in [-1, 1] at the decoder's resolution."""
    config = decoder.config
    n, size = image_embeds.shape[0], config.image_size
    # The caption encoder and the embedding's projections, once per request (not once per step).
    cond = decoder.encode_conditions(image_embeds, _fit_tokens(text_tokens, config.text.context_length))
    sampler_known = known
    if known is not None and config.inpainting:
        # The decoder was trained to inpaint (GLIDE): it sees the known pixels as input channels and
        # paints around them itself; RePaint's pasting is for decoders trained without them.
        cond.update(inpaint_image=known[0], inpaint_mask=known[1])
        sampler_known = None
    model = decoder if options.guidance_scale == 1.0 else ClassifierFreeGuidance(decoder, options.guidance_scale, decoder.drop_keys)
    process = GaussianDiffusion.from_config(config.diffusion).respace(options.steps or config.diffusion.sample_steps)
    return process.sample(
        model, (n, 3, size, size), sampler=options.sampler, generator=generator, clip_x0=1.0, known=sampler_known,
        progress=progress, device=image_embeds.device, **cond,
    )  # fmt: skip


@torch.no_grad()
def upsample(
    upsamplers: Sequence[Upsampler], images: torch.Tensor, size: int, options: StageOptions, generator: torch.Generator,
    progress: Optional[Progress] = None, low_res_consistency: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Run the cascade from ``images``' size up to ``size`` (a size the cascade reaches).

    With ``low_res_consistency`` every predicted x_0 is projected onto the images whose area
    downsampling is the stage's input (:func:`~dalle2.upsampler.low_res_projection`): an
    upsampler adds detail but cannot change colors or layout. Off, it samples freely, as the paper's.
    """
    for upsampler in upsamplers:
        config = upsampler.config
        if images.shape[-1] >= size:
            break
        process = GaussianDiffusion.from_config(config.diffusion).respace(options.steps or config.diffusion.sample_steps)
        images = process.sample(
            upsampler, (images.shape[0], 3, config.image_size, config.image_size), sampler=options.sampler, generator=generator, clip_x0=1.0,
            low_res=images, device=images.device, progress=_stage_progress(progress, f"upsampler_{config.image_size}"),
            project_x0=low_res_projection(images) if low_res_consistency else None,
        )  # fmt: skip
    return images


def _fit_tokens(tokens: Optional[torch.Tensor], length: int) -> Optional[torch.Tensor]:
    """Token ids re-cut to ``length``: pad with 0, or truncate keeping the end-of-text token last."""
    if tokens is None or tokens.shape[1] == length:
        return tokens
    if tokens.shape[1] < length:
        return F.pad(tokens, (0, length - tokens.shape[1]))
    cut = tokens[:, :length].clone()
    truncated = tokens[:, length:].ne(0).any(dim=1)
    cut[truncated, -1] = tokens.max()  # the end-of-text id is the largest id
    return cut


# --- uses of the model (DALL-E 2, section 3) ----------------------------------------------


def _networks_in_precision(use: Callable) -> Callable:
    """Run a use of the model (its ``pipe`` and ``options`` arguments) with every network in
    ``options.precision`` (:func:`dalle2.precision.inference_precision`); the samplers stay float32."""
    signature = inspect.signature(use)

    @functools.wraps(use)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        pipe, options = bound.arguments["pipe"], bound.arguments["options"]
        try:
            resolve_precision(options.precision, pipe.device)
        except ValueError as error:
            raise InvalidInput(str(error), "precision") from None
        with inference_precision(options.precision, pipe.device):
            return use(*args, **kwargs)

    return run


def _finish(pipe: UnCLIP, images: torch.Tensor, size: int, options: GenerationOptions, generator, progress) -> list[Image.Image]:
    return tensor_to_images(upsample(pipe.upsamplers, images, size, options.upsampler, generator, progress, options.low_res_consistency))


@_networks_in_precision
def text_to_image(pipe: UnCLIP, prompts: Sequence[str], options: GenerationOptions = GenerationOptions(), progress: Optional[Progress] = None) -> list[Image.Image]:
    """``options.n`` images per prompt, prompt-major order."""
    if pipe.prior is None:
        raise ValueError("text-to-image needs a prior bundle")
    size = check_options(pipe, options)
    generator = _generator(options.seed, pipe.device)
    text, tokens = encode_prompts(pipe.clip, prompts)
    text = TextEncoding(*(x.repeat_interleave(options.n, dim=0) for x in (text.embed, text.hidden, text.mask)))
    tokens = tokens.repeat_interleave(options.n, dim=0)
    embeds = sample_image_embeds(pipe.prior, text, options.prior, generator, _stage_progress(progress, "prior"))
    images = decode(pipe.decoder, embeds, tokens, options.decoder, generator, _stage_progress(progress, "decoder"))
    return _finish(pipe, images, size, options, generator, progress)


@torch.no_grad()
def image_embeds_of(pipe: UnCLIP, images: Sequence[Image.Image]) -> torch.Tensor:
    """CLIP image embeddings [N, D] of PIL images (converted to RGB, center-cropped: see dalle2.images)."""
    size = pipe.clip.config.image_size
    batch = torch.cat([image_to_tensor(image, size) for image in images]).to(pipe.device)
    return pipe.clip.encode_image(batch).float()


@_networks_in_precision
def variations(pipe: UnCLIP, images: Sequence[Image.Image], options: GenerationOptions = GenerationOptions(), progress: Optional[Progress] = None) -> list[Image.Image]:
    """Paper section 3.1: decode each image's CLIP embedding with fresh noise (no caption)."""
    size = check_options(pipe, options)
    generator = _generator(options.seed, pipe.device)
    embeds = image_embeds_of(pipe, images).repeat_interleave(options.n, dim=0)
    decoded = decode(pipe.decoder, embeds, None, options.decoder, generator, _stage_progress(progress, "decoder"))
    return _finish(pipe, decoded, size, options, generator, progress)


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between embeddings [N, D] (paper section 3.2), norm interpolated linearly."""
    a_unit, b_unit = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    theta = torch.arccos((a_unit * b_unit).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    direction = (torch.sin((1 - weight) * theta) * a_unit + torch.sin(weight * theta) * b_unit) / torch.sin(theta)
    return direction * torch.lerp(a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True), weight)


@_networks_in_precision
def interpolations(
    pipe: UnCLIP, image_a: Image.Image, image_b: Image.Image, weights: Sequence[float] = (0, 0.25, 0.5, 0.75, 1),
    options: GenerationOptions = GenerationOptions(), progress: Optional[Progress] = None,
) -> list[Image.Image]:  # fmt: skip
    """Images along the slerp between two images' CLIP embeddings, one per weight, one shared
    noise (same seed for every row, as the paper's Fig. 4 fixes the decoder noise)."""
    size = check_options(pipe, options)
    a, b = image_embeds_of(pipe, [image_a, image_b]).chunk(2)
    embeds = torch.cat([slerp(a, b, w) for w in weights])
    return _decode_shared_noise(pipe, embeds, size, options, progress)


@_networks_in_precision
def text_diff(
    pipe: UnCLIP, image: Image.Image, from_caption: str, to_caption: str, amounts: Sequence[float] = (0, 0.25, 0.5),
    options: GenerationOptions = GenerationOptions(), progress: Optional[Progress] = None,
) -> list[Image.Image]:  # fmt: skip
    """Paper section 3.3: move the image embedding toward the normalised difference of two text
    embeddings (slerp toward z_d = norm(z_t - z_t0)) by each amount. CLIP's embeddings are
    compared on the unit sphere, so each text embedding is normalised before the difference is
    taken: otherwise the longer of the two would decide its direction."""
    size = check_options(pipe, options)
    (embed,) = image_embeds_of(pipe, [image])
    text, _ = encode_prompts(pipe.clip, [from_caption, to_caption])
    unit = F.normalize(text.embed, dim=-1)
    difference = F.normalize(unit[1] - unit[0], dim=-1) * embed.norm()
    embeds = torch.cat([slerp(embed[None], difference[None], a) for a in amounts])
    return _decode_shared_noise(pipe, embeds, size, options, progress)


def _decode_shared_noise(pipe: UnCLIP, embeds: torch.Tensor, size: int, options: GenerationOptions, progress) -> list[Image.Image]:
    seed = options.seed if options.seed is not None else int(torch.randint(0, 2**31, (1,)))
    images = []
    for embed in embeds:  # one row at a time with the same seed = the same noise for each
        generator = _generator(seed, pipe.device)
        decoded = decode(pipe.decoder, embed[None], None, options.decoder, generator, _stage_progress(progress, "decoder"))
        images += _finish(pipe, decoded, size, options, generator, progress)
    return images


@_networks_in_precision
def edit(
    pipe: UnCLIP, image: Image.Image, mask: Image.Image, prompt: Optional[str] = None,
    options: GenerationOptions = GenerationOptions(), progress: Optional[Progress] = None,
) -> list[Image.Image]:  # fmt: skip
    """Inpainting: repaint where the mask is transparent (OpenAI's convention), keep the rest.

    With a prompt, the prior turns it into the image embedding to paint toward; without
    one, the image's own CLIP embedding is used. A decoder trained with inpainting channels
    sees the known pixels as input channels; a decoder without them gets them pasted in at every
    step (RePaint, Lugmayr et al. 2022). Kept pixels are restored exactly at the output size."""
    size = check_options(pipe, options)
    generator = _generator(options.seed, pipe.device)
    base = pipe.decoder.config.image_size
    keep = edit_mask(mask, image, base).to(pipe.device)
    known = image_to_tensor(image, base).to(pipe.device)
    n = options.n
    if prompt is not None:
        if pipe.prior is None:
            raise ValueError("edits with a prompt need a prior bundle")
        text, tokens = encode_prompts(pipe.clip, [prompt])
        embeds = sample_image_embeds(pipe.prior, text, options.prior, generator, _stage_progress(progress, "prior"))
        tokens = tokens.repeat_interleave(n, dim=0)
    else:
        embeds, tokens = image_embeds_of(pipe, [image]), None
    embeds = embeds.repeat_interleave(n, dim=0)
    known_batch = (known.expand(n, -1, -1, -1), keep.expand(n, -1, -1, -1))
    decoded = decode(pipe.decoder, embeds, tokens, options.decoder, generator, _stage_progress(progress, "decoder"), known=known_batch)
    final = upsample(pipe.upsamplers, decoded, size, options.upsampler, generator, progress, options.low_res_consistency)
    # Restore the kept pixels exactly at the output resolution (an inpainting decoder keeps them
    # only approximately; RePaint's pasting keeps them at the decoder's size alone).
    keep_full = edit_mask(mask, image, final.shape[-1]).to(final)
    final = keep_full * image_to_tensor(image, final.shape[-1]).to(final) + (1 - keep_full) * final
    return tensor_to_images(final)

