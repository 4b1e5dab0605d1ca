"""The pieces of dalle2.train that need no cluster: config, DeepSpeed config, LR schedule, EMA,
checkpoint completeness, progress lines and the metrics CSV."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch
from torch import nn

from dalle2.train.checkpoint import CheckpointError, check_complete, latest_checkpoint, local_files, write_manifest
from dalle2.train.config import (
    JOB_KINDS,
    ConfigError,
    DeepSpeedOptions,
    ModelSpec,
    Offload,
    OptimConfig,
    OptimizerImpl,
    Precision,
    load_job_config,
    resolve_model_config,
)
from dalle2.train.deepspeed_config import build_deepspeed_config
from dalle2.train.ema import ShardedEMA, consolidate
from dalle2.train.export import _model_shapes
from dalle2.train.loop import promote_scalar_parameters, weight_decay_groups
from dalle2.train.progress import MetricsLog, progress_line, read_metrics
from dalle2.train.schedule import learning_rate

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs")


# ------------------------------------------------------------------------------- config


def test_every_shipped_config_loads_and_resolves_its_model():
    paths = sorted(p for job in JOB_KINDS for p in glob.glob(os.path.join(CONFIG_DIR, f"{job}-*.yaml")))
    assert {os.path.basename(p).split("-")[0] for p in paths} == {"clip", "prior", "decoder", "upsampler"}
    for path in paths:
        job = os.path.basename(path).split("-")[0]
        config = load_job_config(job, path)
        resolve_model_config(config.model)  # the preset and overrides make a valid model config
        gpu = "gpu" in os.path.basename(path)  # not the folder: a checkout may be named wt-gpu
        assert config.scaling.use_gpu == gpu and config.scaling.backend.value == ("nccl" if gpu else "gloo")
        assert config.deepspeed.precision is (Precision.BF16 if gpu else Precision.FP32)
        if not gpu:
            assert config.scaling.cpus_per_worker < 1 and config.data.cpus_per_task < 1  # fractional on small machines
    assert any(load_job_config(os.path.basename(p).split("-")[0], p).deepspeed.zero_stage == 3 for p in paths)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"loop: unknown keys \['max_stepz'\]"):
        load_job_config("clip", overrides={"loop": {"max_stepz": 3}})
    with pytest.raises(ConfigError, match=r"loop\.max_steps: expected an integer, got '10'"):
        load_job_config("clip", overrides={"loop": {"max_steps": "10"}})
    with pytest.raises(ConfigError, match=r"deepspeed\.precision: 'fp8' is not one of fp32, bf16, fp16"):
        load_job_config("clip", overrides={"deepspeed": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match="zero_stage must be 0, 1, 2 or 3, got 4"):
        load_job_config("clip", overrides={"deepspeed": {"zero_stage": 4}})
    with pytest.raises(ConfigError, match="autocast needs precision fp32"):
        load_job_config("decoder", overrides={"deepspeed": {"precision": "bf16", "autocast": "auto"}})
    with pytest.raises(ConfigError, match=r"deepspeed\.autocast: 'fp16' is not one of none, bf16, auto"):
        load_job_config("decoder", overrides={"deepspeed": {"autocast": "fp16"}})
    with pytest.raises(ConfigError, match="zero_stage must be 0, 1, 2 or 3, got -1"):
        load_job_config("clip", overrides={"deepspeed": {"zero_stage": -1}})
    with pytest.raises(ConfigError, match="model.kind 'decoder' cannot be trained by the upsampler job"):
        load_job_config("upsampler", overrides={"model": {"kind": "decoder"}})
    with pytest.raises(ConfigError, match="data.format embeddings is for the prior and the decoder; the upsampler job"):
        load_job_config("upsampler", overrides={"data": {"format": "embeddings"}})
    with pytest.raises(ConfigError, match="data.flip must be none with data.format embeddings"):
        load_job_config("decoder", overrides={"data": {"format": "embeddings", "flip": "horizontal"}})
    assert load_job_config("decoder", overrides={"data": {"format": "embeddings"}}).loads_clip is False
    assert load_job_config("decoder", overrides={"data": {"flip": "horizontal"}}).loads_clip  # CLIP sees the flipped image
    with pytest.raises(ConfigError, match=r"model\.overrides\.unet\.channels: expected an integer"):
        resolve_model_config(ModelSpec(kind="decoder", overrides={"unet": {"channels": "wide"}}))
    with pytest.raises(ConfigError, match=r"model\.overrides\.unet: unknown keys \['chanels'\]"):
        resolve_model_config(ModelSpec(kind="decoder", overrides={"unet": {"chanels": 8}}))


def test_yaml_file_errors(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("job: prior\nloop: {max_steps: 5}\n")
    with pytest.raises(ConfigError, match="a config for the 'prior' job, not 'clip'"):
        load_job_config("clip", str(path))
    path.write_text("job: clip\nscaling: {workers: 2, cpus_per_worker: true}\n")
    with pytest.raises(ConfigError, match=r"scaling\.cpus_per_worker: expected a number, got True"):
        load_job_config("clip", str(path))
    path.write_text("job: clip\nloop: {max_steps: 5\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_config("clip", str(path))


def test_flags_override_the_file_and_a_name_is_made_when_missing(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("job: upsampler\nmodel: {kind: upsampler_1024}\nloop: {max_steps: 5, batch_size: 4}\n")
    config = load_job_config("upsampler", str(path), {"loop": {"max_steps": 9}, "data": {"path": "x"}})
    assert (config.loop.max_steps, config.loop.batch_size, config.data.path) == (9, 4, "x")
    assert config.model.kind == "upsampler_1024" and config.run.name.startswith("upsampler-")
    assert load_job_config("prior").model.kind == "prior"


def test_model_config_takes_clip_sizes_from_the_frozen_clip():
    from dalle2.factory import load_config

    clip = load_config("clip", "small")  # not the preset's own (tiny) CLIP
    prior = resolve_model_config(ModelSpec(kind="prior", preset="tiny", overrides={"layers": 1}), clip)
    assert (prior.embed_dim, prior.text_width, prior.context_length) == (clip.embed_dim, clip.text_width, clip.context_length)
    assert prior.layers == 1
    decoder = resolve_model_config(ModelSpec(kind="decoder", preset="tiny", overrides={"diffusion": {"sample_steps": 3}}), clip)
    assert decoder.embed_dim == clip.embed_dim and decoder.diffusion.sample_steps == 3
    assert decoder.diffusion.schedule.value == "cosine"  # the rest of the section is kept


# ------------------------------------------------------------------------------- DeepSpeed config


def test_deepspeed_config_builder():
    optim = OptimConfig(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1)
    plain = build_deepspeed_config(DeepSpeedOptions(zero_stage=0), optim, micro_batch=8, workers=2, parameters=3 * 10**7)
    assert plain["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 3 * 10**6, "allgather_bucket_size": 3 * 10**6}
    assert plain["train_batch_size"] == 16 and plain["train_micro_batch_size_per_gpu"] == 8
    assert plain["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True},
    }
    assert plain["gradient_clipping"] == 1.0 and not plain["bf16"]["enabled"] and not plain["fp16"]["enabled"]

    options = DeepSpeedOptions(
        zero_stage=3, precision=Precision.BF16, offload_optimizer=Offload.CPU, gradient_accumulation_steps=4, gradient_clipping=0.0
    )
    sharded = build_deepspeed_config(options, optim, micro_batch=8, workers=2, parameters=1000)
    assert sharded["zero_optimization"]["stage"] == 3
    assert sharded["zero_optimization"]["stage3_prefetch_bucket_size"] == 10**6  # buckets are at least 1e6 elements
    huge = build_deepspeed_config(DeepSpeedOptions(zero_stage=3), optim, 8, 2, parameters=10**11)
    assert huge["zero_optimization"]["reduce_bucket_size"] == 5 * 10**8  # and at most DeepSpeed's default
    fixed = build_deepspeed_config(DeepSpeedOptions(zero_stage=3, bucket_size=12345), optim, 8, 2, parameters=10**11)
    assert fixed["zero_optimization"]["reduce_bucket_size"] == 12345
    assert sharded["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert sharded["train_batch_size"] == 8 * 2 * 4 and sharded["gradient_accumulation_steps"] == 4
    assert sharded["bf16"]["enabled"] and "gradient_clipping" not in sharded
    assert sharded["zero_force_ds_cpu_optimizer"] is False  # torch's AdamW on the CPU is intended

    compiled = build_deepspeed_config(
        DeepSpeedOptions(zero_stage=2, offload_optimizer=Offload.CPU, optimizer=OptimizerImpl.DEEPSPEED), optim, 4, 1
    )
    assert compiled["optimizer"]["params"]["torch_adam"] is False and "zero_force_ds_cpu_optimizer" not in compiled
    with pytest.raises(ConfigError, match="offload_optimizer needs zero_stage >= 1"):
        DeepSpeedOptions(zero_stage=0, offload_optimizer=Offload.CPU)


def test_weight_decay_groups_spare_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    decay, plain = weight_decay_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])] and decay["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0


def test_scalar_parameters_become_vectors_and_export_reshapes_them_back():
    model = nn.Module()
    model.inner = nn.Module()
    model.inner.scale = nn.Parameter(torch.tensor(2.5))
    model.weight = nn.Parameter(torch.ones(3))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    assert promote_scalar_parameters(model) == ["inner.scale"]
    assert model.inner.scale.shape == (1,) and model.inner.scale.item() == 2.5
    restored = _model_shapes(model.state_dict(), expected)
    assert restored["inner.scale"].shape == () and restored["weight"].shape == (3,)


# ------------------------------------------------------------------------------- LR schedule


def test_learning_rate_warmup_then_cosine():
    optim = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, optim, 110) == pytest.approx(1e-4)  # never 0
    assert learning_rate(9, optim, 110) == pytest.approx(1e-3)  # warmup ends at the peak
    assert learning_rate(10, optim, 110) == pytest.approx(1e-3)
    assert learning_rate(60, optim, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down the cosine
    assert learning_rate(110, optim, 110) == pytest.approx(1e-4)
    assert learning_rate(500, optim, 110) == pytest.approx(1e-4)  # stays at the floor
    rates = [learning_rate(s, optim, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert learning_rate(0, OptimConfig(lr=1e-3, warmup_steps=0), 10) == pytest.approx(1e-3)


# ------------------------------------------------------------------------------- EMA


def _toy_params() -> list[tuple[str, nn.Parameter]]:
    torch.manual_seed(0)
    return [("a", nn.Parameter(torch.randn(7, 3))), ("b", nn.Parameter(torch.randn(5))), ("c", nn.Parameter(torch.randn(1)))]


def test_ema_matches_the_formula():
    params = _toy_params()
    ema = ShardedEMA(params, decay=0.9)
    initial = {name: p.detach().clone() for name, p in params}
    with torch.no_grad():
        for _name, p in params:
            p.add_(1.0)
    ema.update(step=100)  # decay_at(100) = min(0.9, 101/110) = 0.9
    full = ema.gather()
    for name, p in params:
        torch.testing.assert_close(full[name], 0.9 * initial[name] + 0.1 * p.detach())
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.9


def test_ema_slices_of_every_rank_consolidate_to_the_whole_average():
    params = _toy_params()
    world = 3
    whole = ShardedEMA(params, decay=0.99)
    ranks = [ShardedEMA(params, decay=0.99, rank=r, world_size=world) for r in range(world)]
    for step in range(1, 4):
        with torch.no_grad():
            for _name, p in params:
                p.mul_(0.5).add_(step)
        whole.update(step)
        for ema in ranks:
            ema.update(step)
    assert ranks[0].shards["b"].numel() == math.ceil(5 / world)  # 1/W of each parameter per rank
    merged = consolidate([ema.state_dict() for ema in ranks], ranks[0].layout())
    for name, value in whole.gather().items():
        torch.testing.assert_close(merged[name], value)

    restored = ShardedEMA(params, decay=0.99, rank=1, world_size=world)
    restored.load_state_dict(ranks[1].state_dict())
    torch.testing.assert_close(restored.state_dict()["a"], ranks[1].state_dict()["a"])
    with pytest.raises(ValueError, match="another world size"):
        ShardedEMA(params, decay=0.99, rank=0, world_size=2).load_state_dict(ranks[0].state_dict())


# ------------------------------------------------------------------------------- checkpoints


def _fake_checkpoint(folder) -> None:
    os.makedirs(folder / "deepspeed", exist_ok=True)
    (folder / "deepspeed" / "rank0.pt").write_bytes(b"0" * 10)
    (folder / "deepspeed" / "rank1.pt").write_bytes(b"1" * 20)
    files = local_files(str(folder))
    write_manifest(str(folder), [{k: v for k, v in files.items() if "rank0" in k}, {k: v for k, v in files.items() if "rank1" in k}], 3)


def test_only_complete_checkpoints_are_used(tmp_path):
    run = tmp_path / "run"
    for step in (4, 8):
        _fake_checkpoint(run / f"checkpoint-{step:08d}")
    assert check_complete(str(run / "checkpoint-00000008"))["files"] == {"deepspeed/rank0.pt": 10, "deepspeed/rank1.pt": 20}
    assert latest_checkpoint(str(run)).endswith("checkpoint-00000008")

    (run / "checkpoint-00000008" / "deepspeed" / "rank1.pt").write_bytes(b"1" * 5)  # a rank's upload cut short
    with pytest.raises(CheckpointError, match="incomplete checkpoint, 1 files missing or truncated"):
        check_complete(str(run / "checkpoint-00000008"))
    assert latest_checkpoint(str(run)).endswith("checkpoint-00000004")

    os.makedirs(run / "checkpoint-00000012")  # saving began, no manifest yet
    assert latest_checkpoint(str(run)).endswith("checkpoint-00000004")
    os.remove(run / "checkpoint-00000004" / "manifest.json")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        latest_checkpoint(str(run))


# ------------------------------------------------------------------------------- progress


def test_progress_line_and_metrics_csv(tmp_path):
    metrics = {
        "step": 40, "max_steps": 200, "loss": 0.12345, "val_loss": 0.11, "steps_per_s": 3.2,
        "samples_per_s": 51.2, "lr": 3e-4, "eta_s": 50.0, "epoch": 1, "samples": 640,
    }  # fmt: skip
    line = progress_line("decoder", metrics)
    assert line == "decoder step 40/200 (20%) | loss 0.1235 | val 0.1100 | 3.20 steps/s | 51.2 samples/s | lr 3.0e-04 | eta 0:00:50"
    log = MetricsLog(str(tmp_path / "run" / "metrics.csv"))
    log.append(metrics)
    log.append({**metrics, "step": 41, "val_loss": None, "unknown": 1})
    rows = read_metrics(str(tmp_path / "run" / "metrics.csv"))
    assert [r["step"] for r in rows] == ["40", "41"] and rows[0]["val_loss"] == "0.11" and rows[1]["val_loss"] == ""
    assert json.loads(json.dumps(rows))  # plain strings


@pytest.mark.parametrize("where", ["local", "s3"])
def test_replayed_steps_replace_their_rows(where, tmp_path, request):
    """A restart from the step-4 checkpoint reports 6 again: each step stays in the CSV once, the
    replay's values win; a new log (a resume by name) reads what the file holds."""
    uri = str(tmp_path / "metrics.csv") if where == "local" else request.getfixturevalue("s3_server").uri("metrics") + "/metrics.csv"
    row = {"loss": 1.0, "lr": 1e-3, "steps_per_s": 1.0, "samples_per_s": 8.0, "eta_s": 1.0}
    log = MetricsLog(uri)
    for step in (2, 4, 6):
        log.append({**row, "step": step}, flush=False)
    log.append({**row, "step": 6, "loss": 0.5})  # the restarted attempt
    log.append({**row, "step": 8, "loss": 0.4})
    assert [(r["step"], r["loss"]) for r in read_metrics(uri)] == [("2", "1.0"), ("4", "1.0"), ("6", "0.5"), ("8", "0.4")]
    resumed = MetricsLog(uri)
    resumed.append({**row, "step": 6, "loss": 0.3})
    assert [r["step"] for r in read_metrics(uri)] == ["2", "4", "6"] and read_metrics(uri)[-1]["loss"] == "0.3"
