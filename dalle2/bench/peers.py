"""The peers we compare with, built from our configs, randomly initialised, with no downloads.

- lucidrains' dalle2-pytorch: its ``Unet`` inside its ``Decoder`` (the decoder training step);
- diffusers' ``UnCLIPPipeline`` (Kakao Brain's Karlo layout): a ``CLIPTextModelWithProjection``,
  a ``PriorTransformer``, an ``UnCLIPTextProjModel`` and a ``UNet2DConditionModel`` decoder, with a
  ``CLIPTokenizer`` written from open_clip's own BPE file (the same ids as ours).

Each peer mirrors our architecture (base channels, multipliers, residual blocks per level, which
levels attend, head width) and then, with ``match="params"``, its base width is chosen so that its
parameter count is the closest to ours (and within :data:`PARAM_TOLERANCE`); with
``match="architecture"`` it keeps our base width. Our decoder holds its own GLIDE text encoder
(a 49k-token embedding table) while both peers read CLIP's text states, so the two matches
bracket the fair comparison: the counts of both are reported.
"""

from __future__ import annotations

import gzip
import json
import math
import tempfile
from pathlib import Path
from typing import Callable, Literal

from torch import nn

from dalle2.bench.models import parameter_count
from dalle2.config import ClipConfig, DecoderConfig, PriorConfig

Match = Literal["params", "architecture"]
PARAM_TOLERANCE = 0.10  # the "same parameter count (within 10%)"
PEER_PACKAGES = ("dalle2_pytorch", "diffusers", "transformers")
INSTALL_HINT = (
    "the peer comparisons need the optional 'bench' extra (dalle2-pytorch, diffusers, transformers): "
    "pip install -c constraints.txt -e '.[bench]'  (or run with --no-peers to bench our models only)"
)


class PeersMissing(RuntimeError):
    """A peer package is not installed; the message says how to install the extra."""


def require_peers() -> None:
    import importlib

    for package in PEER_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError as error:
            raise PeersMissing(f"{INSTALL_HINT} [{package} failed to import: {error}]") from error


def closest_width(build: Callable[[int], nn.Module], target: int, start: int, step: int = 8) -> tuple[int, nn.Module]:
    """The base width (a multiple of ``step``) whose model's parameter count is the closest to
    ``target``, searched from ``start`` toward the target (the count grows with the width)."""
    best = (start, build(start))
    best_gap = abs(parameter_count(best[1]) - target)
    direction = step if parameter_count(best[1]) < target else -step
    width = start + direction
    while width >= step:
        model = build(width)
        gap = abs(parameter_count(model) - target)
        if gap >= best_gap:
            break
        best, best_gap = (width, model), gap
        width += direction
    return best


def check_match(name: str, peer: int, ours: int) -> None:
    if abs(peer - ours) > PARAM_TOLERANCE * ours:
        raise ValueError(f"{name}: peer has {peer:,} parameters, ours {ours:,}: not within {PARAM_TOLERANCE:.0%}")


