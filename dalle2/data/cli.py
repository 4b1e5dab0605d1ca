"""``dalle2 data ...``: build and import image-caption datasets (see :mod:`dalle2.data.schema`).

    dalle2 data shapes OUT [--count N] [--size 64] [--seed S] [--rows-per-file R]
    dalle2 data import SRC OUT [--workers N] [--max-side S] [--image-column C] [--caption-column C] [--key-column C] [--in-process]
    dalle2 data embed DATA OUT --clip BUNDLE [--actors N] [--batch-size B] [--accelerator auto|cpu|gpu] [--no-images]

OUT and SRC are local paths, file:// or s3://bucket/prefix (standard AWS configuration).
``import`` (a resumable Ray Data job: rerun it into the same OUT after a crash) and ``embed`` run on Ray: the cluster in RAY_ADDRESS, or a local one started for it.
"""

from __future__ import annotations

import argparse
import json


def cmd_shapes(args: argparse.Namespace) -> int:
    from dalle2.data.shapes import write_shapes_dataset

    files = write_shapes_dataset(
        args.out, count=args.count, image_size=args.size, seed=args.seed, rows_per_file=args.rows_per_file
    )
    print(json.dumps({"out": args.out, "rows": args.count, "files": len(files)}))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from dalle2.data.importer import import_dataset
    from dalle2.data.ray_import import RayImportConfig, ray_import

    if args.in_process:
        if args.max_side or args.workers:
            raise SystemExit("dalle2 data import: --max-side and --workers are options of the Ray job, not of --in-process")
        report = import_dataset(
            args.src, args.out, image_column=args.image_column, caption_column=args.caption_column,
            key_column=args.key_column, rows_per_file=args.rows_per_file,
        )  # fmt: skip
    else:
        try:
            config = RayImportConfig(
                src=args.src, out=args.out, workers=args.workers, max_side=args.max_side, rows_per_file=args.rows_per_file,
                cpus_per_task=args.cpus_per_task, image_column=args.image_column, caption_column=args.caption_column,
                key_column=args.key_column,
            )  # fmt: skip
        except ValueError as error:
            raise SystemExit(f"dalle2 data import: {error}") from None
        report = ray_import(config)
    summary = {"out": args.out, "rows": report.rows, "files": len(report.files), "skipped": dict(report.skipped)}
    print(json.dumps(summary))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from dalle2.data.embed import EmbedConfig, embed_dataset

    config = EmbedConfig(
        data=args.data,
        out=args.out,
        clip=args.clip,
        actors=args.actors,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        keep_images=args.images,
    )
    report = embed_dataset(config)
    print(json.dumps({"out": args.out, "rows": report.rows, "files": len(report.files), "dropped": report.dropped}))
    return 0


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``dalle2 data embed``, also those of ``python -m jobs.embed``;
    :func:`cmd_embed` runs them."""
    parser.add_argument("data", help="image-caption dataset: path, file:// or s3://bucket/prefix")
    parser.add_argument("out", help="output folder for the embedding Parquet files")
    parser.add_argument("--clip", required=True, help="CLIP model bundle (path, file:// or s3://)")
    parser.add_argument("--actors", type=int, default=1, help="CLIP replicas (default 1; one per GPU)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per CLIP call (default 64)")
    parser.add_argument(
        "--accelerator", choices=["auto", "cpu", "gpu"], default="auto", help="auto: a GPU per actor if the cluster has GPUs or its autoscaler can add them"
    )
    parser.add_argument(
        "--images", action=argparse.BooleanOptionalAction, default=True,
        help="keep each row's encoded image in the output, so the decoder can train from it too (default); "
        "--no-images: the embeddings alone (enough for the prior)",
    )  # fmt: skip


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data`` and its subcommands on the main CLI's subparsers."""
    data = subparsers.add_parser("data", help="build and import image-caption Parquet datasets")
    commands = data.add_subparsers(dest="data_command", required=True)

    shapes = commands.add_parser(
        "shapes", help="deterministic synthetic dataset: colored shapes with captions stating their attributes"
    )
    shapes.add_argument("out", help="output folder: path, file:// or s3://bucket/prefix")
    shapes.add_argument("--count", type=int, default=4096, help="number of images (default 4096)")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    shapes.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    shapes.add_argument("--rows-per-file", type=int, default=1024, help="rows per Parquet shard (default 1024)")
    shapes.set_defaults(func=cmd_shapes)

    importer = commands.add_parser(
        "import", help="convert a folder of images + captions, or Parquet with other column names"
    )
    importer.add_argument(
        "src", help="folder of images (.txt captions, captions.jsonl or captions.csv), Parquet, or WebDataset "
        "tar shards (one .tar, a folder of them, or a brace list such as s3://b/laion/{00000..00099}.tar)",
    )  # fmt: skip
    importer.add_argument("out", help="output folder: path, file:// or s3://bucket/prefix")
    importer.add_argument("--image-column", default="image", help="Parquet column of image bytes (img2dataset: jpg)")
    importer.add_argument(
        "--caption-column", default="caption", help="caption column in Parquet/jsonl/csv (img2dataset: txt)"
    )
    importer.add_argument("--key-column", default="key", help="Parquet column of row ids, if any (default key)")
    importer.add_argument("--rows-per-file", type=int, default=1024, help="rows per Parquet shard (default 1024)")
    importer.add_argument(
        "--workers", type=int, default=0, help="conversion tasks at once on Ray (default 0: the cluster's CPU count)"
    )
    importer.add_argument("--max-side", type=int, default=0, help="shrink images whose longer side exceeds this (>= 8)")
    importer.add_argument("--cpus-per-task", type=float, default=0.5, help="CPU each conversion task requests (default 0.5)")
    importer.add_argument(
        "--in-process", action="store_true",
        help="the single-process importer (no Ray, no resume): small inputs, and the baseline of `dalle2 bench import`",
    )  # fmt: skip
    importer.set_defaults(func=cmd_import)

    embed = commands.add_parser("embed", help="CLIP text and image embeddings of a dataset, by a pool of Ray actors")
    add_embed_arguments(embed)
    embed.set_defaults(func=cmd_embed)
