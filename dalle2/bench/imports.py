"""``dalle2 bench import``: the Ray Data import against the single-process importer, side by side.

Both convert the same generated WebDataset shards (``--shards`` tar files, half of their images
64px and half 256px JPEGs, img2dataset's layout; 32 x 1,024 by default, about 15 s of work for one
process, since a Ray Data job's fixed ~0.6 s of planning and start would be a third of a
4,096-image import and is nothing in a real one of hours) into our Parquet schema, each into a fresh
folder every round; rounds alternate (:func:`dalle2.bench.timing.interleaved`) and medians are
reported as images/s and their ratio. Target on a 2-core machine (issue 18): >= 1.6x.

Ray starts (or is joined) once, before the timed rounds, so the ratio measures the conversion,
not the cluster's start.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Optional

TARGET_RATIO = 1.6


@dataclass(frozen=True)
class ImportBenchSettings:
    shards: int = 32
    per_shard: int = 1024  # samples per shard, half 64px, half 256px (img2dataset writes 10,000)
    workers: int = 0  # Ray conversion tasks at once; 0 = the cluster's CPU count
    cpus_per_task: float = 0.5
    repeats: int = 3
    warmup: int = 1
    seed: int = 0


def _jpeg(rng, side: int) -> bytes:
    """A JPEG with some structure (smooth gradients and noise), so that it costs a real decode."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([x, y, (x + y) / 2], axis=-1) * rng.uniform(100, 255, size=3)
    pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_bench_shards(folder: str, settings: ImportBenchSettings) -> int:
    """Generated shards ``00000.tar``...; returns the number of images written."""
    import numpy as np

    rng = np.random.default_rng(settings.seed)
    os.makedirs(folder, exist_ok=True)
    for shard in range(settings.shards):
        with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w") as archive:
            for index in range(settings.per_shard):
                side = 64 if index % 2 == 0 else 256
                caption = f"a generated gradient {shard}-{index} at {side} pixels".encode()
                meta = json.dumps({"url": f"https://example.com/{shard}/{index}.jpg", "similarity": 0.3}).encode()
                for extension, data in (("jpg", _jpeg(rng, side)), ("txt", caption), ("json", meta)):
                    info = tarfile.TarInfo(f"{index:09d}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return settings.shards * settings.per_shard


def run_import_bench(settings: ImportBenchSettings, log: Optional[Callable[[str], None]] = None) -> dict:
    import ray

    from dalle2.bench.timing import interleaved, machine_info, summary
    from dalle2.data.importer import import_dataset
    from dalle2.data.ray_import import RayImportConfig, ray_import

    say = log or (lambda message: None)
    started_ray = not ray.is_initialized()
    if started_ray:
        from dalle2.data.ray_reader import init_ray

        init_ray(include_dashboard=False)  # a local Ray keeps its workers between rounds
    try:
        workers = settings.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        with tempfile.TemporaryDirectory(prefix="dalle2-bench-import-") as workdir:
            shards = os.path.join(workdir, "shards")
            images = write_bench_shards(shards, settings)
            say(f"bench import: {images} images in {settings.shards} shards; {settings.warmup} untimed + "
                f"{settings.repeats} timed rounds of each importer, {workers} Ray tasks")  # fmt: skip
            counter = {"n": 0}
            rows: dict[str, int] = {}

            def fresh(name: str) -> str:
                counter["n"] += 1
                out = os.path.join(workdir, f"{name}-{counter['n']}")
                return out

            def single() -> None:
                out = fresh("single")
                rows["single_process"] = import_dataset(shards, out).rows
                shutil.rmtree(out, ignore_errors=True)

            def distributed() -> None:
                out = fresh("ray")
                config = RayImportConfig(src=shards, out=out, workers=workers, cpus_per_task=settings.cpus_per_task)
                rows["ray_data"] = ray_import(config).rows
                shutil.rmtree(out, ignore_errors=True)

            samples = interleaved({"single_process": single, "ray_data": distributed}, settings.repeats, settings.warmup)
    finally:
        if started_ray:
            ray.shutdown()
    result: dict = {"machine": machine_info(), "settings": asdict(settings), "images": images, "ray_tasks": workers}
    for name, timings in samples.items():
        stats = summary(timings)
        result[name] = {"images_per_s": round(rows[name] / stats["median_s"], 1), "rows": rows[name],
                        "median_s": round(stats["median_s"], 3), "min_s": round(stats["min_s"], 3),
                        "max_s": round(stats["max_s"], 3)}  # fmt: skip
    result["ray_vs_single"] = round(result["ray_data"]["images_per_s"] / result["single_process"]["images_per_s"], 3)
    result["target"] = {"ray_vs_single": TARGET_RATIO, "met": result["ray_vs_single"] >= TARGET_RATIO}
    return result


def format_import_report(result: dict) -> str:
    single, ray_data = result["single_process"], result["ray_data"]
    return "\n".join([
        f"dalle2 bench import: {result['images']} images (64px and 256px JPEGs) in {result['settings']['shards']} WebDataset shards",
        f"  single-process importer  {single['images_per_s']:>8.1f} images/s  (median {single['median_s']} s)",
        f"  Ray Data import          {ray_data['images_per_s']:>8.1f} images/s  (median {ray_data['median_s']} s, {result['ray_tasks']} tasks)",
        f"  ratio {result['ray_vs_single']}x (target >= {TARGET_RATIO}x: {'met' if result['target']['met'] else 'not met'}); "
        f"medians of {result['settings']['repeats']} interleaved rounds",
    ])  # fmt: skip


def cmd_import_bench(args: argparse.Namespace) -> int:
    settings = ImportBenchSettings(shards=args.shards, per_shard=args.per_shard, workers=args.workers,
                                   cpus_per_task=args.cpus_per_task, repeats=args.repeats, warmup=args.warmup)  # fmt: skip
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    result = run_import_bench(settings, log)
    print(json.dumps(result, indent=2) if args.json else format_import_report(result))
    return 0


def add_import_benchmark(bench_commands: argparse._SubParsersAction) -> None:
    """Register ``dalle2 bench import`` (a registrar of :data:`dalle2.bench.cli.BENCHMARKS`)."""
    defaults = ImportBenchSettings()
    parser = bench_commands.add_parser(
        "import", help="images/s of the Ray Data import vs the single-process importer on generated WebDataset shards",
        description=__doc__.split("\n\n")[1],
    )  # fmt: skip
    parser.add_argument("--shards", type=int, default=defaults.shards, help="tar shards generated (default 32)")
    parser.add_argument("--per-shard", type=int, default=defaults.per_shard, help="images per shard (default 1024)")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="Ray tasks at once (default: the cluster's CPUs)")
    parser.add_argument("--cpus-per-task", type=float, default=defaults.cpus_per_task, help="CPU each Ray task requests")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed rounds of each importer; medians reported")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed rounds first")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON (progress goes to stderr)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=cmd_import_bench)
