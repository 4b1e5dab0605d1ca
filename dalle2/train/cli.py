"""``dalle2 train {clip,prior,decoder,upsampler}`` and ``dalle2 export RUN OUT``.

    dalle2 train decoder --config jobs/configs/decoder-tiny-cpu.yaml --data s3://bucket/shapes \\
        --clip runs/clip-bundle --storage s3://bucket/runs --name decoder-64 --workers 2 --zero 3
    dalle2 export s3://bucket/runs/decoder-64 bundles/decoder
    dalle2 bench train [--json]      (add_train_benchmark: a registrar of the ``bench`` group)

The same arguments work for ``python -m jobs.train_decoder ...`` (and through
``ray job submit --working-dir . -- python -m jobs.train_decoder ...``). Flags override the
config file; the run is ``<storage>/<name>``, and the same name resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from typing import Any, Optional, Sequence

from dalle2.train.config import JOB_KINDS

JOB_HELP = {
    "clip": "CLIP, contrastive loss over the batch of all workers",
    "prior": "the diffusion prior, from a frozen CLIP (--clip)",
    "decoder": "the diffusion decoder, from a frozen CLIP (--clip)",
    "upsampler": "a diffusion upsampler (64->256 or 256->1024, model.kind in the config)",
}


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="job YAML (jobs/configs/*.yaml); default: the built-in tiny CPU settings")
    parser.add_argument("--data", help="image-caption Parquet: folder, file:// or s3://bucket/prefix")
    parser.add_argument("--clip", help="bundle of the frozen CLIP (prior, decoder)")
    parser.add_argument("--storage", help="where runs live: folder or s3://bucket/prefix (default: runs)")
    parser.add_argument("--name", help="run name; the same name resumes from its latest checkpoint")
    parser.add_argument("--workers", type=int, help="Ray Train workers")
    parser.add_argument("--zero", type=int, help="ZeRO stage 0-3")
    parser.add_argument("--max-steps", type=int, help="optimizer steps in total")
    parser.add_argument("--batch-size", type=int, help="per worker and micro-step")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's, DeepSpeed's and the libraries' output on the console as well as in <storage>/logs/<name>.log")  # fmt: skip


def job_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the flags set (deep-merged over the YAML, then type-checked)."""
    overrides: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("data", "path", args.data)
    put("run", "storage", args.storage)
    put("run", "name", args.name)
    put("scaling", "workers", args.workers)
    put("deepspeed", "zero_stage", args.zero)
    put("loop", "max_steps", args.max_steps)
    put("loop", "batch_size", args.batch_size)
    if args.clip is not None:
        overrides["clip"] = args.clip
    if args.gpu:
        overrides.setdefault("scaling", {}).update({"use_gpu": True, "backend": "nccl", "gpus_per_worker": 1.0})
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    """Train under the pipeline's console: the job's header, our progress lines and a summary
    on the terminal; Ray's, DeepSpeed's and the libraries' output in ``<storage>/logs/<name>.log``
    (``--verbose``: on the terminal too); then the summary as one JSON line for scripts."""
    import ray

    from dalle2.train.config import load_job_config
    from dalle2.train.launch import check_job, run_job
    from dalle2.train.preflight import check_cluster_address, check_resume
    from dalle2.train.progress import final_metrics, format_duration, job_header
    from dalle2.console import Console, log_dir_of

    # Ray Data's bars would be printed again on the terminal as the process exits, after the console.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    job = load_job_config(args.job, args.config, job_overrides(args))
    # The checks run_job makes first, made here too, before the console opens its log: bad input
    # is one line on stderr (exit 2) and leaves nothing written.
    check_resume(job, check_job(job).run_uri)
    check_cluster_address(os.environ.get("RAY_ADDRESS"))
    console = Console(log_dir_of(job.run.storage), echo=getattr(args, "verbose", False), name=f"train {args.job}")
    with console:
        title, rows = job_header(job)
        console.header(title, **rows, log=console.section(job.run.name))
        started = time.monotonic()
        owns_ray = not ray.is_initialized()
        try:
            result = run_job(job, on_progress=console.say)
        except (ValueError, OSError):
            # A bad input found by the job's checks: the caller prints its one line (exit 2);
            # the traceback stays in the log.
            traceback.print_exc()
            raise
        except Exception as error:  # noqa: BLE001 - a training failure: its message here, its traceback in the log
            console.error(error)
            return 1
        finally:
            if owns_ray and ray.is_initialized():
                ray.shutdown()  # inside the console: Ray's goodbyes go to the log, not after our summary
        figures = final_metrics(result.metrics)
        console.say(f"{args.job}: done in {format_duration(time.monotonic() - started)}" + (f" | {figures}" if figures else "")
                    + f" | run {result.run_uri} | bundle: dalle2 export {result.run_uri} OUT")  # fmt: skip
    summary = {"run": result.run_uri, "checkpoint": result.checkpoint_uri, "dropped_rows": result.dropped_rows}
    summary.update({k: result.metrics[k] for k in ("step", "loss", "val_loss") if k in result.metrics})
    print(json.dumps(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dalle2.train.export import export_run

    # What was fetched goes to stderr: stdout stays the one JSON line below.
    out = export_run(args.run, args.out, weights=args.weights, log=lambda line: print(line, file=sys.stderr))
    print(json.dumps({"bundle": out, "run": args.run, "weights": args.weights}))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from dalle2.train.bench import TrainBenchSettings, run, summary

    settings = TrainBenchSettings(
        job=args.job, preset=args.preset, batch_size=args.batch_size, steps=args.steps, threads=args.threads,
        memory_job=args.memory_job, memory_preset=args.memory_preset, memory_precision=args.memory_precision,
    )  # fmt: skip
    # Ray forwards the workers' logs to the driver's stdout: send them to stderr, so stdout is the figures alone.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(settings, use_gpu=args.gpu)
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


def add_train_benchmark(bench_commands: argparse._SubParsersAction) -> None:
    """Register ``train`` under the CLI's ``dalle2 bench`` group (``dalle2 bench train``)."""
    bench = bench_commands.add_parser("train", help="Ray Train + DeepSpeed loop vs a plain loop; memory per worker at ZeRO 0-3")
    bench.add_argument("--job", choices=JOB_KINDS, default="decoder", help="model of the overhead comparison")
    bench.add_argument("--preset", default="tiny")
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--threads", type=int, default=1, help="threads of both loops (CPUs of the Ray worker)")
    bench.add_argument("--memory-job", choices=JOB_KINDS, default="upsampler", help="model of the ZeRO memory comparison")
    bench.add_argument("--memory-preset", default="small", help="a model large enough that its state dominates (e.g. decoder small)")
    bench.add_argument("--memory-precision", choices=("bf16", "fp32"), default="bf16")
    bench.add_argument("--gpu", action="store_true", help="workers on GPUs (nccl)")
    bench.add_argument("--json", action="store_true", help="the figures as JSON")
    bench.set_defaults(func=cmd_bench_train)


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train {clip,prior,decoder,upsampler}`` and ``export`` on the main CLI's subparsers."""
    train = subparsers.add_parser("train", help="train a model with Ray Train + DeepSpeed (resumable by --name)")
    jobs = train.add_subparsers(dest="job", required=True)
    for job in JOB_KINDS:
        parser = jobs.add_parser(job, help=JOB_HELP[job])
        add_job_arguments(parser)
        parser.set_defaults(func=cmd_train, job=job)

    export = subparsers.add_parser(
        "export", help="consolidate a run's latest checkpoint (any ZeRO stage) into a model bundle",
        description="Consolidate a run's latest complete checkpoint into a model bundle. Local disk it needs for an "
        "s3:// run: the EMA export (default) fetches the EMA slices (4 bytes per parameter) and rank 0's model states "
        "(its buffers; at ZeRO 1-2 also the module in the training dtype, 2 bytes per parameter in bf16), never the "
        "optimizer state; --weights raw fetches the fp32 master weights and Adam's moments (about 12 bytes per "
        "parameter, ~57 GB for the paper decoder). A local run is read where it lies. It logs what it fetched.",
    )  # fmt: skip
    export.add_argument("run", help="run folder (<storage>/<name>) or one checkpoint folder in it")
    export.add_argument("out", help="bundle folder: path, file:// or s3://bucket/prefix")
    export.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default; the trained weights when none) or raw")
    export.set_defaults(func=cmd_export)


def main_for_job(job: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m jobs.train_<job>``: the ``dalle2 train <job>`` arguments."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    parser = argparse.ArgumentParser(prog=f"python -m jobs.train_{job}", description=f"Train {JOB_HELP[job]}.")
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    args.job = job
    from dalle2.data.storage import StorageError

    try:
        return cmd_train(args)
    except (ValueError, FileNotFoundError, StorageError) as error:
        print(f"train {job}: error: {error}", file=sys.stderr)
        return 2
