"""Ours against the peers, side by side in one process on the same CPU (issue 3, section 4).

1. Decoder training step at 64x64: our ``Decoder`` with ``GaussianDiffusion.training_loss`` against
   dalle2-pytorch's ``Unet`` in its ``Decoder``; target: ours >= 1.3x the images/s.
2. Text -> 64x64 image, 25 prior steps and 25 decoder steps, guidance on in both: our
   :func:`dalle2.cascade.text_to_image` against diffusers' ``UnCLIPPipeline``; target: ours >= 2x
   faster. The peer pipeline always runs a super-resolution stage; it is a minimal UNet here and
   the time spent in it is left out of the peer's figure.
3. Text -> 64x64 image at each side's defaults (issue 23): ours at ``dalle2 generate``'s stage
   options (DPM-Solver++(2M) at the steps chosen by measurement, README "Fewer steps") against
   ``UnCLIPPipeline`` at its own defaults (25 prior + 25 decoder steps of its UnCLIPScheduler);
   guidance on in both at the peer's scales, so only steps and samplers differ; target >= 2x.

Both are timed in alternating rounds (:func:`dalle2.bench.timing.interleaved`) and compared by
medians, with the same resolution, batch and number of steps, and parameter counts within 10%
(``match="params"``) or the same architecture (``match="architecture"``).
"""

from __future__ import annotations

import dataclasses
from importlib import metadata
from typing import Callable, Sequence

import torch

from dalle2.bench.models import (
    DECODER_GUIDANCE, PRIOR_GUIDANCE, BenchSettings, captions, decoder_training_step, images, optimizer_step, parameter_count,
)  # fmt: skip
from dalle2.bench.peers import Match, diffusers_unclip, lucidrains_decoder
from dalle2.bench.timing import Excluded, Stopwatch, interleaved, summary
from dalle2.config import DecoderConfig, to_dict

COMPARISON_SIZE = 64  # the paper's decoder resolution; the text -> image target is stated at 64x64
DECODER_TRAIN_TARGET = 1.3
TEXT_TO_IMAGE_TARGET = 2.0
PEER_SUPER_RES_STEPS = 2  # the fewest UnCLIPScheduler accepts; their time is excluded


