"""``dalle2 bench ...``: the benchmark command group.

``add_bench_commands(commands)`` registers ``bench`` on the main CLI and returns the group's own
subparsers, on which every benchmark registers its subcommand. Benchmarks that live elsewhere add
their registrar to :data:`BENCHMARKS` (or call it on the returned object):

    def add_data_benchmark(bench_commands: argparse._SubParsersAction) -> None:
        parser = bench_commands.add_parser("data", help=...)
        parser.set_defaults(func=...)

Heavy imports (torch, the peers) happen in the handlers, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Iterable, Optional

Registrar = Callable[[argparse._SubParsersAction], None]


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from dalle2.bench.models import BenchSettings, run_bench
    from dalle2.bench.peers import PeersMissing

    settings = BenchSettings(
        preset=args.preset, batch=args.batch, sample_batch=args.sample_batch, sample_steps=args.steps,
        repeats=args.repeats, warmup=args.warmup, seed=args.seed, kinds=tuple(args.models), compare_size=args.compare_size,
    )  # fmt: skip
    peers = "none" if args.no_peers else args.match
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or threads)
        result = run_bench(settings, peers, log)
    except PeersMissing as error:
        print(f"dalle2 bench models: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as found (tests call this in-process)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from dalle2.bench.models import format_report

        print(format_report(result))
    return 0


def add_models_command(bench_commands: argparse._SubParsersAction) -> None:
    from dalle2.bench import BENCH_KINDS, BENCH_PRESETS

    models = bench_commands.add_parser(
        "models",
        help="parameters, training throughput and sampling latency of each model, and the side-by-side peer comparisons",
        description="Times each model of a preset on this machine (medians of interleaved runs), then compares the "
        "decoder training step with dalle2-pytorch and text -> 64x64 image with diffusers' UnCLIPPipeline "
        "(needs the 'bench' extra: pip install -c constraints.txt -e '.[bench]').",
    )
    models.add_argument("--preset", choices=BENCH_PRESETS, default="tiny")
    models.add_argument("--json", action="store_true", help="print the full result as JSON (progress goes to stderr)")
    models.add_argument("--no-peers", action="store_true", help="bench our models only (the peers need the 'bench' extra)")
    models.add_argument(
        "--match", choices=("params", "architecture", "both"), default="params",
        help="size the peers to our parameter counts (within 10%%), to our architecture (same widths), or both",
    )  # fmt: skip
    models.add_argument("--models", nargs="+", choices=BENCH_KINDS, default=list(BENCH_KINDS), help="which of our models to bench")
    models.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    models.add_argument("--sample-batch", type=int, default=2, help="images / captions per sampling call (default 2)")
    models.add_argument("--steps", type=int, default=25, help="DDIM steps of each sampling call (default 25)")
    models.add_argument("--repeats", type=int, default=5, help="timed runs per figure; medians are reported (default 5)")
    models.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    models.add_argument("--compare-size", type=int, default=64, help="image side of the peer comparisons (default 64, the paper's)")
    models.add_argument("--seed", type=int, default=0)
    models.add_argument(
        "--threads", type=int, default=0,
        help="torch CPU threads (default: torch's choice); 1 makes CPU time a clean measure on a shared machine",
    )  # fmt: skip
    models.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    models.set_defaults(func=cmd_models)


def cmd_gpu(args: argparse.Namespace) -> int:
    import torch

    from dalle2.bench.gpu import GpuBenchSettings, format_gpu_report, run_gpu_bench

    if args.device == "cuda" and not torch.cuda.is_available():
        print("dalle2 bench gpu: no CUDA device here; nothing to bench (--device cpu runs the tiny smoke mode)")
        return 0
    smoke = args.device == "cpu"
    settings = GpuBenchSettings(
        device=args.device, presets=("tiny",) if smoke else tuple(args.presets), paper=not smoke and not args.no_paper,
        batch=min(args.batch, 2) if smoke else args.batch, max_batch=2 if smoke else args.max_batch,
        repeats=1 if smoke else args.repeats, warmup=0 if smoke else 2, sample_steps=2 if smoke else args.steps,
        peak_tflops=args.peak_tflops, compile=args.compile, peers=not args.no_peers,
    )  # fmt: skip
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    result = run_gpu_bench(settings, log or (lambda message: None))
    print(json.dumps(result, indent=2) if args.json else format_gpu_report(result))
    return 0


def add_gpu_command(bench_commands: argparse._SubParsersAction) -> None:
    gpu = bench_commands.add_parser(
        "gpu", help="bf16 training TFLOP/s and MFU of each model, the paper-size prior/decoder's largest micro-batch, cascade sampling",
        description="Runs on the CUDA device present (exits 0 saying so when there is none). --device cpu is a smoke "
        "mode on the tiny preset that exercises the same code path (FLOP counting, batch search, report).",
    )  # fmt: skip
    gpu.add_argument("--json", action="store_true", help="print the full result as JSON")
    gpu.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    gpu.add_argument("--presets", nargs="+", choices=("tiny", "small", "base"), default=["small", "base"])
    gpu.add_argument("--batch", type=int, default=32, help="micro-batch of the small and base presets (default 32)")
    gpu.add_argument("--max-batch", type=int, default=4096, help="where the paper-size micro-batch search stops")
    gpu.add_argument("--no-paper", action="store_true", help="skip the paper-size prior and decoder")
    gpu.add_argument("--repeats", type=int, default=5)
    gpu.add_argument("--steps", type=int, default=25, help="sampling steps per stage of the cascade")
    gpu.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak (default: from its name)")
    gpu.add_argument("--compile", action="store_true", help="torch.compile the networks")
    gpu.add_argument("--no-peers", action="store_true", help="skip dalle2-pytorch's decoder (the 'bench' extra)")
    gpu.add_argument("--quiet", action="store_true")
    gpu.set_defaults(func=cmd_gpu)


# Each registrar is light: the heavy imports (Ray, DeepSpeed, serving) are inside its handler.
from dalle2.bench.data import add_data_benchmark  # noqa: E402
from dalle2.bench.imports import add_import_benchmark  # noqa: E402
from dalle2.serve_cli import add_serve_benchmark  # noqa: E402
from dalle2.train.cli import add_train_benchmark  # noqa: E402

BENCHMARKS: tuple[Registrar, ...] = (
    add_models_command, add_gpu_command, add_data_benchmark, add_import_benchmark, add_train_benchmark, add_serve_benchmark,
)  # fmt: skip


def add_bench_commands(subparsers: argparse._SubParsersAction, registrars: Optional[Iterable[Registrar]] = None) -> argparse._SubParsersAction:
    """Register ``bench`` on the main CLI's subparsers; returns bench's own subparsers."""
    bench = subparsers.add_parser("bench", help="benchmarks on this machine: our models, and our models against peers")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for register in BENCHMARKS if registrars is None else registrars:
        register(bench_commands)
    return bench_commands
