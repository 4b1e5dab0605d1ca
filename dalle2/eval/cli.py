"""``dalle2 eval``: score a cascade of bundles on a dataset's held-out rows (see :mod:`.run`).

    dalle2 eval --bundles DIR --data URI [--out DIR] [--count N] [--steps N|prior=N,decoder=N,upsampler=N]
                [--sampler NAME|prior=NAME,decoder=NAME,upsampler=NAME]
                [--seed S] [--seed-pairs N] [--validation-fraction F] [--phrasing dataset|plain|held-out] [--decode-from prior|image] [--free-upsampling] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_eval(args: argparse.Namespace) -> int:
    from dalle2.eval.run import EvalSettings, Samplers, Steps, run_eval, summary

    settings = EvalSettings(
        bundles=args.bundles, data=args.data, out=args.out, count=args.count, steps=Steps.parse(args.steps),
        samplers=Samplers.parse(args.sampler), seed=args.seed, validation_fraction=args.validation_fraction, split=args.split, prior_guidance=args.prior_guidance,
        decoder_guidance=args.decoder_guidance, batch_size=args.batch_size, device=args.device,
        decode_from=args.decode_from, low_res_consistency=not args.free_upsampling,
        precision=None if args.precision == "auto" else args.precision, phrasing=args.phrasing, seed_pairs=args.seed_pairs,
    )  # fmt: skip
    progress = None if args.quiet else (lambda message: print(f"  {message}", file=sys.stderr, flush=True))
    if args.quiet:
        from dalle2.progress_bars import set_stream

        set_stream(open(os.devnull, "w"))  # no bar either
    report = run_eval(settings, progress)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0


def add_eval_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval", help="score bundles on held-out rows: CLIP retrieval, prior cosine, CLIP score, CLIP-feature FID, shapes checker"
    )
    parser.add_argument("--bundles", required=True, help="folder (or s3:// prefix) with clip/ and any of prior/, decoder/, upsampler_*/")
    parser.add_argument("--data", required=True, help="dataset folder or Parquet file: path, file:// or s3://")
    parser.add_argument("--out", default="eval", help="folder for report.json and the PNG grids (default ./eval)")
    parser.add_argument("--count", type=int, default=128, help="held-out rows to score (default 128)")
    parser.add_argument("--steps", default="", help="sampling steps: N for every stage, or prior=N,decoder=N,upsampler=N (default: dalle2 generate's)")
    parser.add_argument(
        "--sampler", default="",
        help="sampler: dpmpp_2m, ddim or ddpm for every stage, or prior=NAME,decoder=NAME,upsampler=NAME (default: dalle2 generate's)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seed-pairs", type=int, default=32,
        help="generate the first N rows again with another seed and report how much a caption's seeds differ, "
        "beside the dataset's own spread for one caption on the shapes dataset (default 32; 0 = skip)",
    )  # fmt: skip
    parser.add_argument("--validation-fraction", type=float, default=0.05, help="the training jobs' data.validation_fraction (default 0.05)")
    parser.add_argument(
        "--split", choices=("validation", "train"), default="validation",
        help="score the held-out rows (default) or training rows, to tell generalisation from memorisation",
    )  # fmt: skip
    parser.add_argument(
        "--phrasing", choices=("dataset", "plain", "held-out"), default="dataset",
        help="captions: the rows' own (default), or rewritten from the shapes dataset's labels: plain "
        "('a small red circle at the top left on a white background') or in word orders and phrasings no training row uses",
    )  # fmt: skip
    parser.add_argument("--prior-guidance", type=float, default=1.0)
    parser.add_argument(
        "--decode-from", choices=("prior", "image"), default="prior",
        help="decoder input: the prior's embeddings of the captions (default) or the held-out images' own CLIP "
        "embeddings, to tell a prior that loses an attribute from a decoder that cannot draw it",
    )
    parser.add_argument("--decoder-guidance", type=float, default=3.0)
    parser.add_argument(
        "--free-upsampling", action="store_true",
        help="score the upsamplers' free samples (default: their output downsamples exactly to the decoder's image, as dalle2 generate)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32, help="rows per model call (default 32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
        help="the networks' precision (autocast; the samplers and metrics stay float32): auto = bf16 on CUDA, fp32 on CPU",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON instead of the summary")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=cmd_eval)
