"""A training job's config: one YAML file, read into frozen dataclasses with strict types.

    job: decoder                      # clip | prior | decoder | upsampler
    model: {kind: decoder, preset: tiny, overrides: {diffusion: {sample_steps: 8}}}
    clip: runs/clip-bundle            # the frozen CLIP bundle (prior and decoder)
    data: {path: s3://bucket/shapes, cpus_per_task: 0.25}
    optim: {lr: 3.0e-4, warmup_steps: 100}
    deepspeed: {zero_stage: 2, precision: bf16}
    loop: {max_steps: 10000, batch_size: 32, checkpoint_every: 500}
    scaling: {workers: 8, use_gpu: true, backend: nccl}
    run: {storage: s3://bucket/runs, name: decoder-64, max_failures: 3}

Every mistake is a :class:`ConfigError` that names the key (``deepspeed.zero_stage``), raised
on the driver before any worker starts: unknown keys, wrong types, values out of range.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from dalle2.config import CONFIG_CLASSES, ClipConfig, to_dict
from dalle2.data.epochs import ShuffleConfig
from dalle2.data.preprocess import Flip

JobKind = Literal["clip", "prior", "decoder", "upsampler"]
JOB_KINDS: tuple[str, ...] = typing.get_args(JobKind)
# Which model kinds each job trains (the upsampler job trains either stage).
JOB_MODEL_KINDS: dict[str, tuple[str, ...]] = {
    "clip": ("clip",),
    "prior": ("prior",),
    "decoder": ("decoder",),
    "upsampler": ("upsampler_256", "upsampler_1024"),
}


class ConfigError(ValueError):
    """A config that cannot run: the message names the key and what is wrong with it."""


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"  # GPUs from Ampere on; no loss scaling needed
    FP16 = "fp16"  # dynamic loss scaling (DeepSpeed)


class Autocast(str, enum.Enum):
    """The forward pass's convolutions and matmuls in bf16 over float32 weights (torch.autocast,
    with ``precision: fp32``); auto = where the device has bf16 arithmetic (dalle2.precision)."""

    NONE = "none"
    BF16 = "bf16"
    AUTO = "auto"


class Offload(str, enum.Enum):
    """Where ZeRO keeps the optimizer state (ZeRO-Offload, Ren et al. 2021)."""

    NONE = "none"
    CPU = "cpu"


class OptimizerImpl(str, enum.Enum):
    """AdamW from torch (no compiled op; works everywhere) or DeepSpeed's compiled
    FusedAdam / CPUAdam (faster, JIT-built on first use)."""

    TORCH = "torch"
    DEEPSPEED = "deepspeed"


class DataFormat(str, enum.Enum):
    IMAGES = "images"  # image-caption Parquet (dalle2.data.schema), decoded by the pipeline
    EMBEDDINGS = "embeddings"  # rows of `dalle2 data embed`: the prior; the decoder when they kept the images
    WEBDATASET = "webdataset"  # tar shards (img2dataset's output) read directly: data.path a folder or brace list


class Backend(str, enum.Enum):
    GLOO = "gloo"  # CPU
    NCCL = "nccl"  # NVIDIA GPUs


class Placement(str, enum.Enum):
    """How Ray places the workers' bundles (Ray Train's ``placement_strategy``)."""

    PACK = "pack"  # as few nodes as possible (fast collectives within a node)
    SPREAD = "spread"  # across nodes where it can: a lost node takes fewer workers with it
    STRICT_SPREAD = "strict_spread"  # one worker per node, else the job waits for nodes


@dataclass(frozen=True)
class ModelSpec:
    kind: str = ""  # clip | prior | decoder | upsampler_256 | upsampler_1024 ("" = the job's own kind)
    preset: str = "tiny"
    # Deep-merged into the preset's config, e.g. {"unet": {"channels": 64}}; checked like the rest.
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataSpec:
    """The data section; the image size and context length come from the model."""

    path: str = ""
    format: DataFormat = DataFormat.IMAGES
    validation_fraction: float = 0.05
    flip: Flip = Flip.NONE
    cpus_per_task: float = 0.25  # fractional: see dalle2.data.ray_reader (a 2-core machine hangs at 1)
    preprocess_batch_size: int = 128
    # Training rows: pieces in a new order every epoch, rows mixed in windows, from (seed, epoch);
    # {mode: none} reads in file order. Validation is never shuffled. See dalle2.data.epochs.
    shuffle: ShuffleConfig = field(default_factory=ShuffleConfig)

    def __post_init__(self) -> None:
        _check(0 <= self.validation_fraction < 1, "validation_fraction must be in [0, 1)")
        _check(self.cpus_per_task > 0, "cpus_per_task must be > 0")
        _check(self.preprocess_batch_size >= 1, "preprocess_batch_size must be >= 1")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019); LR warmed up linearly, then cosine-decayed."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # on weight matrices only (not biases, norms, embeddings of size 1-D)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr must be > 0")
        _check(all(0 <= b < 1 for b in self.betas), "betas must be in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")


@dataclass(frozen=True)
class DeepSpeedOptions:
    zero_stage: int = 2  # 0 = plain data parallel; 1 optimizer state, 2 + gradients, 3 + parameters sharded
    precision: Precision = Precision.FP32
    autocast: Autocast = Autocast.NONE
    offload_optimizer: Offload = Offload.NONE
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0  # max global grad norm; 0 = off
    optimizer: OptimizerImpl = OptimizerImpl.TORCH
    # Elements per gradient-reduction bucket (and ZeRO-3 prefetch bucket). 0 = auto, a tenth of
    # the model within [1e6, 5e8]: DeepSpeed's fixed default of 5e8 is a 2 GB fp32 buffer that
    # ZeRO-3 allocates up front, more than a small model's whole state.
    bucket_size: int = 0
    # ZeRO-3 only: models of at least this many parameters are built inside deepspeed.zero.Init,
    # partitioned as they are constructed, instead of whole on every rank (dalle2.train.sharded).
    zero_init_threshold: int = 100_000_000

    def __post_init__(self) -> None:
        _check(self.bucket_size >= 0, "bucket_size must be >= 0 (0 = auto)")
        _check(self.zero_init_threshold >= 0, "zero_init_threshold must be >= 0 (0 = every ZeRO-3 model)")
        _check(self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
        _check(self.gradient_clipping >= 0, "gradient_clipping must be >= 0")
        _check(
            self.autocast is Autocast.NONE or self.precision is Precision.FP32,
            "autocast needs precision fp32 (with bf16 or fp16 the weights themselves are half precision)",
        )
        _check(
            self.offload_optimizer is Offload.NONE or self.zero_stage >= 1,
            "offload_optimizer needs zero_stage >= 1 (ZeRO-Offload moves the sharded optimizer state)",
        )


@dataclass(frozen=True)
class LoopConfig:
    max_steps: int = 1000  # optimizer steps in total (a resumed run continues towards it)
    batch_size: int = 16  # per worker and micro-step; global batch = this x workers x accumulation
    log_every: int = 10  # report metrics (driver progress line + CSV row) every N steps
    val_every: int = 100  # validation loss (+ sample grid) every N steps and at the end; 0 = end only
    val_batches: int = 4  # per worker; 0 = no validation
    checkpoint_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 2
    ema_decay: float = 0.9999  # diffusion models; 0 = no EMA
    sample_count: int = 8  # images in the validation grid (0 = none)
    sample_steps: int = 0  # sampling steps for the grid; 0 = the model's diffusion.sample_steps
    guidance_scale: float = 3.0  # classifier-free guidance in the grid (Ho & Salimans 2022)
    prior_stats_batches: int = 8  # batches per worker that estimate the prior's embedding statistics
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "log_every", "keep_checkpoints", "prior_stats_batches"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1")
        for name in ("val_every", "val_batches", "checkpoint_every", "sample_count", "sample_steps"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0")
        _check(0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)")
        _check(self.guidance_scale >= 0, "guidance_scale must be >= 0")


@dataclass(frozen=True)
class ScalingSpec:
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional on small machines: Ray Data needs CPU beside the workers
    gpus_per_worker: float = 1.0  # only with use_gpu
    backend: Backend = Backend.GLOO
    placement: Placement = Placement.PACK
    gpus_per_node: int = 8  # how the workers are spread over machines (ZeRO partitions, `dalle2 plan`)
    gpu_memory_gib: float = 0.0  # memory of one GPU, for `dalle2 plan` (0 = not declared)

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "workers must be >= 1")
        _check(self.gpus_per_node >= 1, "gpus_per_node must be >= 1")
        _check(self.gpu_memory_gib >= 0, "gpu_memory_gib must be >= 0 (0 = not declared)")
        _check(
            self.workers <= self.gpus_per_node or self.workers % self.gpus_per_node == 0,
            "workers must fill whole nodes: a multiple of gpus_per_node",
        )
        _check(self.cpus_per_worker > 0, "cpus_per_worker must be > 0")
        _check(self.gpus_per_worker > 0, "gpus_per_worker must be > 0")
        _check(self.use_gpu or self.backend is Backend.GLOO, "backend nccl needs use_gpu: true")


@dataclass(frozen=True)
class RunSpec:
    storage: str = "runs"  # local folder, file:// or s3://bucket/prefix; the run is <storage>/<name>
    name: str = ""  # the same name resumes from the run's latest checkpoint ("" = a new timestamped name)
    max_failures: int = 0  # worker-group restarts from the last checkpoint (Ray Train FailureConfig)

    def __post_init__(self) -> None:
        _check(self.max_failures >= -1, "max_failures must be >= 0 (or -1 = unlimited)")
        _check("/" not in self.name, "name must not contain '/'")


@dataclass(frozen=True)
class JobConfig:
    job: JobKind
    model: ModelSpec = field(default_factory=ModelSpec)
    clip: Optional[str] = None  # bundle URI of the frozen CLIP (prior and decoder)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    loop: LoopConfig = field(default_factory=LoopConfig)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    run: RunSpec = field(default_factory=RunSpec)

    def __post_init__(self) -> None:
        allowed = JOB_MODEL_KINDS[self.job]
        if not self.model.kind:
            object.__setattr__(self, "model", dataclasses.replace(self.model, kind=allowed[0]))
        _check(self.model.kind in allowed, f"model.kind {self.model.kind!r} cannot be trained by the {self.job} job (choose {', '.join(allowed)})")
        _check(
            self.data.format is not DataFormat.EMBEDDINGS or self.job in ("prior", "decoder"),
            f"data.format embeddings is for the prior and the decoder; the {self.job} job learns from images alone",
        )
        # DALL-E 2 conditions the decoder on the CLIP embedding of the very image it learns to draw
        # (section 2.1). A precomputed embedding belongs to the unflipped image: a flipped target
        # would be paired with its mirror's embedding, so the flip is refused rather than ignored.
        _check(
            self.data.format is not DataFormat.EMBEDDINGS or self.data.flip is Flip.NONE,
            "data.flip must be none with data.format embeddings: the precomputed CLIP image embeddings "
            "are of the unflipped images (train from data.format images to flip)",
        )

    @property
    def model_kind(self) -> str:
        return self.model.kind

    @property
    def needs_clip(self) -> bool:
        """The prior and the decoder learn from embeddings of a frozen CLIP (its bundle also gives
        them their sizes, also when the embeddings are precomputed)."""
        return self.job in ("prior", "decoder")

    @property
    def loads_clip(self) -> bool:
        """Whether workers run the frozen CLIP (not when its embeddings were computed beforehand)."""
        return self.needs_clip and self.data.format is not DataFormat.EMBEDDINGS

    @property
    def uses_ema(self) -> bool:
        return self.job != "clip" and self.loop.ema_decay > 0


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ------------------------------------------------------------------------------- strict parsing


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` as type ``tp``, or a ConfigError naming ``where``. YAML gives ints for floats
    (``lr: 1``); nothing else is coerced (a quoted ``"2"`` is not an integer)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return parse_config(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in tp)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}") from None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def parse_config(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys, types and ranges; errors say where."""
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{label}: unknown keys {unknown} (known: {', '.join(names)})")
    values = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{label}: {error}") from None
    except (TypeError, ValueError) as error:  # a missing required key, or a model config's own check
        raise ConfigError(f"{label}: {error}") from None


