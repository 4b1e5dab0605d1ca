"""The ``dalle2`` command line. Each subcommand is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from dalle2.config import PRESETS


def cmd_info(args: argparse.Namespace) -> int:
    from dalle2.factory import parameter_counts

    # Big presets are built on the meta device: parameter shapes only, no memory.
    counts = parameter_counts(args.preset, device="meta")
    print(json.dumps(counts, indent=None if args.compact else 2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from dalle2.train.config import ConfigError
    from dalle2.train.plan import format_plan, plan_file

    try:
        plan = plan_file(args.config, check=args.check)
    except ConfigError as error:
        print(f"dalle2 plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


def _options(args: argparse.Namespace):
    from dalle2.cascade import GenerationOptions, StageOptions

    defaults = GenerationOptions()

    def stage(name: str, guidance: float) -> StageOptions:
        default = getattr(defaults, name)
        steps, sampler = getattr(args, f"{name}_steps"), getattr(args, f"{name}_sampler")
        return StageOptions(default.steps if steps is None else steps, guidance, sampler or default.sampler)

    return GenerationOptions(
        n=args.n,
        seed=args.seed,
        size=args.size,
        prior=stage("prior", args.prior_guidance),
        decoder=stage("decoder", args.decoder_guidance),
        upsampler=stage("upsampler", 1.0),
        low_res_consistency=not args.free_upsampling,
        precision=None if args.precision == "auto" else args.precision,
    )


def _progress_printer(quiet: bool):
    if quiet:
        return None

    def show(stage, step):
        if step.index + 1 == step.num_steps or (step.index + 1) % 10 == 0:
            print(f"  {stage}: step {step.index + 1}/{step.num_steps}", file=sys.stderr, flush=True)

    return show


def _save(images, args: argparse.Namespace, columns: int) -> int:
    from dalle2.images import make_grid

    make_grid(images, columns).save(args.out)
    print(f"wrote {len(images)} images to {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dalle2.cascade import UnCLIP, text_to_image

    pipe = UnCLIP.from_bundles(args.bundles, device=args.device)
    images = text_to_image(pipe, args.prompts, _options(args), _progress_printer(args.quiet))
    return _save(images, args, columns=args.n)


def cmd_variations(args: argparse.Namespace) -> int:
    from PIL import Image

    from dalle2.cascade import UnCLIP, variations

    pipe = UnCLIP.from_bundles(args.bundles, device=args.device)
    images = variations(pipe, [Image.open(p) for p in args.images], _options(args), _progress_printer(args.quiet))
    return _save(images, args, columns=args.n)


def cmd_edit(args: argparse.Namespace) -> int:
    from PIL import Image

    from dalle2.cascade import UnCLIP, edit

    pipe = UnCLIP.from_bundles(args.bundles, device=args.device)
    images = edit(pipe, Image.open(args.image), Image.open(args.mask), args.prompt, _options(args), _progress_printer(args.quiet))
    return _save(images, args, columns=args.n)


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundles", required=True, help="folder (or s3:// prefix) with clip/, prior/, decoder/, upsampler_*/ bundles")
    parser.add_argument("--n", type=int, default=4, help="images per prompt / input image (1-10)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="output side (default: as far as the cascade reaches)")
    parser.add_argument("--out", default="grid.png", help="PNG grid to write")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no per-step progress on stderr")
    from dalle2.cascade import GenerationOptions
    from dalle2.sampling import SAMPLERS

    defaults = GenerationOptions()
    for stage in ("prior", "decoder", "upsampler"):
        default = getattr(defaults, stage)
        parser.add_argument(f"--{stage}-steps", type=int, default=None, help=f"sampling steps (default {default.steps})")
        if stage != "upsampler":
            parser.add_argument(f"--{stage}-guidance", type=float, default=default.guidance_scale)
        parser.add_argument(
            f"--{stage}-sampler", choices=SAMPLERS, default=None,
            help=f"dpmpp_2m (DPM-Solver++(2M)), ddim or ddpm (default {default.sampler})",
        )  # fmt: skip
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
        help="the networks' precision (autocast; the samplers stay float32): auto = bf16 on CUDA, fp32 on CPU",
    )  # fmt: skip
    parser.add_argument(
        "--free-upsampling", action="store_true",
        help="let the upsamplers change colors and layout (default: their output downsamples exactly to their input)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle2", description="DALL-E 2 (unCLIP) on Ray: train, serve, generate.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parameter count of each model of a preset, as JSON")
    info.add_argument("--preset", choices=PRESETS, default="tiny")
    info.add_argument("--compact", action="store_true", help="one line of JSON")
    info.set_defaults(func=cmd_info)

    plan = commands.add_parser(
        "plan", help="per-GPU memory of a training job config before anything runs (exit 1 if it does not fit)",
        description="Parameters, gradients and optimizer state (DeepSpeed's estimators for the config's ZeRO stage and "
        "offload), the sharded EMA, the frozen CLIP, activations (measured on CPU at reduced widths and extrapolated), "
        "rank 0's sample copy and a runtime allowance, against scaling.gpu_memory_gib with 10%% headroom.",
    )  # fmt: skip
    plan.add_argument("--config", required=True, help="a job config YAML (jobs/configs/*-gpu.yaml)")
    plan.add_argument("--json", action="store_true", help="the plan as JSON")
    plan.add_argument("--check", action="store_true", help="also measure a third width and report the extrapolation error")
    plan.set_defaults(func=cmd_plan)

    generate = commands.add_parser("generate", help="text -> images, written as a PNG grid (one row per prompt)")
    generate.add_argument("prompts", nargs="+")
    _add_generation_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    variation = commands.add_parser("variations", help="variations of images (their CLIP embeddings decoded anew)")
    variation.add_argument("images", nargs="+")
    _add_generation_arguments(variation)
    variation.set_defaults(func=cmd_variations)

    edit = commands.add_parser("edit", help="repaint the transparent (or black) area of MASK in IMAGE")
    edit.add_argument("image")
    edit.add_argument("mask")
    edit.add_argument("prompt", nargs="?", default=None)
    _add_generation_arguments(edit)
    edit.set_defaults(func=cmd_edit)

    _add_optional_commands(commands)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.stages import cmd_pipeline

    return cmd_pipeline(args)


def _add_optional_commands(commands: argparse._SubParsersAction) -> None:
    """Subcommand groups that live beside their code (imported lazily by each command)."""
    from dalle2.bench.cli import add_bench_commands
    from dalle2.clip_bundle import add_clip_commands
    from dalle2.data.cli import add_data_commands
    from dalle2.eval.cli import add_eval_commands
    from dalle2.serve_cli import add_serve_commands
    from dalle2.train.cli import add_train_commands
    from jobs.stages import add_pipeline_arguments

    add_data_commands(commands)
    add_train_commands(commands)
    add_serve_commands(commands)
    add_bench_commands(commands)
    add_eval_commands(commands)
    add_clip_commands(commands)
    for name, text in (
        ("demo", "the whole system on the tiny presets: data, training, export, serving, a PNG grid"),
        ("pipeline", "run (or resume) every stage of a pipeline config: any dataset, presets, storage"),
    ):
        parser = commands.add_parser(name, help=text)
        add_pipeline_arguments(parser)
        # The demo promises its training time (30 min on the README's 2-core machine) on slower
        # machines too; a pipeline of one's own keeps its configured steps unless asked.
        parser.set_defaults(func=cmd_demo, budget_minutes=30.0 if name == "demo" else None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, OSError) as error:  # bad input, missing files, unreadable storage
        print(f"dalle2 {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
