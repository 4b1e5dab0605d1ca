"""Embed a dataset with a frozen CLIP: ``python -m jobs.embed DATA OUT --clip BUNDLE [...]``
(the arguments of ``dalle2 data embed``; see dalle2.data.cli and dalle2.data.embed).

    ray job submit --working-dir . -- python -m jobs.embed s3://bucket/shapes s3://bucket/shapes-embeddings \\
        --clip s3://bucket/bundles/clip --actors 2 --accelerator gpu

Inside a Ray Job, RAY_ADDRESS names the cluster; run by hand, Ray starts a local one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from dalle2.data.cli import add_embed_arguments, cmd_embed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.embed",
        description="CLIP text and image embeddings of an image-caption dataset, written as Parquet.",
    )
    add_embed_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    try:
        return cmd_embed(args)
    except (ValueError, OSError) as error:  # bad bundle or dataset, output not empty, unreadable storage
        print(f"embed: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