def deep_merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` merged in, nested mappings merged key by key (inputs untouched)."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: str) -> dict:
    from dalle2.data.storage import read_bytes

    try:
        data = yaml.safe_load(read_bytes(path)) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_job_config(job: str, path: Optional[str] = None, overrides: Optional[dict] = None) -> JobConfig:
    """The config of ``job`` from a YAML file (or the defaults), with ``overrides`` (the command
    line's --data, --workers...) deep-merged on top before the types are checked."""
    if job not in JOB_KINDS:
        raise ConfigError(f"unknown job {job!r}; choose one of {', '.join(JOB_KINDS)}")
    raw = read_yaml(path) if path else {}
    if raw.setdefault("job", job) != job:
        raise ConfigError(f"{path}: a config for the {raw['job']!r} job, not {job!r}")
    config = parse_config(JobConfig, deep_merge(raw, overrides or {}))
    if not config.run.name:
        name = f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, name=name))
    return config


def job_to_dict(config: JobConfig) -> dict:
    return to_dict(config)


def job_from_dict(data: dict) -> JobConfig:
    return parse_config(JobConfig, data)


# ------------------------------------------------------------------------------- model config

CLIP_DIMENSIONS = ("embed_dim", "text_width", "context_length")


def resolve_model_config(spec: ModelSpec, clip_config: Optional[ClipConfig] = None) -> Any:
    """The model config a job trains: the preset, with the sizes it inherits from CLIP taken from
    the frozen CLIP it will learn from (not from the preset's CLIP), then ``spec.overrides``."""
    from dalle2.factory import load_config

    try:
        base = load_config(spec.kind, spec.preset)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None
    raw = to_dict(base)
    if clip_config is not None:
        for name in CLIP_DIMENSIONS:
            if name in raw:
                raw[name] = getattr(clip_config, name)
    config = parse_config(CONFIG_CLASSES[spec.kind], deep_merge(raw, spec.overrides), "model.overrides")
    if spec.kind == "clip" and spec.overrides:
        from dalle2.clip import complete_config

        try:
            config = complete_config(config)
        except ValueError as error:
            raise ConfigError(f"model.overrides: {error}") from None
    return config
