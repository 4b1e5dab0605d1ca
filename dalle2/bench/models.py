"""``dalle2 bench models``: size, training throughput and sampling latency of each model of a preset.

For every model (CLIP, prior, decoder, upsamplers) on synthetic data of the right shapes:

- parameters;
- one training step (forward, backward, AdamW step) timed ``repeats`` times: items per second,
  images for the image models, CLIP image embeddings for the prior;
- one inference call timed the same way: ``sample_steps`` DDIM steps of the diffusion models
  (with classifier-free guidance on for the prior and the decoder), encoding for CLIP.

Then, unless told not to, the side-by-side comparisons with the peers of
:mod:`dalle2.bench.comparisons`. Every figure comes with the exact config it was measured with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import nn

from dalle2.bench import BENCH_KINDS, BENCH_PRESETS
from dalle2.bench.timing import interleaved, machine_info, summary
from dalle2.config import to_dict

# Guidance on in the sampled stages, at diffusers' UnCLIPPipeline defaults (its value does not
# change the cost, only that it is not 1: the batch is doubled).
PRIOR_GUIDANCE = 4.0
DECODER_GUIDANCE = 8.0
CAPTIONS = (
    "a red cube on a wooden table",
    "a corgi wearing sunglasses on the beach",
    "an oil painting of a lighthouse at dusk",
    "two blue spheres and a green cone",
)
PeerMode = Literal["none", "params", "architecture", "both"]


@dataclass(frozen=True)
class BenchSettings:
    preset: str = "tiny"
    batch: int = 8  # training batch
    sample_batch: int = 2  # images (captions) per sampling call
    sample_steps: int = 25  # DDIM steps of every sampling call
    repeats: int = 5  # timed calls per figure (medians reported)
    warmup: int = 1  # untimed calls first
    seed: int = 0
    kinds: tuple[str, ...] = BENCH_KINDS
    compare_size: int = 64  # image side of the peer comparisons (the paper's decoder: 64x64)

    def __post_init__(self):
        if self.preset not in BENCH_PRESETS:
            raise ValueError(f"bench presets are {', '.join(BENCH_PRESETS)}; got {self.preset!r}")
        if min(self.batch, self.sample_batch, self.sample_steps, self.repeats) < 1 or self.warmup < 0:
            raise ValueError("batch, sample_batch, sample_steps and repeats must be >= 1, warmup >= 0")
        unknown = set(self.kinds) - set(BENCH_KINDS)
        if unknown:
            raise ValueError(f"unknown model kinds {sorted(unknown)}; choose from {', '.join(BENCH_KINDS)}")


@dataclass
class Workload:
    """One model's benchmark: a training step and an inference call on ready-made inputs."""

    model: nn.Module
    config: dict
    train_step: Callable[[], object]
    train_items: int  # items one training step consumes
    train_unit: str  # "images/s", "embeddings/s"
    train_what: str
    infer: Callable[[], object]
    infer_what: str


def captions(n: int) -> list[str]:
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def optimizer_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One training step: zero grads, loss, backward, AdamW step (its cost is part of training)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    return step


