"""The paper-size path (dalle2.train.sharded): big ZeRO-3 models built partitioned inside
``deepspeed.zero.Init`` on a real 2-worker Ray Train job, and sample copies that never hold a
whole float32 model."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from ray import cloudpickle

from dalle2.factory import create_model, load_config
from dalle2.train.config import load_job_config
from dalle2.train.sharded import meta_parameter_count, sample_copy, uses_zero_init
from dalle2.train.tasks import make_task

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker function travels by value

FULL_FP32_BYTES = 4.5e9  # the paper prior (1.1B parameters) as one float32 copy


def test_zero_init_only_for_big_zero3_models():
    job = load_job_config("prior", overrides={"deepspeed": {"zero_stage": 3}})
    assert uses_zero_init(job, 200_000_000) and not uses_zero_init(job, 1_000_000)
    assert not uses_zero_init(load_job_config("prior", overrides={"deepspeed": {"zero_stage": 2}}), 10**9)
    assert not uses_zero_init(load_job_config("clip", overrides={"deepspeed": {"zero_stage": 3}}), 10**9)
    assert meta_parameter_count("prior", load_config("prior", "paper")) > 1.0e9


def test_sample_copy_holds_the_ema_in_the_asked_dtype():
    config = load_config("decoder", "tiny")
    task = make_task("decoder", "decoder", config, precomputed=True)
    model = create_model("decoder", config)
    ema = {name: torch.randn_like(p) * 0.05 for name, p in model.named_parameters()}
    copy32 = sample_copy(task, model, ema, torch.float32, "cpu")
    copy16 = sample_copy(task, model, {k: v.bfloat16() for k, v in ema.items()}, torch.bfloat16, "cpu")
    assert not copy16.training and all(p.dtype == torch.bfloat16 for p in copy16.parameters())
    for name, p in copy32.named_parameters():
        assert torch.equal(p, ema[name]), name
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    cond = {"image_embed": torch.randn(2, config.embed_dim, generator=generator), "text_tokens": torch.randint(1, 999, (2, 8), generator=generator)}
    t = torch.tensor([5, 500])
    with torch.no_grad():
        out32 = copy32(x, t, **cond)
        out16 = copy16(x.bfloat16(), t, **cond).float()
    assert out32.abs().mean() > 0.01
    assert (out16 - out32).abs().mean() < 0.05 * out32.abs().mean()


def prior_construction_worker(config: dict) -> None:
    """One Ray Train worker: build the paper prior the way train_worker does, report memory."""
    import resource

    import psutil
    import ray.train
    import torch.distributed as dist

    import deepspeed
    from dalle2.train.config import job_from_dict
    from dalle2.train.sharded import build_model

    job = job_from_dict(config["job"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    model_config = load_config("prior", "paper")
    task = make_task("prior", "prior", model_config, rank=rank, world_size=world_size, precomputed=True)
    deepspeed.init_distributed(dist_backend="gloo")
    rss_before = psutil.Process().memory_info().rss
    model = build_model(job, task, world_size)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    total = sum(p.ds_numel for p in model.parameters())
    with deepspeed.zero.GatheredParameters([model.net.query, model.net.blocks[3].mlp[0].weight]):
        checksum = [float(model.net.query.float().sum()), float(model.net.blocks[3].mlp[0].weight.float().norm())]
    checksums = [None] * world_size
    dist.all_gather_object(checksums, checksum)
    float64_schedule = model.diffusion.alphas_cumprod.dtype == torch.float64
    # Ray Train 2's Result.metrics holds only what came with a checkpoint: rank 0 writes its figures
    # to a file the test reads instead.
    if rank == 0:
        with open(config["metrics_path"], "w") as out:
            json.dump({
                "growth": max(peak_after - rss_before, 0), "local_bytes": local, "total": total,
                "checksums": checksums, "float64_schedule": float64_schedule,
                "stats_dtype": str(model.image_mean.dtype),
            }, out)  # fmt: skip


@pytest.mark.slow
def test_paper_prior_is_built_partitioned_on_two_zero3_workers(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dalle2.train.config import job_to_dict

    job = load_job_config("prior", overrides={"model": {"preset": "paper"}, "deepspeed": {"zero_stage": 3, "precision": "bf16"}})
    trainer = TorchTrainer(
        prior_construction_worker,
        train_loop_config={"job": job_to_dict(job), "metrics_path": str(tmp_path / "metrics.json")},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path), name="zero-init"),
    )
    trainer.fit()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    print(f"\npaper prior zero.Init on 2 workers (bf16): {metrics['total'] / 1e9:.3f}B parameters, rank 0 holds "
          f"{metrics['local_bytes'] / 1e9:.2f} GB of them, peak RSS growth {metrics['growth'] / 1e9:.2f} GB "
          f"(one float32 copy: {FULL_FP32_BYTES / 1e9:.1f} GB)")  # fmt: skip
    assert metrics["total"] > 1.0e9
    # Its half of the bf16 weights, not the model: 2 bytes x 1.1B / 2 ranks.
    assert metrics["local_bytes"] == pytest.approx(2 * metrics["total"] / 2, rel=0.01)
    assert metrics["growth"] < 0.4 * FULL_FP32_BYTES
    first, second = metrics["checksums"]
    assert first == second and first[1] > 0  # every rank built the same initial weights
    assert metrics["float64_schedule"] and metrics["stats_dtype"] == "torch.float32"
