"""``dalle2 clip bundle``: a CLIP bundle from an open_clip checkpoint, so that the prior and the
decoder train on the frozen pretrained CLIP that the paper and every open reproduction use
(OpenAI's or LAION's ViT-L/14, ViT-H/14) instead of one trained here.

    dalle2 clip bundle --model ViT-L-14 --pretrained ViT-L-14-laion2b.bin --out bundles/clip
    dalle2 clip bundle --model ViT-H-14 --pretrained laion2b_s32b_b82k --out bundles/clip   # a hub tag, online only

The bundle carries the weights: its config names the architecture and no checkpoint file, so it
loads anywhere (``dalle2.bundle.load_bundle``). ``clip: {bundle: DIR}`` in a pipeline config then
skips CLIP training (jobs/stages.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from dalle2.config import ClipConfig


def bundle_open_clip(model_name: str, pretrained: str, out: str) -> str:
    """Write the CLIP ``model_name`` with the weights of ``pretrained`` (a checkpoint file on disk,
    or an open_clip hub tag where the machine is online) as a bundle at ``out``."""
    import open_clip

    from dalle2.bundle import save_bundle
    from dalle2.clip import Clip, open_clip_dims, register_model_configs

    register_model_configs()
    open_clip_dims(model_name)  # one clear error for an unknown architecture
    if os.path.isfile(pretrained):
        clip = Clip(ClipConfig(model_name=model_name, pretrained=pretrained))
        source = {"checkpoint_file": os.path.basename(pretrained)}
    elif os.path.sep in pretrained or pretrained.endswith((".pt", ".bin", ".pth", ".safetensors")):
        raise FileNotFoundError(f"--pretrained {pretrained}: no such checkpoint file")
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(f"--pretrained {pretrained!r} is neither a file nor an open_clip tag of {model_name} ({', '.join(tags) or 'none'})")
        clip = Clip(ClipConfig(model_name=model_name))
        hub = open_clip.create_model(model_name, pretrained=pretrained)  # downloads: online machines only
        clip.model.load_state_dict(hub.state_dict())
        source = {"open_clip_tag": pretrained}
    clip.config = dataclasses.replace(clip.config, pretrained=None)  # the bundle holds the weights
    return save_bundle(clip.eval(), "clip", out, metadata={"open_clip_model": model_name, **source})


def cmd_clip_bundle(args: argparse.Namespace) -> int:
    out = bundle_open_clip(args.model, args.pretrained, args.out)
    print(json.dumps({"bundle": out, "model": args.model}))
    return 0


def add_clip_commands(subparsers: argparse._SubParsersAction) -> None:
    clip = subparsers.add_parser("clip", help="CLIP bundles from pretrained open_clip checkpoints")
    commands = clip.add_subparsers(dest="clip_command", required=True)
    bundle = commands.add_parser("bundle", help="write a CLIP bundle from an open_clip checkpoint file (or hub tag)")
    bundle.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-L-14, ViT-H-14")
    bundle.add_argument("--pretrained", required=True, help="open_clip checkpoint file on disk (or, online, a tag: laion2b_s32b_b82k)")
    bundle.add_argument("--out", required=True, help="bundle folder: path, file:// or s3://")
    bundle.set_defaults(func=cmd_clip_bundle)
