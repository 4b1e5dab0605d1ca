"""``dalle2 bench gpu``: bf16 training throughput, achieved TFLOP/s and MFU of each model on the
CUDA device present, the largest micro-batch of the paper-size prior and decoder that fits it,
bf16 sampling throughput of the cascade, and dalle2-pytorch's decoder Unet side by side.

Every training step is the job's own loss (the task's inputs from a synthetic batch, the forward
process, the network; dalle2.train.tasks) with float32 master weights under bf16 autocast,
SDPA attention and torch's fused AdamW (one GPU: ZeRO would partition nothing). FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward; MFU is achieved TFLOP/s
over the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`, or ``--peak-tflops``). The paper-size
prior and decoder run with activation checkpointing, and their micro-batch is searched by doubling
until the step runs out of memory. ``--device cpu`` runs the same code path on the tiny preset
(what CI tests); without CUDA and without it, the command says so and exits 0.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a
# substring of torch.cuda.get_device_name(); the first match wins, so longer names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0),
    ("L4", 121.0), ("RTX 4090", 165.0), ("V100", 0.0),  # V100: no bf16 tensor cores
)  # fmt: skip
TRAIN_KINDS = ("prior", "decoder", "upsampler_256", "upsampler_1024")
JOB_OF_KIND = {"prior": "prior", "decoder": "decoder", "upsampler_256": "upsampler", "upsampler_1024": "upsampler"}


@dataclass(frozen=True)
class GpuBenchSettings:
    device: str = "cuda"
    presets: tuple[str, ...] = ("small", "base")
    paper: bool = True  # the paper-size prior and decoder at their largest micro-batch
    batch: int = 32  # micro-batch of the small and base presets
    max_batch: int = 4096  # where the micro-batch search stops
    repeats: int = 5
    warmup: int = 2
    sample_steps: int = 25
    peak_tflops: float = 0.0  # 0 = from the device name
    compile: bool = False  # torch.compile the network (first steps are slow: warmup covers them)
    peers: bool = True


def peak_tflops(device_name: str, override: float = 0.0) -> Optional[float]:
    if override > 0:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value or None
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def training_step(kind: str, config, batch: int, device: torch.device, compile: bool = False) -> tuple[Callable[[], None], int]:
    """(one optimizer step of ``kind`` at micro-batch ``batch``, parameter count)."""
    from dalle2.train.activations import synthetic_batch
    from dalle2.train.tasks import make_task

    task = make_task(JOB_OF_KIND[kind], kind, config, device=device, precomputed=True)
    model = task.build_model().to(device).train()
    if kind == "prior":
        model.load_embedding_stats({"image_mean": torch.zeros(config.embed_dim), "image_std": torch.ones(config.embed_dim)})
    loss_module = task.loss_module(model)
    if compile:
        model_forward = model.net if kind == "prior" else model
        model_forward.forward = torch.compile(model_forward.forward)
    inputs = task.inputs(synthetic_batch(task, config, batch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = loss_module(**inputs)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one step's forward + backward (the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def bench_training(kind: str, config, batch: int, settings: GpuBenchSettings, device: torch.device, peak: Optional[float]) -> dict:
    step, parameters = training_step(kind, config, batch, device, settings.compile)
    flops = step_flops(step)
    seconds = median_seconds(step, device, settings.repeats, settings.warmup)
    tflops = flops / seconds / 1e12
    row = {
        "kind": kind, "parameters": parameters, "batch": batch, "step_s": seconds, "images_per_s": batch / seconds,
        "tflop_per_step": flops / 1e12, "tflops": tflops, "mfu": tflops / peak if peak else None,
    }  # fmt: skip
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def largest_batch(kind: str, config, settings: GpuBenchSettings, device: torch.device, start: int = 1) -> int:
    """The largest power-of-two micro-batch (from ``start``) whose training step runs; 0 if none."""
    best, batch = 0, start
    while batch <= settings.max_batch:
        try:
            step, _ = training_step(kind, config, batch, device)
            step()
            step()  # the second step holds the optimizer state too
            best = batch
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not _is_oom(error):
                raise
            break
        finally:
            step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch *= 2
    return best


def with_checkpointing(kind: str, config):
    if kind == "prior":
        return dataclasses.replace(config, activation_checkpointing=True)
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, activation_checkpointing=True))


@torch.no_grad()
def bench_cascade(preset: str, settings: GpuBenchSettings, device: torch.device, images: int = 4) -> dict:
    """Random-weight prior -> decoder -> upsamplers of ``preset`` sampled in bf16: images/s."""
    from dalle2.diffusion import ClassifierFreeGuidance, GaussianDiffusion
    from dalle2.factory import available_kinds, create_model, load_config

    kinds = [k for k in ("prior", "decoder", "upsampler_256", "upsampler_1024") if k in available_kinds(preset)]
    models = {k: create_model(k, load_config(k, preset)).to(device).eval() for k in kinds}
    prior, decoder = models["prior"], models["decoder"]
    generator = torch.Generator(device).manual_seed(0)
    text_embed = torch.randn(images, prior.config.embed_dim, device=device, generator=generator)

    def run() -> torch.Tensor:
        with _autocast(device):
            embed = prior.sample(text_embed, steps=settings.sample_steps, guidance_scale=2.0)
            config = decoder.config
            guided = ClassifierFreeGuidance(decoder, 3.0, type(decoder).drop_keys)
            process = GaussianDiffusion.from_config(config.diffusion).respace(settings.sample_steps)
            x = process.sample(guided, (images, 3, config.image_size, config.image_size), device=device, clip_x0=1.0, image_embed=embed)
            for kind in kinds[2:]:
                up = models[kind]
                process = GaussianDiffusion.from_config(up.config.diffusion).respace(min(settings.sample_steps, up.config.diffusion.sample_steps))
                size = up.config.image_size
                x = process.sample(up, (images, 3, size, size), device=device, clip_x0=1.0, low_res=x.float())
        return x

    seconds = median_seconds(run, device, max(1, settings.repeats // 2), 1)
    return {"preset": preset, "stages": kinds, "images": images, "steps": settings.sample_steps, "seconds": seconds, "images_per_s": images / seconds}


def bench_peer(config, ours: int, settings: GpuBenchSettings, device: torch.device, peak: Optional[float]) -> dict:
    """dalle2-pytorch's decoder Unet at our decoder's parameter count, same micro-batch, bf16 autocast."""
    from dalle2.bench.peers import lucidrains_decoder, require_peers

    require_peers()
    length = config.text.context_length
    peer, _ = lucidrains_decoder(config, config.text.width, length, "params", ours)
    peer = peer.to(device).train()
    batch = settings.batch
    x0 = torch.rand(batch, 3, config.image_size, config.image_size, device=device) * 2 - 1
    image_embed = torch.randn(batch, config.embed_dim, device=device)
    encodings = torch.randn(batch, length, config.text.width, device=device)
    optimizer = torch.optim.AdamW(peer.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = peer(x0, image_embed=image_embed, text_encodings=encodings)
        loss.backward()
        optimizer.step()

    flops = step_flops(step)
    seconds = median_seconds(step, device, settings.repeats, settings.warmup)
    tflops = flops / seconds / 1e12
    return {"kind": "dalle2-pytorch decoder", "parameters": sum(p.numel() for p in peer.parameters()), "batch": batch,
            "step_s": seconds, "images_per_s": batch / seconds, "tflop_per_step": flops / 1e12, "tflops": tflops,
            "mfu": tflops / peak if peak else None}  # fmt: skip


def run_gpu_bench(settings: GpuBenchSettings, log: Callable[[str], None] = lambda message: None) -> dict:
    from dalle2.factory import load_config

    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = device_name(device)
    peak = peak_tflops(name, settings.peak_tflops)
    result: dict = {"device": name, "peak_bf16_tflops": peak, "training": [], "paper": [], "sampling": [], "peers": []}
    for preset in settings.presets:
        for kind in TRAIN_KINDS:
            log(f"training step: {kind} ({preset}), micro-batch {settings.batch}")
            row = bench_training(kind, load_config(kind, preset), settings.batch, settings, device, peak)
            result["training"].append({"preset": preset, **row})
    if settings.paper:
        for kind in ("prior", "decoder"):
            config = with_checkpointing(kind, load_config(kind, "paper"))
            log(f"paper-size {kind}: searching the largest micro-batch")
            batch = largest_batch(kind, config, settings, device)
            if batch:
                result["paper"].append({"preset": "paper", "activation_checkpointing": True, **bench_training(kind, config, batch, settings, device, peak)})
            else:
                result["paper"].append({"preset": "paper", "kind": kind, "batch": 0, "note": "micro-batch 1 does not fit"})
    for preset in settings.presets:
        log(f"sampling the cascade ({preset}) in bf16")
        result["sampling"].append(bench_cascade(preset, settings, device))
    if settings.peers:
        preset = settings.presets[-1]
        config = load_config("decoder", preset)
        ours = next(r for r in result["training"] if r["kind"] == "decoder" and r["preset"] == preset)
        try:
            log(f"dalle2-pytorch decoder at {ours['parameters'] / 1e6:.0f}M parameters")
            result["peers"].append({"preset": preset, **bench_peer(config, ours["parameters"], settings, device, peak)})
        except Exception as error:  # the optional extra missing, or its API changed: say so, keep our figures
            result["peers"].append({"preset": preset, "error": f"{type(error).__name__}: {error}"})
    return result


def format_gpu_report(result: dict) -> str:
    def mfu(row: dict) -> str:
        return "-" if row.get("mfu") is None else f"{row['mfu']:.1%}"

    lines = [f"device: {result['device']}, bf16 peak {result['peak_bf16_tflops'] or 'unknown'} TFLOP/s",
             f"{'model':28s} {'params':>9s} {'batch':>6s} {'img/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s}"]  # fmt: skip
    for group in ("training", "paper", "peers"):
        for row in result[group]:
            label = f"{row.get('kind', '?')} ({row.get('preset', '')})"
            if "error" in row or "note" in row:
                lines.append(f"{label:28s} {row.get('error') or row.get('note')}")
                continue
            lines.append(f"{label:28s} {row['parameters'] / 1e6:8.0f}M {row['batch']:6d} {row['images_per_s']:9.1f} {row['tflops']:8.3f} {mfu(row):>6s}")
    for row in result["sampling"]:
        lines.append(f"cascade ({row['preset']}, {'->'.join(row['stages'])}, {row['steps']} steps): {row['images_per_s']:.2f} images/s")
    return "\n".join(lines)