def attended_levels(config: DecoderConfig) -> list[bool]:
    """For each UNet level, whether our decoder has attention there (feature size in attention_resolutions)."""
    return [config.image_size // 2**level in config.unet.attention_resolutions for level in range(len(config.unet.channel_mults))]


# -- lucidrains' dalle2-pytorch ----------------------------------------------------------------


def lucidrains_decoder(config: DecoderConfig, clip_text_width: int, context_length: int, match: Match, ours: int) -> tuple[nn.Module, dict]:
    """dalle2-pytorch's ``Decoder`` around one ``Unet`` mirroring ours (``ours`` parameters to
    match); returns (decoder, its kwargs).

    Conditioning: the CLIP image embedding (added to the time embedding and as ``clip_tokens``
    tokens) and CLIP text encodings [N, L, clip_text_width]. The loss is ours: eps-prediction,
    L_simple (``learned_variance=False``), the config's schedule length, the paper's drop rates.
    """
    from dalle2_pytorch import Decoder, Unet

    unet_config = config.unet
    levels = attended_levels(config)
    first_attended = levels.index(True) if any(levels) else 0
    head_width = unet_config.head_channels
    decoder_kwargs = dict(
        image_size=config.image_size, timesteps=config.diffusion.timesteps, learned_variance=False,
        auto_normalize_img=False,  # our images are already in [-1, 1]
        image_cond_drop_prob=config.image_embed_drop_prob, text_cond_drop_prob=config.text_drop_prob,
    )  # fmt: skip

    def unet_kwargs(dim: int) -> dict:
        # Its attention has one inner width at every level: that of our first attended level.
        heads = max(1, dim * unet_config.channel_mults[first_attended] // head_width)
        return dict(
            dim=dim, dim_mults=tuple(unet_config.channel_mults), num_resnet_blocks=unet_config.res_blocks,
            self_attn=tuple(levels), attn_dim_head=head_width, attn_heads=heads,
            # image_embed_dim == cond_dim makes dalle2-pytorch skip its image-to-tokens projection.
            cond_dim=dim if dim != config.embed_dim else 2 * dim,
            image_embed_dim=config.embed_dim, num_image_tokens=config.clip_tokens,
            text_embed_dim=clip_text_width, cond_on_text_encodings=True, max_text_len=context_length,
        )  # fmt: skip

    def build(dim: int) -> nn.Module:
        return Decoder(unet=Unet(**unet_kwargs(dim)), **decoder_kwargs)

    if match == "params":
        dim, decoder = closest_width(build, ours, unet_config.channels)
        check_match("dalle2-pytorch decoder", parameter_count(decoder), ours)
    else:
        dim, decoder = unet_config.channels, build(unet_config.channels)
    return decoder, {"Unet": unet_kwargs(dim), "Decoder": decoder_kwargs}


# -- diffusers' UnCLIPPipeline -----------------------------------------------------------------


def clip_tokenizer(context_length: int):
    """transformers' ``CLIPTokenizer`` over open_clip's BPE vocabulary (shipped inside open_clip,
    so nothing is downloaded): the vocabulary and merges files are written as CLIP builds them."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # as open_clip's SimpleTokenizer
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
        merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=context_length, pad_token="<|endoftext|>")


def _karlo_decoder(config: DecoderConfig, channels: int) -> tuple[nn.Module, nn.Module, dict]:
    """UNet2DConditionModel + UnCLIPTextProjModel in Karlo's layout, with our decoder's shape."""
    import importlib

    from diffusers import UnCLIPPipeline, UNet2DConditionModel

    # text_proj sits beside the pipeline (diffusers moved both to pipelines/deprecated/ in 0.3x).
    UnCLIPTextProjModel = importlib.import_module(UnCLIPPipeline.__module__.rsplit(".", 1)[0] + ".text_proj").UnCLIPTextProjModel

    unet_config, levels = config.unet, attended_levels(config)
    widths = tuple(channels * m for m in unet_config.channel_mults)
    # Its attention splits each width into heads of one attention_head_dim (the up path even indexes
    # it by the down level), which must divide every attended width (the middle block always
    # attends). Keep our number of heads per level: head width scaled with the base width.
    attended = [widths[-1], *(w for w, attends in zip(widths, levels) if attends)]
    scaled, remainder = divmod(channels * unet_config.head_channels, unet_config.channels)
    head_dim = scaled if not remainder and all(w % scaled == 0 for w in attended) else math.gcd(unet_config.head_channels, *attended)
    unet_kwargs = dict(
        sample_size=config.image_size, in_channels=3, out_channels=6,  # Karlo learns the variance; the pipeline expects 6
        down_block_types=tuple("SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in levels),
        up_block_types=tuple("SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(levels)),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=widths, layers_per_block=unet_config.res_blocks,
        cross_attention_dim=config.text.width, attention_head_dim=head_dim,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity", norm_num_groups=math.gcd(32, *widths),
    )  # fmt: skip
    proj_kwargs = dict(
        clip_extra_context_tokens=config.clip_tokens, clip_embeddings_dim=config.embed_dim,
        time_embed_dim=4 * channels, cross_attention_dim=config.text.width,
    )  # fmt: skip
    return UNet2DConditionModel(**unet_kwargs), UnCLIPTextProjModel(**proj_kwargs), {"decoder": unet_kwargs, "text_proj": proj_kwargs}


def diffusers_unclip(clip: ClipConfig, prior: PriorConfig, decoder: DecoderConfig, match: Match, ours: dict[str, int]):
    """A diffusers ``UnCLIPPipeline`` of our sizes; returns (pipeline, configs, parameter counts).

    ``ours`` holds our parameter counts ("text_encoder", "prior", "decoder") to match. The
    super-resolution stage, which the pipeline always runs, is a minimal UNet at the decoder's
    size; :func:`dalle2.bench.comparisons.compare_text_to_image` leaves its time out.
    """
    import open_clip
    import torch
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_cfg = open_clip.get_model_config(clip.model_name)["text_cfg"]
    if clip.text_width != clip.embed_dim:
        # Karlo feeds CLIP's token states through Linear(embed_dim, ...) in the prior and the text projection.
        raise ValueError(f"UnCLIPPipeline needs CLIP text width == embedding dim; this preset has {clip.text_width} and {clip.embed_dim}")
    text_kwargs = dict(
        vocab_size=text_cfg.get("vocab_size", 49408), hidden_size=clip.text_width,
        intermediate_size=int(text_cfg.get("mlp_ratio", 4.0) * clip.text_width), num_hidden_layers=text_cfg["layers"],
        num_attention_heads=text_cfg["heads"], max_position_embeddings=clip.context_length, projection_dim=clip.embed_dim,
        hidden_act="gelu",  # open_clip's non-OpenAI configs use exact GELU
    )  # fmt: skip
    prior_kwargs = dict(
        num_attention_heads=prior.heads, attention_head_dim=prior.width // prior.heads, num_layers=prior.layers,
        embedding_dim=clip.embed_dim, num_embeddings=clip.context_length, additional_embeddings=4,
    )  # fmt: skip
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**text_kwargs))
    prior_model = PriorTransformer(**prior_kwargs)
    with torch.no_grad():
        prior_model.clip_std.fill_(1.0)  # its embedding std is a zero-initialised parameter: keep outputs non-degenerate


    def build(channels: int) -> nn.Module:
        unet, proj, _ = _karlo_decoder(decoder, channels)
        return nn.ModuleList([unet, proj])

    channels = closest_width(build, ours["decoder"], decoder.unet.channels)[0] if match == "params" else decoder.unet.channels
    unet, text_proj, decoder_kwargs = _karlo_decoder(decoder, channels)
    super_res = UNet2DModel(
        sample_size=decoder.image_size, in_channels=6, out_channels=3, block_out_channels=(32,), layers_per_block=1,
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=8,
    )  # fmt: skip
    scheduler_kwargs = {
        "prior": dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
        "decoder": dict(variance_type="learned_range", prediction_type="epsilon"),
        "super_res": dict(variance_type="fixed_small_log", prediction_type="epsilon"),
    }
    schedulers = {name: UnCLIPScheduler(num_train_timesteps=1000, **kw) for name, kw in scheduler_kwargs.items()}
    pipeline = UnCLIPPipeline(
        prior=prior_model, decoder=unet, text_encoder=text_encoder, tokenizer=clip_tokenizer(clip.context_length),
        text_proj=text_proj, super_res_first=super_res, super_res_last=super_res, prior_scheduler=schedulers["prior"],
        decoder_scheduler=schedulers["decoder"], super_res_scheduler=schedulers["super_res"],
    )  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    counts = {
        "text_encoder": parameter_count(text_encoder),
        "prior": parameter_count(prior_model),
        "decoder": parameter_count(unet) + parameter_count(text_proj),
    }
    if match == "params":
        for name, count in counts.items():
            check_match(f"UnCLIPPipeline {name}", count, ours[name])
    configs = {"text_encoder": text_kwargs, "prior": prior_kwargs, **decoder_kwargs, "schedulers": scheduler_kwargs}
    return pipeline, configs, counts