def comparison_decoder_config(config: DecoderConfig, size: int = COMPARISON_SIZE) -> DecoderConfig:
    """The preset's decoder at ``size`` px: attention stays at the same UNet levels (the feature
    sizes it names scale with the image), so the parameter count does not change."""
    levels = len(config.unet.channel_mults)
    if size % 2 ** (levels - 1) or any(size * r % config.image_size for r in config.unet.attention_resolutions):
        raise ValueError(f"the comparison size {size} does not fit this decoder's {levels} levels and attention sizes")
    if config.image_size == size:
        return config
    scaled = tuple(r * size // config.image_size for r in config.unet.attention_resolutions)
    return dataclasses.replace(config, image_size=size, unet=dataclasses.replace(config.unet, attention_resolutions=scaled))


def _version(package: str) -> str:
    return f"{package} {metadata.version(package)}"


def _side(parameters: int, items: int, samples: list, config: dict, **extra) -> dict:
    stats = summary(samples)
    per_s = {"per_s": items / stats["median_s"], "per_cpu_s": items / stats["cpu_median_s"]}
    return {"parameters": parameters, **extra, **per_s, "time": stats, "config": config}


def compare_decoder_training(settings: BenchSettings, match: Match) -> dict:
    from dalle2.factory import create_model, load_config

    clip_config = load_config("clip", settings.preset)
    config = comparison_decoder_config(load_config("decoder", settings.preset), settings.compare_size)
    batch, length, generator = settings.batch, clip_config.context_length, torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    ours = create_model("decoder", config)
    our_params = parameter_count(ours)
    peer, peer_config = lucidrains_decoder(config, clip_config.text_width, length, match, our_params)

    # The peer reads CLIP text states [N, L, W] (zeros past the caption: its padding test) instead of tokens.
    from dalle2.clip import tokenize

    real = (tokenize(captions(batch), length) != 0)[..., None]
    encodings = torch.randn(batch, length, clip_config.text_width, generator=generator) * real
    x0 = images(batch, config.image_size, generator)
    image_embed = torch.randn(batch, config.embed_dim, generator=generator)
    peer_step = optimizer_step(peer, lambda: peer(x0, image_embed=image_embed, text_encodings=encodings))
    our_step = decoder_training_step(ours, batch, length, generator)

    samples = interleaved({"ours": our_step, "peer": peer_step}, settings.repeats, settings.warmup)
    embedding = ours.text_encoder.token_embedding.weight.numel()
    result = {
        "what": f"decoder training step (forward, backward, AdamW) at {config.image_size}x{config.image_size}, batch {batch}, "
        f"captions of {length} tokens",
        "peer_name": f"{_version('dalle2-pytorch')} (Unet in Decoder)",
        "match": match,
        "ours": _side(our_params, batch, samples["ours"], to_dict(config), parameters_without_token_embedding=our_params - embedding),
        "peer": _side(parameter_count(peer), batch, samples["peer"], peer_config),
        "unit": "images/s",
        "target": DECODER_TRAIN_TARGET,
    }
    result["ratio"] = result["ours"]["per_s"] / result["peer"]["per_s"]
    result["ratio_cpu_time"] = result["ours"]["per_cpu_s"] / result["peer"]["per_cpu_s"]
    result["met"] = result["ratio"] >= DECODER_TRAIN_TARGET
    return result


def _text_tower_parameters(clip) -> int:
    return sum(p.numel() for name, p in clip.model.named_parameters() if not name.startswith("visual.") and not name.startswith("logit_"))


def _forward_time(module: torch.nn.Module) -> Callable[[], Excluded]:
    """Hooks that add up the wall and CPU time spent in ``module``'s forward; returns a reader
    that hands the total over as :class:`Excluded` and starts again from zero."""
    watch, spent = Stopwatch(), [0.0, 0.0]

    def add(*_) -> None:
        elapsed = watch.read()
        spent[0], spent[1] = spent[0] + elapsed.wall_s, spent[1] + elapsed.cpu_s

    module.register_forward_pre_hook(lambda *_: watch.restart())
    module.register_forward_hook(add)

    def take() -> Excluded:
        total = Excluded(*spent)
        spent[0] = spent[1] = 0.0
        return total

    return take


PEER_DEFAULT_STEPS = 25  # UnCLIPPipeline.__call__'s prior_num_inference_steps and decoder_num_inference_steps


def compare_text_to_image(settings: BenchSettings, match: Match, at_defaults: bool = False) -> dict:
    """Equal steps (``settings.sample_steps``, DDIM for us), or with ``at_defaults`` each side's
    default steps and sampler (ours: :data:`dalle2.cascade.GenerationOptions`')."""
    from diffusers.utils import logging as diffusers_logging

    from dalle2.factory import create_model, load_config
    from dalle2.cascade import GenerationOptions, StageOptions, UnCLIP, text_to_image

    diffusers_logging.set_verbosity_error()  # the pipeline's deprecation notice, on every call
    clip_config, prior_config = load_config("clip", settings.preset), load_config("prior", settings.preset)
    decoder_config = comparison_decoder_config(load_config("decoder", settings.preset), settings.compare_size)
    torch.manual_seed(settings.seed)
    ours = UnCLIP(create_model("clip", clip_config), create_model("prior", prior_config), create_model("decoder", decoder_config))
    our_counts = {
        "text_encoder": _text_tower_parameters(ours.clip),
        "prior": parameter_count(ours.prior),
        "decoder": parameter_count(ours.decoder),
    }
    peer, peer_configs, peer_counts = diffusers_unclip(clip_config, prior_config, decoder_config, match, our_counts)
    super_res_time = _forward_time(peer.super_res_last)

    prompts, steps, size = captions(settings.sample_batch), settings.sample_steps, decoder_config.image_size
    options = GenerationOptions(
        n=1, seed=settings.seed, prior=StageOptions(steps, PRIOR_GUIDANCE), decoder=StageOptions(steps, DECODER_GUIDANCE)
    )
    if at_defaults:
        steps, defaults = PEER_DEFAULT_STEPS, GenerationOptions()
        options = dataclasses.replace(
            options, prior=dataclasses.replace(defaults.prior, guidance_scale=PRIOR_GUIDANCE),
            decoder=dataclasses.replace(defaults.decoder, guidance_scale=DECODER_GUIDANCE),
        )  # fmt: skip
    our_steps = f"{options.prior.steps} prior + {options.decoder.steps} decoder {options.decoder.sampler} steps"

    def run_ours() -> None:
        produced = text_to_image(ours, prompts, options)
        assert produced[0].size == (size, size)

    def run_peer() -> Excluded:
        super_res_time()
        produced = peer(
            prompts, prior_num_inference_steps=steps, decoder_num_inference_steps=steps,
            super_res_num_inference_steps=PEER_SUPER_RES_STEPS, generator=torch.Generator().manual_seed(settings.seed),
            prior_guidance_scale=PRIOR_GUIDANCE, decoder_guidance_scale=DECODER_GUIDANCE, output_type="pil",
        ).images  # fmt: skip
        assert produced[0].size == (size, size)
        return super_res_time()

    samples = interleaved({"ours": run_ours, "peer": run_peer}, settings.repeats, settings.warmup)
    our_config = {"clip": to_dict(clip_config), "prior": to_dict(prior_config), "decoder": to_dict(decoder_config)}
    n = len(prompts)
    result = {
        "what": f"text -> {size}x{size} image, {n} prompts, "
        + (f"ours {our_steps} vs the peer's defaults ({steps} + {steps} steps)" if at_defaults else f"{steps} prior + {steps} decoder steps")
        + f", guidance {PRIOR_GUIDANCE} (prior) and {DECODER_GUIDANCE} (decoder), PIL output",
        "peer_name": f"{_version('diffusers')} UnCLIPPipeline, {_version('transformers')} (random init, no downloads)",
        "match": match,
        "ours": _side(sum(our_counts.values()), n, samples["ours"], our_config, parameters_by_stage=our_counts),
        "peer": _side(sum(peer_counts.values()), n, samples["peer"], peer_configs, parameters_by_stage=peer_counts),
        "unit": "images/s",
        "notes": "ours samples the prior's 2 candidates per caption (paper); peer's super-resolution stage "
        f"({PEER_SUPER_RES_STEPS} steps of a minimal UNet) is excluded from its time",
        "target": TEXT_TO_IMAGE_TARGET,
    }
    result["ratio"] = result["peer"]["time"]["median_s"] / result["ours"]["time"]["median_s"]  # how many times faster
    result["ratio_cpu_time"] = result["peer"]["time"]["cpu_median_s"] / result["ours"]["time"]["cpu_median_s"]
    result["met"] = result["ratio"] >= TEXT_TO_IMAGE_TARGET
    return result


def run_comparisons(settings: BenchSettings, matches: Sequence[Match], log: Callable[[str], None]) -> dict:
    comparisons: dict[str, dict] = {"decoder_train": {}, "text_to_image": {}, "text_to_image_defaults": {}}
    for match in matches:
        log(f"bench: decoder training vs dalle2-pytorch (match {match}) ...")
        comparisons["decoder_train"][match] = compare_decoder_training(settings, match)
        log(f"bench: text -> image vs diffusers UnCLIPPipeline (match {match}) ...")
        comparisons["text_to_image"][match] = compare_text_to_image(settings, match)
        log(f"bench: text -> image at each side's defaults vs diffusers UnCLIPPipeline (match {match}) ...")
        comparisons["text_to_image_defaults"][match] = compare_text_to_image(settings, match, at_defaults=True)
    return comparisons


def _parameter_line(ours: dict, peer: dict) -> str:
    line = f"    parameters: ours {ours['parameters']:,}, peer {peer['parameters']:,}"
    if "parameters_by_stage" in ours:
        line += f"; by stage ours {ours['parameters_by_stage']}, peer {peer['parameters_by_stage']}"
    if "parameters_without_token_embedding" in ours:
        line += f"; ours without its caption token embedding {ours['parameters_without_token_embedding']:,}"
    return line


def format_comparisons(comparisons: dict) -> list[str]:
    lines = ["side by side (interleaved runs, medians):"]
    for name, by_match in comparisons.items():
        for match, c in by_match.items():
            ours, peer = c["ours"], c["peer"]
            if name == "decoder_train":
                figures = f"ours {ours['per_s']:.2f} images/s vs peer {peer['per_s']:.2f} images/s -> {c['ratio']:.2f}x"
            else:
                figures = f"ours {ours['time']['median_s']:.2f} s vs peer {peer['time']['median_s']:.2f} s -> {c['ratio']:.2f}x faster"
            verdict = "met" if c["met"] else "NOT met"
            lines += [
                f"  {c['what']}",
                f"    vs {c['peer_name']}, matched by {match}: {figures} (CPU time: {c['ratio_cpu_time']:.2f}x); "
                f"target >= {c['target']}x: {verdict}",
                _parameter_line(ours, peer),
                f"    peer config: {peer['config']}",
            ]
            if "notes" in c:
                lines.append(f"    note: {c['notes']}")
    return lines