def images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 3, size, size] in [-1, 1]."""
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


# -- one workload per model kind ---------------------------------------------------------------


def clip_workload(preset: str, settings: BenchSettings, generator: torch.Generator) -> Workload:
    import open_clip

    from dalle2.clip_loss import ContrastiveLoss
    from dalle2.factory import create_model, load_config

    config = load_config("clip", preset)
    clip = create_model("clip", config)
    batch, small = settings.batch, settings.sample_batch
    pixels = images(batch, config.image_size, generator)
    tokens = clip.tokenize(captions(batch))
    loss = ContrastiveLoss()

    def infer() -> None:
        clip.eval()
        with torch.no_grad():
            clip.encode_text(tokens[:small])
            clip.encode_image(pixels[:small])

    return Workload(
        clip, {**to_dict(config), "open_clip": open_clip.get_model_config(config.model_name)},
        optimizer_step(clip, lambda: loss(*clip(pixels, tokens), clip.logit_scale)), batch, "images/s",
        f"contrastive loss on {batch} image-caption pairs at {config.image_size}px",
        infer, f"encode {small} captions + {small} images",
    )  # fmt: skip


def prior_workload(preset: str, settings: BenchSettings, generator: torch.Generator) -> Workload:
    from dalle2.clip import tokenize
    from dalle2.factory import create_model, load_config

    config = load_config("prior", preset)
    prior = create_model("prior", config)
    batch, small = settings.batch, settings.sample_batch
    image_embed = torch.randn(batch, config.embed_dim, generator=generator)
    text_embed = torch.randn(batch, config.embed_dim, generator=generator)
    text_hidden = torch.randn(batch, config.context_length, config.text_width, generator=generator)
    text_mask = tokenize(captions(batch), config.context_length) != 0

    def infer() -> torch.Tensor:
        prior.eval()
        return prior.sample(
            text_embed[:small], text_hidden[:small], text_mask[:small],
            steps=settings.sample_steps, guidance_scale=PRIOR_GUIDANCE, generator=torch.Generator().manual_seed(settings.seed),
        )  # fmt: skip

    return Workload(
        prior, to_dict(config),
        optimizer_step(prior, lambda: prior.loss(image_embed, text_embed, text_hidden, text_mask)), batch, "embeddings/s",
        f"x0 MSE on {batch} CLIP embeddings (caption of {config.context_length} tokens)",
        infer, f"{settings.sample_steps} DDIM steps, guidance {PRIOR_GUIDANCE}, best of {config.candidates}, {small} captions",
    )  # fmt: skip


def decoder_training_step(decoder: nn.Module, batch: int, context_length: int, generator: torch.Generator) -> Callable[[], None]:
    """Our decoder's training step (DDPM L_simple with the paper's guidance drops) on a synthetic batch."""
    from dalle2.clip import tokenize
    from dalle2.diffusion import GaussianDiffusion

    config = decoder.config
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    x0 = images(batch, config.image_size, generator)
    image_embed = torch.randn(batch, config.embed_dim, generator=generator)
    tokens = tokenize(captions(batch), context_length)

    def loss() -> torch.Tensor:
        drop_image_embed, drop_text = decoder.random_drop_masks(batch)
        return diffusion.training_loss(
            decoder, x0, image_embed=image_embed, text_tokens=tokens, drop_image_embed=drop_image_embed, drop_text=drop_text
        ).mean()

    return optimizer_step(decoder, loss)


def decoder_sampling(decoder: nn.Module, settings: BenchSettings, context_length: int, generator: torch.Generator) -> Callable[[], torch.Tensor]:
    from dalle2.clip import tokenize
    from dalle2.cascade import StageOptions, decode

    small = settings.sample_batch
    image_embed = torch.randn(small, decoder.config.embed_dim, generator=generator)
    tokens = tokenize(captions(small), context_length)
    options = StageOptions(settings.sample_steps, DECODER_GUIDANCE)

    def infer() -> torch.Tensor:
        decoder.eval()
        return decode(decoder, image_embed, tokens, options, torch.Generator().manual_seed(settings.seed))

    return infer


def decoder_workload(preset: str, settings: BenchSettings, generator: torch.Generator) -> Workload:
    from dalle2.factory import create_model, load_config

    config = load_config("decoder", preset)
    context_length = load_config("clip", preset).context_length  # captions come tokenized at CLIP's context
    decoder = create_model("decoder", config)
    size = config.image_size
    return Workload(
        decoder, to_dict(config),
        decoder_training_step(decoder, settings.batch, context_length, generator), settings.batch, "images/s",
        f"eps MSE on {settings.batch} images at {size}px, captions of {context_length} tokens",
        decoder_sampling(decoder, settings, context_length, generator),
        f"{settings.sample_steps} DDIM steps, guidance {DECODER_GUIDANCE}, {settings.sample_batch} images at {size}px",
    )  # fmt: skip


def upsampler_workload(kind: str, preset: str, settings: BenchSettings, generator: torch.Generator) -> Workload:
    from dalle2.diffusion import GaussianDiffusion
    from dalle2.factory import create_model, load_config
    from dalle2.cascade import StageOptions, upsample
    from dalle2.upsampler import degrade, downsample, random_crop_pair

    config = load_config(kind, preset)
    upsampler = create_model(kind, config)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    batch, small = settings.batch, settings.sample_batch
    high = images(batch, config.image_size, generator)
    low = downsample(high, config.low_res)
    crop = round(config.low_res * config.crop_fraction) * upsampler.scale

    def loss() -> torch.Tensor:
        # As training does: aligned random crops, then the conditioning augmentation of the low-res crop.
        high_crop, low_crop = random_crop_pair(high, low, config.crop_fraction)
        return diffusion.training_loss(upsampler, high_crop, low_res=degrade(low_crop, config.degradation)).mean()

    def infer() -> torch.Tensor:
        upsampler.eval()
        options = StageOptions(settings.sample_steps)
        return upsample([upsampler], low[:small], config.image_size, options, torch.Generator().manual_seed(settings.seed))

    return Workload(
        upsampler, to_dict(config), optimizer_step(upsampler, loss), batch, "images/s",
        f"eps MSE on {batch} random {crop}px crops ({config.degradation.value} augmentation)",
        infer, f"{settings.sample_steps} DDIM steps, {small} images {config.low_res}->{config.image_size}px",
    )  # fmt: skip


def build_workload(kind: str, settings: BenchSettings, generator: torch.Generator) -> Workload:
    if kind.startswith("upsampler"):
        return upsampler_workload(kind, settings.preset, settings, generator)
    builders = {"clip": clip_workload, "prior": prior_workload, "decoder": decoder_workload}
    return builders[kind](settings.preset, settings, generator)


# -- running and reporting ---------------------------------------------------------------------


def bench_model(kind: str, settings: BenchSettings) -> dict:
    """Parameters, training throughput and inference latency of one model of the preset."""
    torch.manual_seed(settings.seed)
    workload = build_workload(kind, settings, torch.Generator().manual_seed(settings.seed))
    train = summary(interleaved({"train": workload.train_step}, settings.repeats, settings.warmup)["train"])
    infer = summary(interleaved({"infer": workload.infer}, settings.repeats, settings.warmup)["infer"])
    return {
        "parameters": parameter_count(workload.model),
        "config": workload.config,
        "train": {
            "what": workload.train_what,
            "batch": workload.train_items,
            "unit": workload.train_unit,
            "items_per_s": workload.train_items / train["median_s"],
            "items_per_cpu_s": workload.train_items / train["cpu_median_s"],
            "step": train,
        },
        "inference": {"what": workload.infer_what, "latency_s": infer["median_s"], "latency": infer},
    }


def run_bench(settings: BenchSettings, peers: PeerMode = "params", log: Optional[Callable[[str], None]] = None) -> dict:
    """The whole ``bench models`` report as a JSON-ready dict (see :func:`format_report`)."""
    log = log or (lambda message: None)
    if peers != "none":
        from dalle2.bench.peers import require_peers

        require_peers()  # fail before minutes of our own timings, not after
    result: dict = {"machine": machine_info(), "settings": dataclasses.asdict(settings), "models": {}}
    for kind in settings.kinds:
        log(f"bench: {kind} ...")
        result["models"][kind] = bench_model(kind, settings)
    if peers != "none":
        from dalle2.bench.comparisons import run_comparisons

        matches = ("params", "architecture") if peers == "both" else (peers,)
        result["comparisons"] = run_comparisons(settings, matches, log)
    result["machine"]["load_average_1m_after"] = machine_info().get("load_average_1m")
    return result


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def format_report(result: dict) -> str:
    """A human-readable table of :func:`run_bench`'s result, configs included."""
    machine, settings = result["machine"], result["settings"]
    lines = [
        f"dalle2 bench models: preset {settings['preset']}, on {machine['cpu']} ({machine['logical_cores']} logical cores, "
        f"torch {machine['torch']} with {machine['torch_threads']} threads, load {machine.get('load_average_1m')} -> "
        f"{machine.get('load_average_1m_after')}); medians of {settings['repeats']} runs",
        "",
        f"{'model':<16}{'params':>9}  {'training step':<34}sampling / inference",
    ]
    for kind, entry in result["models"].items():
        train, infer = entry["train"], entry["inference"]
        throughput = f"{train['items_per_s']:.1f} {train['unit']} (batch {train['batch']})"
        lines.append(f"{kind:<16}{_millions(entry['parameters']):>9}  {throughput:<34}{infer['latency_s']:.3f} s: {infer['what']}")
    lines += ["", "what each figure measures and the exact configs:"]
    for kind, entry in result["models"].items():
        lines.append(f"  {kind}: train = {entry['train']['what']}")
        lines.append(f"  {kind}: config = {json.dumps(entry['config'], separators=(',', ':'))}")
    if "comparisons" in result:
        from dalle2.bench.comparisons import format_comparisons

        lines += ["", *format_comparisons(result["comparisons"])]
    return "\n".join(lines)
