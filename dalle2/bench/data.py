"""``dalle2 bench data``: how fast the Ray Data pipeline feeds training, on this machine.

Three figures, over the same Parquet files (a synthetic shapes dataset written for the run, or
``--data URI``):

1. images/s that the pipeline (:func:`dalle2.data.ray_reader.preprocessed_rows`: read, decode,
   resize, tokenize) delivers into 2 consuming Ray actors through ``streaming_split``, as Ray
   Train hands shards to its workers (half a CPU each, as in ``decoder-tiny-cpu.yaml``),
   against a plain single-process loop doing the same decode and resize (pyarrow +
   :func:`dalle2.data.preprocess.preprocess_batch`), as a ratio. Whole epochs, timed in
   alternating rounds (:func:`dalle2.bench.timing.interleaved`), medians. When the benchmark
   starts Ray itself, it also reports CPU per image (this process for the loop, every Ray
   process for the pipeline) and the ratio they imply on free cores.
2. the fraction of a training step spent waiting for data: the same 2 actors, set up like the
   Train workers of ``jobs/configs/decoder-tiny-cpu.yaml`` (one torch thread each), each stream
   its shard and take tiny-preset decoder steps (L_simple, Ho et al. 2020; AdamW).
3. what shuffling costs the reader training uses (:mod:`dalle2.bench.shuffle_cost`).

The step uses a random CLIP image embedding: a real decoder step also runs the frozen CLIP's
image encoder, so its steps are longer and its waiting fraction lower than measured here.

Targets on a 2-core machine (issue 4): pipeline >= 1.3x the plain loop, waiting < 10%. Other
work on the machine takes cores away from the pipeline's parallel tasks, not from the plain
loop's single process; ``machine.cpu_parallelism`` reports how many cores two busy processes
actually got while the benchmark started, so that a ratio can be read against it.

Imports of torch, Ray and pyarrow stay in the functions (this module registers the CLI command).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from dalle2.bench.shuffle_cost import format_shuffle_cost, shuffle_cost

TARGET_RATIO = 1.3
TARGET_WAIT_FRACTION = 0.10
CONSUMERS = 2  # issue 4: the pipeline feeds 2 workers
SPIN_ITERATIONS = 5_000_000  # ~0.3 s of pure Python per process


@dataclass(frozen=True)
class DataBenchSettings:
    data: str = ""  # image-caption Parquet (path, file:// or s3://); "" = synthetic shapes
    count: int = 16384  # synthetic rows: an epoch long enough that its start-up is a small part
    source_size: int = 64  # synthetic image side; the decoder's resolution is what they are resized to
    rows_per_file: int = 1024  # as `dalle2 data shapes`
    batch_size: int = 64  # rows per batch the workers take
    preprocess_batch_size: int = 128  # rows per decode call, in both the pipeline and the plain loop
    cpus_per_task: float = 0.25  # as jobs/configs/*-tiny-cpu.yaml
    preprocess_tasks: int = 0  # decode tasks at once; 0 = the pipeline's default (DataConfig)
    repeats: int = 3  # timed epochs of each reader, alternating
    warmup: int = 1  # untimed epochs first (Ray starts its worker processes)
    decoder_batch: int = 16  # per worker, as decoder-tiny-cpu.yaml
    decoder_steps: int = 20  # timed steps per worker
    decoder_warmup: int = 3  # untimed steps first (the first batch waits for the pipeline to start)
    seed: int = 0
    shuffle_buffer: int = 1024  # rows the shuffled training reader mixes (data.shuffle.buffer_rows)


# --------------------------------------------------------------------------- the two readers


def plain_loop_epoch(files: list[str], filesystem, image_size: int, context_length: int, batch_size: int) -> int:
    """One pass in this process: read each file's needed columns, decode, resize, tokenize.
    Returns the rows delivered."""
    import pyarrow.parquet as pq

    from dalle2.data.preprocess import preprocess_batch
    from dalle2.data.schema import TRAINING_COLUMNS

    rows = 0
    for path in files:
        with filesystem.open_input_file(path) as source:
            for record_batch in pq.ParquetFile(source).iter_batches(batch_size=batch_size, columns=list(TRAINING_COLUMNS)):
                batch = {name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in TRAINING_COLUMNS}
                out, _ = preprocess_batch(batch, image_size=image_size, context_length=context_length)
                rows += len(out["key"])
    return rows


class BenchWorker:
    """A Ray actor standing in for a Train worker: drains its shard of the pipeline
    (:meth:`consume`), or takes tiny-preset decoder training steps from it and times how long
    each step waited for its batch (:meth:`train`)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.model = None

    def consume(self, shard, batch_size: int) -> int:
        rows = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            rows += len(batch["key"])
        return rows

    def _build_decoder(self) -> None:
        import torch

        from dalle2.diffusion import GaussianDiffusion
        from dalle2.factory import create_model

        torch.set_num_threads(1)  # as a Train worker with cpus_per_worker < 1
        torch.manual_seed(self.seed)
        self.model = create_model("decoder", "tiny").train()
        self.diffusion = GaussianDiffusion.from_config(self.model.config.diffusion)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def step(self, batch: dict) -> None:
        import numpy as np
        import torch

        from dalle2.data.preprocess import to_model_images

        x0 = to_model_images(torch.from_numpy(np.require(batch["image"], requirements=("C", "W"))))  # [B, 3, S, S]
        tokens = torch.from_numpy(np.require(batch["tokens"], requirements=("C", "W")))  # [B, L]
        n = x0.shape[0]
        image_embed = torch.randn(n, self.model.config.embed_dim)  # stands in for the frozen CLIP's
        drop_image_embed, drop_text = self.model.random_drop_masks(n)  # 10% / 50% (DALL-E 2 sec. 2.1)
        loss = self.diffusion.training_loss(
            self.model, x0, image_embed=image_embed, text_tokens=tokens,
            drop_image_embed=drop_image_embed, drop_text=drop_text,
        ).mean()  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def train(self, shard, batch_size: int, steps: int, warmup: int) -> dict[str, float]:
        if self.model is None:
            self._build_decoder()
        batches = iter(shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True))
        waits, computes = [], []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:  # a short dataset: start another epoch, as the training loop does
                batches = iter(shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True))
                batch = next(batches)
            ready = time.perf_counter()
            self.step(batch)
            waits.append(ready - start)
            computes.append(time.perf_counter() - ready)
        waits, computes = waits[warmup:], computes[warmup:]
        return {"wait_s": sum(waits), "compute_s": sum(computes), "steps": len(waits)}


