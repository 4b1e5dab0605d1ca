"""The whole system, stage by stage: data -> CLIP -> embed -> prior -> decoder -> upsampler -> serve -> images.

    python -m jobs.stages --config jobs/configs/demo-tiny-cpu.yaml     # = dalle2 pipeline --config ...
    dalle2 demo                                                          # the same with the demo config

The embed stage runs the trained CLIP once over the dataset (``dalle2 data embed``, keeping the
images) into ``<workdir>/embeddings``; the prior and the decoder train from those rows, so no
CLIP runs in their training steps (``embed: null`` in the config trains them from the images,
with the frozen CLIP on every worker). The upsampler learns from the images alone.

Each stage writes one output whose presence means "done": the dataset's Parquet files, the
embeddings' manifest (``embed.json``, written after every Parquet file), a model bundle
(``dalle2 export`` writes its config.json last), the PNG grid. Rerunning skips finished stages;
a training stage that was interrupted resumes its Ray Train run by name (same
``<workdir>/runs/<stage>``); an interrupted embed stage starts over (its partial output is removed).
Paths may be local or ``s3://``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

from dalle2 import progress_bars
from dalle2.config import from_dict
from dalle2.data import storage
from dalle2.train.progress import final_metrics, format_duration, job_header
from jobs.budget import Budget, loop_overrides, measure_budget
from dalle2.console import Console, log_dir_of
from jobs.eval_stage import EvalSpec, stage_eval
from jobs.serve_stage import check_port_free, stage_serve

STAGES = ("clip", "embed", "prior", "decoder", "upsampler")  # in order, after the data; then serving
FROM_EMBEDDINGS = ("prior", "decoder")  # the stages that train from the embed stage's rows
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "demo-tiny-cpu.yaml")


@dataclass(frozen=True)
class StageSpec:
    config: str = ""  # job YAML, relative to the pipeline config's folder
    max_steps: Optional[int] = None
    # The fewest steps that still meet the quality targets: a time budget (--budget-minutes)
    # never cuts the stage below it. None = the stage's steps are not cut.
    min_steps: Optional[int] = None
    workers: Optional[int] = None
    zero_stage: Optional[int] = None
    # clip only: a CLIP bundle to use as it is (`dalle2 clip bundle` of a pretrained open_clip
    # checkpoint); the clip stage then trains nothing.
    bundle: str = ""

    def __post_init__(self) -> None:
        if not self.config and not self.bundle:
            raise ValueError("a stage needs its job config (config: FILE)")
        if self.min_steps is not None and not 1 <= self.min_steps <= (self.max_steps or self.min_steps):
            raise ValueError(f"min_steps {self.min_steps} must be in [1, max_steps]")


@dataclass(frozen=True)
class EmbedSpec:
    """The embed stage (``dalle2 data embed``): CLIP embeddings and the images, once."""

    actors: int = 1  # CLIP replicas: one per GPU, or a few on CPUs
    batch_size: int = 64
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"  # auto: a GPU per actor when the cluster has GPUs or its autoscaler can add them

    def __post_init__(self) -> None:
        if self.accelerator not in ("auto", "cpu", "gpu"):
            raise ValueError(f"embed.accelerator: {self.accelerator!r} is not one of auto, cpu, gpu")
        if self.actors < 1 or self.batch_size < 1:
            raise ValueError("embed: actors and batch_size must be >= 1")


@dataclass(frozen=True)
class ShapesSpec:
    count: int = 4096
    size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class ServeSpec:
    prompts: tuple[str, ...] = ("a red circle", "a blue square", "a green triangle")
    n: int = 2
    port: int = 0  # 0 = any free port on 127.0.0.1
    config: str = ""  # serve config YAML; "" = serve/config.yaml


@dataclass(frozen=True)
class PipelineConfig:
    workdir: str  # runs, bundles and outputs live under it (local or s3://)
    clip: StageSpec
    prior: StageSpec
    decoder: StageSpec
    upsampler: Optional[StageSpec] = None
    # None (`embed: null`): no embed stage; the prior and the decoder run the frozen CLIP on images.
    embed: Optional[EmbedSpec] = field(default_factory=EmbedSpec)
    data: str = ""  # image-caption Parquet; "" = build the shapes dataset in <workdir>/data
    shapes: ShapesSpec = field(default_factory=ShapesSpec)
    serve: ServeSpec = field(default_factory=ServeSpec)
    base_dir: str = "."  # where relative job configs are found (the pipeline config's folder)
    # Held-out fraction of the rows (by a hash of each key) for every stage; None = each job
    # config's own data.validation_fraction. `dalle2 eval --validation-fraction` takes the same.
    validation_fraction: Optional[float] = None
    eval: Optional[EvalSpec] = None  # the quality check after training (jobs.eval_stage); None = none

    @property
    def data_uri(self) -> str:
        return self.data or storage.join(self.workdir, "data")

    @property
    def embeddings_uri(self) -> str:
        return storage.join(self.workdir, "embeddings")

    def __post_init__(self) -> None:
        if self.validation_fraction is not None and not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        for stage in ("prior", "decoder", "upsampler"):
            spec = getattr(self, stage)
            if spec is not None and spec.bundle:
                raise ValueError(f"{stage}.bundle: only the clip stage takes a ready bundle (clip: {{bundle: DIR}})")

    def bundle(self, name: str) -> str:
        if name == "clip" and self.clip.bundle:
            return self.clip.bundle  # a pretrained CLIP: not trained here
        return storage.join(self.workdir, "bundles", name)

    @property
    def grid_uri(self) -> str:
        return storage.join(self.workdir, "demo-grid.png")


def load_pipeline_config(path: str) -> PipelineConfig:
    import yaml

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such pipeline config")
    with open(path) as file:
        raw = yaml.safe_load(file) or {}
    raw.setdefault("base_dir", os.path.dirname(os.path.abspath(path)))
    return from_dict(PipelineConfig, raw)


CONSOLE = Console()  # run_pipeline's console while it runs; a plain one for in-process callers


def say(message: str) -> None:
    CONSOLE.say(message)


def header(title: str, **rows: str) -> None:
    CONSOLE.header(title, **rows)


# --- stages --------------------------------------------------------------------------------


def stage_data(config: PipelineConfig) -> None:
    from dalle2.data.schema import dataset_files

    if config.data:
        dataset_files(config.data)  # a user's dataset must exist: one clear error, before training
        return
    if storage.exists(config.data_uri) and storage.list_files(config.data_uri, ".parquet"):
        say(f"data: {config.data_uri} exists, skipped")
        return
    from dalle2.data.shapes import write_shapes_dataset

    header("data: the synthetic shapes dataset", what=f"{config.shapes.count} images of {config.shapes.size}px, seed {config.shapes.seed}",
           into=config.data_uri, log=CONSOLE.section("data"))  # fmt: skip
    started = time.monotonic()
    files = write_shapes_dataset(config.data_uri, count=config.shapes.count, image_size=config.shapes.size, seed=config.shapes.seed)
    say(f"data: done in {format_duration(time.monotonic() - started)} | {len(files)} Parquet files")


def _require_clip_bundle(config: PipelineConfig, stage: str) -> str:
    clip = config.bundle("clip")
    if not storage.exists(storage.join(clip, "config.json")):
        raise FileNotFoundError(f"{stage}: its input bundle {clip} is absent (run the clip stage first)")
    return clip


def stage_embed(config: PipelineConfig, spec: EmbedSpec) -> str:
    """CLIP embeddings of the dataset, with its images, for the prior and the decoder; returns
    their URI. Done when the manifest exists; a partial output (no manifest) is removed first."""
    from dalle2.data.embed import EmbedConfig, embed_dataset, is_complete

    out = config.embeddings_uri
    if is_complete(out):
        say(f"embed: {out} exists, skipped")
        return out
    clip = _require_clip_bundle(config, "embed")
    if storage.exists(out):
        say(f"embed: removing the incomplete output of an interrupted run at {out}")
        storage.delete(out)
    header("embed: CLIP embeddings of the dataset, once, for the prior and the decoder",
           data=config.data_uri, clip=clip, into=out, log=CONSOLE.section("embed"))  # fmt: skip
    started = time.monotonic()
    report = embed_dataset(
        EmbedConfig(
            data=config.data_uri, out=out, clip=clip, actors=spec.actors, batch_size=spec.batch_size,
            accelerator=spec.accelerator, keep_images=True,
        )
    )  # fmt: skip
    dropped = f", dropped {report.dropped}" if report.dropped else ""
    say(f"embed: done in {format_duration(time.monotonic() - started)} | {report.rows} rows in {len(report.files)} files{dropped}")
    return out


def _bundle_name(job: str, model_kind: str) -> str:
    return model_kind if job == "upsampler" else job


def job_config_for(config: PipelineConfig, job: str, spec: StageSpec, loop: Optional[dict] = None):
    """The stage's job config: its YAML with the pipeline's data, run, CLIP and scaling (and
    ``loop`` overrides, a time budget's cut) applied."""
    from dalle2.train.config import load_job_config

    from_embeddings = config.embed is not None and job in FROM_EMBEDDINGS
    overrides: dict[str, Any] = {
        "data": {"path": config.embeddings_uri, "format": "embeddings"} if from_embeddings else {"path": config.data_uri},
        "run": {"storage": storage.join(config.workdir, "runs"), "name": job},
        "loop": {**({"max_steps": spec.max_steps} if spec.max_steps is not None else {}), **(loop or {})},
    }
    if config.validation_fraction is not None:
        overrides["data"]["validation_fraction"] = config.validation_fraction
    if job in ("prior", "decoder"):
        overrides["clip"] = config.bundle("clip")
    if spec.workers is not None:
        overrides["scaling"] = {"workers": spec.workers}
    if spec.zero_stage is not None:
        overrides["deepspeed"] = {"zero_stage": spec.zero_stage}
    return load_job_config(job, os.path.join(config.base_dir, spec.config), overrides)


def pending_jobs(config: PipelineConfig) -> dict[str, Any]:
    """The training stages whose bundles are not there yet: stage -> job config."""
    jobs = {}
    for job in ("clip", "prior", "decoder", "upsampler"):
        spec = getattr(config, job)
        if spec is None or (job == "clip" and spec.bundle):
            continue
        job_config = job_config_for(config, job, spec)
        if not storage.exists(storage.join(config.bundle(_bundle_name(job, job_config.model_kind)), "config.json")):
            jobs[job] = job_config
    return jobs


def plan_budget(config: PipelineConfig, minutes: float) -> Budget:
    """Time a few steps of each stage still to run, plan their steps within ``minutes``, say so."""
    from dalle2.data.embed import is_complete

    jobs = pending_jobs(config)
    floors = {job: getattr(config, job).min_steps for job in jobs if getattr(config, job).min_steps is not None}
    say(f"budget: timing a few steps of each stage to train ({', '.join(jobs) or 'none left'})")
    budget = measure_budget(minutes * 60, jobs, floors, embed_pending=config.embed is not None and not is_complete(config.embeddings_uri))
    for line in budget.opening_lines():
        say(line)
    return budget


def stage_train(config: PipelineConfig, job: str, spec: StageSpec, budget: Optional[Budget] = None) -> str:
    """Train one model (resuming its run) and export its bundle; returns the bundle URI. With a
    ``budget``, the stage runs the steps the budget gives it (its ``max_steps`` lowered)."""
    from dalle2.train.export import export_run
    from dalle2.train.launch import run_job

    if job == "clip" and spec.bundle:
        _require_clip_bundle(config, "clip")
        say(f"clip: the bundle {spec.bundle} is used as it is (clip.bundle), no CLIP training")
        return spec.bundle
    from_embeddings = config.embed is not None and job in FROM_EMBEDDINGS
    job_config = job_config_for(config, job, spec)
    bundle = config.bundle(_bundle_name(job, job_config.model_kind))
    if storage.exists(storage.join(bundle, "config.json")):
        say(f"{job}: bundle {bundle} exists, skipped")
        return bundle
    if budget is not None and job in budget.configured:
        job_config = job_config_for(config, job, spec, loop_overrides(job_config.loop, budget.steps_for(job, say)))
    if job in ("prior", "decoder"):
        _require_clip_bundle(config, job)
    if from_embeddings:
        from dalle2.data.embed import is_complete

        if not is_complete(config.embeddings_uri):
            raise FileNotFoundError(f"{job}: its input embeddings {config.embeddings_uri} are absent or incomplete (run the embed stage first)")
    title, rows = job_header(job_config)
    header(title, **rows, log=CONSOLE.section(job))
    started = time.monotonic()
    result = run_job(job_config, on_progress=say if CONSOLE.redirected else None)
    export_run(result.run_uri, bundle)
    if budget is not None:
        budget.record(job, time.monotonic() - started, job_config.loop.max_steps)
    metrics = final_metrics(result.metrics)
    say(f"{job}: done in {format_duration(time.monotonic() - started)}" + (f" | {metrics}" if metrics else "") + f" | bundle {bundle}")
    return bundle


def start_ray() -> str:
    """Join RAY_ADDRESS (``ray job submit`` sets it) or start a local Ray with its dashboard on
    127.0.0.1; returns the dashboard's URL ("" when the cluster has none). The dashboard is
    more than a view: Ray Train's placement-group cleaner asks its State API whether the
    controller lives, and without one it asks 127.0.0.1:8265, where another Ray may answer
    "no such actor" and have this run's workers removed."""
    import ray

    from dalle2.train.preflight import local_ray_options

    address = os.environ.get("RAY_ADDRESS") or "local"
    options = local_ray_options() if address == "local" else {}
    context = ray.init(address=address, **options)
    url = context.dashboard_url or ""
    return url if not url or "://" in url else f"http://{url}"


def run_pipeline(config: PipelineConfig, stop_after: Optional[str] = None, budget_minutes: Optional[float] = None) -> dict[str, str]:
    """Run (or resume) every stage; returns what each produced. Joins the cluster at
    RAY_ADDRESS (``ray job submit`` sets it) or starts a local one, and stops only what it started.
    With ``budget_minutes``, the training stages' steps are planned to fit it (:mod:`jobs.budget`)."""
    import ray

    outputs: dict[str, str] = {}
    started = time.monotonic()
    if config.serve.port and stop_after is None:
        check_port_free(config.serve.port)  # before any stage: not after half an hour of training
    stage_data(config)
    outputs["data"] = config.data_uri
    budget = plan_budget(config, budget_minutes) if budget_minutes else None  # before Ray: nothing else on the cores
    owns_ray = not ray.is_initialized()
    if owns_ray:
        CONSOLE.section("ray")
        outputs["dashboard"] = start_ray()
        if outputs["dashboard"]:
            say(f"Ray dashboard: {outputs['dashboard']} (jobs, Train runs, Serve applications, metrics; its token: `ray get-auth-token`)")
    try:
        for stage in STAGES:
            spec = getattr(config, stage)
            if spec is None:
                continue
            stage_started = time.monotonic()
            outputs[stage] = stage_embed(config, spec) if stage == "embed" else stage_train(config, stage, spec, budget)
            if budget is not None and stage == "embed":
                budget.record(stage, time.monotonic() - stage_started)
            if stop_after == stage:
                return outputs
        if budget is not None:
            for line in budget.closing_lines():
                say(line)
        if config.eval is not None and config.decoder is not None:
            fraction = job_config_for(config, "decoder", config.decoder).data.validation_fraction  # the split no model trained on
            outputs["eval"] = stage_eval(config, config.eval, fraction, CONSOLE)
        outputs["grid"], outputs["served"] = stage_serve(config, CONSOLE)
    finally:
        if owns_ray:
            CONSOLE.section("ray")
            ray.shutdown()
    _closing_lines(config, outputs, time.monotonic() - started)
    return outputs


def _closing_lines(config: PipelineConfig, outputs: dict[str, str], seconds: float) -> None:
    bundles = storage.join(config.workdir, "bundles")
    names = [os.path.basename(outputs[stage].rstrip("/")) for stage in STAGES if stage in outputs and stage != "embed"]
    say(f"done in {format_duration(seconds)}")
    header(
        "where things are",
        images=outputs["grid"],
        bundle=f"{bundles} ({', '.join(names)})",
        runs=f"tensorboard --logdir {storage.join(config.workdir, 'runs')}",
        logs=CONSOLE.log_dir or "",
        serve=f"served at {outputs['served']} during the run; again: dalle2 serve --bundles {bundles}",
        eval=outputs.get("eval") or f"dalle2 eval --bundles {bundles} --data {config.data_uri} --out {storage.join(config.workdir, 'eval')}",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m jobs.stages", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)
    return cmd_pipeline(args)


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="pipeline YAML (default: the tiny CPU demo)")
    parser.add_argument("--workdir", help="override the config's workdir (local or s3://)")
    parser.add_argument("--data", help="override the config's dataset (image-caption Parquet: a folder, file:// or s3://)")
    parser.add_argument("--stop-after", choices=STAGES, help="stop after this stage (before serving)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="plan the training stages' steps to fit this many minutes on this machine (timed at the start; "
                             "no stage below its min_steps); 0 = the configured steps. dalle2 demo: 30, dalle2 pipeline: 0")  # fmt: skip
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's, DeepSpeed's and the libraries' output on the console as well as in <workdir>/logs")  # fmt: skip


def cmd_pipeline(args: argparse.Namespace) -> int:
    import dataclasses

    # Ray Data's bars, drawn by the workers and forwarded to the driver, would land in the logs, and
    # their last state is printed again on the terminal as the driver exits, after our console.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    global CONSOLE
    try:
        config = load_pipeline_config(args.config)
        if args.workdir:
            config = dataclasses.replace(config, workdir=args.workdir)
        if args.data:
            config = dataclasses.replace(config, data=args.data)
    except (ValueError, OSError) as error:
        print(f"pipeline: error: {error}", file=sys.stderr)
        return 2
    CONSOLE = Console(log_dir_of(config.workdir), echo=getattr(args, "verbose", False))
    with CONSOLE:
        progress_bars.set_stream(CONSOLE.stream)  # bars on the terminal, not in the logs
        say(f"pipeline {args.config}: workdir {config.workdir}; Ray, DeepSpeed and library output go to {CONSOLE.log_dir}"
            + (" and, with --verbose, here too" if CONSOLE.echo else " (--verbose: here too)"))  # fmt: skip
        try:
            run_pipeline(config, stop_after=args.stop_after, budget_minutes=getattr(args, "budget_minutes", None))
        except (ValueError, OSError) as error:
            CONSOLE.error(error)
            return 2
        except Exception as error:  # noqa: BLE001 - a training failure: its message here, its traceback in the log
            CONSOLE.error(error)
            return 1
        finally:
            CONSOLE = Console()
            progress_bars.set_stream(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