# --------------------------------------------------------------------------- the benchmark


def _spin(iterations: int) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i
    return time.perf_counter() - start


def cpu_parallelism(processes: int = CONSUMERS) -> float:
    """How many cores ``processes`` CPU-bound processes get together, relative to one alone
    (``processes`` on an idle machine with that many cores; less when other work shares them)."""
    import multiprocessing

    alone = _spin(SPIN_ITERATIONS)
    # Fresh interpreters (spawn): a fork would copy Ray's threads and signal handlers when Ray is
    # already initialised. Each process times its own loop, so their start-up is not counted.
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        together = pool.map(_spin, [SPIN_ITERATIONS] * processes, chunksize=1)
    return round(processes * alone / max(together), 2)


def ray_session_cpu_seconds() -> float:
    """CPU seconds used so far by this process and every process of the local Ray node it
    started (GCS, raylet, agents, workers). Processes that ended are not counted, which is
    why the benchmark keeps Ray's workers alive (``dalle2.data.ray_reader.LOCAL_RAY_SYSTEM_CONFIG``)."""
    import psutil  # a dependency of Ray
    import ray

    session_dir = ray._private.worker._global_node.get_session_dir_path()
    roots = [psutil.Process()]
    for process in psutil.process_iter(["cmdline"]):
        if session_dir in " ".join(process.info["cmdline"] or ()):
            roots.append(process)
    seen: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            seen[root.pid] = root
            seen.update((child.pid, child) for child in root.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    total = 0.0
    for process in seen.values():
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _dataset(settings: DataBenchSettings, workdir: str) -> tuple[str, str]:
    """(URI, description) of the Parquet files the benchmark reads."""
    if settings.data:
        return settings.data, settings.data
    from dalle2.data.shapes import write_shapes_dataset

    uri = os.path.join(workdir, "shapes")
    write_shapes_dataset(uri, count=settings.count, image_size=settings.source_size, seed=settings.seed, rows_per_file=settings.rows_per_file)
    return uri, f"synthetic shapes, {settings.count} PNGs of {settings.source_size}px"


def _decoder_resolution() -> tuple[int, int]:
    from dalle2.factory import load_config

    config = load_config("decoder", "tiny")
    return config.image_size, config.text.context_length


def run_data_bench(settings: DataBenchSettings, log: Optional[Callable[[str], None]] = None) -> dict:
    """Measure both figures; returns them with the settings and the machine they come from.
    Uses the Ray already initialised in this process, or joins the cluster of RAY_ADDRESS, or
    else starts (and then stops) a local node of its own."""
    import ray

    from dalle2.bench.timing import machine_info
    from dalle2.data.ray_reader import LOCAL_RAY_SYSTEM_CONFIG as RAY_SYSTEM_CONFIG  # decode workers kept through pauses
    from dalle2.data.ray_reader import DataConfig, DroppedRows, check_dataset, preprocess_concurrency, preprocessed_rows

    say = log or (lambda message: None)
    machine = machine_info()
    machine["cpu_parallelism"] = cpu_parallelism()
    initialized_here = not ray.is_initialized()
    # Only on a node of its own can the benchmark set Ray's config and attribute Ray's CPU.
    own_node = initialized_here and not os.environ.get("RAY_ADDRESS")
    if own_node:
        ray.init(address="local", _system_config=dict(RAY_SYSTEM_CONFIG))  # ray.init adds to the dict
    elif initialized_here:
        ray.init()
    try:
        with tempfile.TemporaryDirectory(prefix="dalle2-bench-data-") as workdir:
            uri, description = _dataset(settings, workdir)
            filesystem, files = check_dataset(uri)
            image_size, context_length = _decoder_resolution()
            data_config = DataConfig(
                path=uri, image_size=image_size, context_length=context_length, validation_fraction=0.0,
                batch_size=settings.preprocess_batch_size, cpus_per_task=settings.cpus_per_task,
                preprocess_tasks=settings.preprocess_tasks,
            )  # fmt: skip
            dataset = preprocessed_rows(data_config, filesystem, files, "train", DroppedRows.remote())
            decode_tasks = preprocess_concurrency(data_config)

            # Half a CPU each, as decoder-tiny-cpu.yaml's Train workers (cpus_per_worker: 0.5).
            worker_class = ray.remote(num_cpus=0.5)(BenchWorker)
            workers = [worker_class.remote(settings.seed + rank) for rank in range(CONSUMERS)]
            say(f"bench data: {description}; {settings.warmup} untimed + {settings.repeats} timed epochs of each reader")
            plain = functools.partial(plain_loop_epoch, files, filesystem, image_size, context_length, settings.preprocess_batch_size)
            readers = _reader_throughputs(plain, dataset, workers, settings, attribute_cpu=own_node)
            say(f"bench data: {CONSUMERS} workers x {settings.decoder_warmup + settings.decoder_steps} tiny decoder steps")
            step = _decoder_waits(dataset, workers, settings)
            for worker in workers:  # their CPUs go to the training reader's decode tasks next
                ray.kill(worker)
            say("bench data: the training reader (dalle2.data.stream) shuffled vs in file order")
            shuffling = shuffle_cost(data_config, CONSUMERS, settings.batch_size, settings.shuffle_buffer, settings.repeats, settings.warmup, settings.seed)
    finally:
        if initialized_here:
            ray.shutdown()
    ratio = readers["pipeline"]["images_per_s"] / readers["plain"]["images_per_s"]
    if hasattr(os, "getloadavg"):
        machine["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    machine["ray"] = {"own_node": own_node, "system_config": RAY_SYSTEM_CONFIG if own_node else "the cluster's"}
    return {
        "machine": machine,
        "settings": asdict(settings),
        "dataset": {"uri": settings.data or "(temporary)", "what": description, "files": len(files), "image_size": image_size},
        "plain_loop": readers["plain"],
        "pipeline": {**readers["pipeline"], "decode_tasks": decode_tasks},
        "pipeline_vs_plain": round(ratio, 3),
        "cpu_bound_estimate": _cpu_bound_estimate(readers, machine),
        "decoder_step": step,
        "shuffle_cost": shuffling,
        "targets": {
            "pipeline_vs_plain": TARGET_RATIO,
            "data_wait_fraction": TARGET_WAIT_FRACTION,
            "met": {"pipeline_vs_plain": ratio >= TARGET_RATIO, "data_wait_fraction": step["data_wait_fraction"] < TARGET_WAIT_FRACTION},
        },
    }


def _reader_throughputs(plain_epoch: Callable[[], int], dataset, workers: list, settings: DataBenchSettings, attribute_cpu: bool) -> dict:
    """images/s (and CPU per image) of the plain loop and of the pipeline into ``workers``,
    over whole epochs in alternating rounds."""
    import ray

    from dalle2.bench.timing import interleaved, summary

    shards = dataset.streaming_split(CONSUMERS, equal=True)  # as Ray Train splits "train"
    delivered = {"plain": 0, "pipeline": 0}
    pipeline_cpu: list[float] = []  # CPU seconds of every Ray process, per epoch

    def plain() -> None:
        delivered["plain"] = plain_epoch()

    def pipeline() -> None:
        before = ray_session_cpu_seconds() if attribute_cpu else 0.0
        delivered["pipeline"] = sum(ray.get([w.consume.remote(s, settings.batch_size) for w, s in zip(workers, shards)]))
        if attribute_cpu:
            pipeline_cpu.append(ray_session_cpu_seconds() - before)

    samples = interleaved({"plain": plain, "pipeline": pipeline}, settings.repeats, settings.warmup)
    cpu_per_epoch = {
        "plain": statistics.median(sample.cpu_s for sample in samples["plain"]),
        "pipeline": statistics.median(pipeline_cpu[-settings.repeats :]) if pipeline_cpu else None,
    }
    readers = {}
    for name, what in (("plain", "1 process: pyarrow + Pillow"), ("pipeline", f"Ray Data into {CONSUMERS} actors")):
        epoch = summary(samples[name])
        cpu = cpu_per_epoch[name]
        readers[name] = {
            "what": what,
            "images_per_s": round(delivered[name] / epoch["median_s"], 1),
            "images_per_epoch": delivered[name],
            "cpu_ms_per_image": None if cpu is None else round(1000 * cpu / delivered[name], 4),
            "epoch_s": {k: round(v, 3) if isinstance(v, float) else v for k, v in epoch.items() if k != "cpu_median_s"},
        }
    return readers


def _cpu_bound_estimate(readers: dict, machine: dict) -> Optional[dict]:
    """What the ratio would be if all of the machine's cores were free and both readers were
    limited by CPU alone: cores x (plain CPU per image / pipeline CPU per image). Unlike the
    measured ratio, it does not depend on the other work on the machine; it ignores latency."""
    plain, pipeline = readers["plain"]["cpu_ms_per_image"], readers["pipeline"]["cpu_ms_per_image"]
    if pipeline is None:
        return None
    return {
        "pipeline_cpu_vs_plain": round(pipeline / plain, 3),
        "ratio_on_free_cores": round(machine["logical_cores"] * plain / pipeline, 3),
    }


def _decoder_waits(dataset, workers: list, settings: DataBenchSettings) -> dict:
    import ray

    shards = dataset.streaming_split(CONSUMERS, equal=True)
    results = ray.get(
        [w.train.remote(s, settings.decoder_batch, settings.decoder_steps, settings.decoder_warmup) for w, s in zip(workers, shards)]
    )
    wait = sum(r["wait_s"] for r in results)
    compute = sum(r["compute_s"] for r in results)
    steps = sum(r["steps"] for r in results)
    return {
        "what": f"tiny decoder, {CONSUMERS} workers x batch {settings.decoder_batch}, 1 torch thread each",
        "data_wait_fraction": round(wait / (wait + compute), 4),
        "step_s": round((wait + compute) / steps, 4),
        "wait_per_step_s": round(wait / steps, 4),
        "steps": steps,
        "per_worker_wait_fraction": [round(r["wait_s"] / (r["wait_s"] + r["compute_s"]), 4) for r in results],
    }


def _estimate_lines(result: dict) -> list[str]:
    estimate = result["cpu_bound_estimate"]
    if estimate is None:
        return []
    plain, pipeline = result["plain_loop"]["cpu_ms_per_image"], result["pipeline"]["cpu_ms_per_image"]
    return [
        f"  CPU per image: plain {plain:.3f} ms, pipeline {pipeline:.3f} ms (all Ray processes, "
        f"{estimate['pipeline_cpu_vs_plain']:.2f}x); on {result['machine']['logical_cores']} free cores that would be "
        f"{estimate['ratio_on_free_cores']:.2f}x the plain loop"
    ]


def format_data_report(result: dict) -> str:
    machine, plain, pipeline, step = result["machine"], result["plain_loop"], result["pipeline"], result["decoder_step"]
    met = result["targets"]["met"]
    mark = {True: "met", False: "missed"}
    return "\n".join([
        f"dalle2 bench data: {result['dataset']['what']} -> {result['dataset']['image_size']}px, "
        f"medians of {result['settings']['repeats']} interleaved epochs",
        f"  {'plain loop (' + plain['what'] + ')':<46}{plain['images_per_s']:>9.0f} images/s",
        f"  {'pipeline (' + pipeline['what'] + ')':<46}{pipeline['images_per_s']:>9.0f} images/s"
        f"   {result['pipeline_vs_plain']:.2f}x the plain loop (target >= {TARGET_RATIO}x: {mark[met['pipeline_vs_plain']]})",
        f"  decode tasks at once: {pipeline['decode_tasks']} (data.preprocess_tasks; --preprocess-tasks)",
        *_estimate_lines(result),
        f"  {step['what']}: {step['step_s']:.3f} s/step, waiting for data {100 * step['data_wait_fraction']:.1f}% "
        f"(target < {100 * TARGET_WAIT_FRACTION:.0f}%: {mark[met['data_wait_fraction']]})",
        *format_shuffle_cost(result.get("shuffle_cost")),
        f"  machine: {machine['cpu']}, {machine['logical_cores']} logical cores, load {machine.get('load_average_1m')} -> "
        f"{machine.get('load_average_1m_after')}, {CONSUMERS} busy processes got {machine['cpu_parallelism']} cores' worth",
    ])  # fmt: skip


# --------------------------------------------------------------------------- command line


def settings_from_args(args: argparse.Namespace) -> DataBenchSettings:
    return DataBenchSettings(
        data=args.data, count=args.count, source_size=args.source_size, rows_per_file=args.rows_per_file,
        batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup, decoder_batch=args.decoder_batch,
        decoder_steps=args.decoder_steps, decoder_warmup=args.decoder_warmup, seed=args.seed,
        preprocess_tasks=args.preprocess_tasks, shuffle_buffer=args.shuffle_buffer,
    )  # fmt: skip


def cmd_data(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    result = run_data_bench(settings, log)
    print(json.dumps(result, indent=2) if args.json else format_data_report(result))
    return 0


def add_data_benchmark(bench_commands: argparse._SubParsersAction) -> None:
    """Register ``dalle2 bench data`` (a registrar of :data:`dalle2.bench.cli.BENCHMARKS`)."""
    defaults = DataBenchSettings()
    parser = bench_commands.add_parser(
        "data",
        help="images/s of the Ray Data pipeline into 2 workers vs a plain loop, and a tiny decoder step's wait for data",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--data", default="", help="Parquet dataset to read (default: synthetic shapes in a temporary folder)")
    parser.add_argument("--count", type=int, default=defaults.count, help=f"synthetic images (default {defaults.count})")
    parser.add_argument("--source-size", type=int, default=defaults.source_size, help="synthetic image side in pixels")
    parser.add_argument("--rows-per-file", type=int, default=defaults.rows_per_file, help="synthetic rows per Parquet file")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows per batch the workers take")
    parser.add_argument("--preprocess-tasks", type=int, default=defaults.preprocess_tasks,
                        help="decode tasks running at once (default: the pipeline's, the cluster's CPUs + 4)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed epochs of each reader; medians reported")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed epochs of each reader first")
    parser.add_argument("--decoder-batch", type=int, default=defaults.decoder_batch, help="decoder batch per worker")
    parser.add_argument("--decoder-steps", type=int, default=defaults.decoder_steps, help="timed decoder steps per worker")
    parser.add_argument("--decoder-warmup", type=int, default=defaults.decoder_warmup, help="untimed decoder steps first")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--shuffle-buffer", type=int, default=defaults.shuffle_buffer, help="rows the shuffled reader mixes")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON (progress goes to stderr)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=cmd_data)
