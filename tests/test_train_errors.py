"""Bad input to a training job is one clear error on the driver, before any worker starts."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import torch

from dalle2.bundle import save_bundle
from dalle2.data.schema import IMAGE_CAPTION_SCHEMA, DatasetError
from dalle2.factory import create_model
from dalle2.train.cli import main_for_job
from dalle2.train.config import ConfigError, ScalingSpec, load_job_config
from dalle2.train.launch import check_job, check_placement, run_job

NODE = {"Alive": True, "Resources": {"CPU": 2.0}}


def job(kind: str, data: str, tmp_path, **overrides):
    sections = {"data": {"path": data}, "run": {"storage": str(tmp_path / "runs"), "name": "bad"}}
    sections.update(overrides)
    return load_job_config(kind, overrides=sections)


@pytest.fixture(scope="module")
def prior_bundle(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return save_bundle(create_model("prior", "tiny"), "prior", str(tmp_path_factory.mktemp("bundles") / "prior"))


def test_a_dataset_without_rows(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(IMAGE_CAPTION_SCHEMA.empty_table(), empty / "part-00000.parquet")
    with pytest.raises(DatasetError, match="1 Parquet files but no rows"):
        check_job(job("upsampler", str(empty), tmp_path))
    (tmp_path / "no-parquet").mkdir()
    with pytest.raises(DatasetError, match="no .parquet files"):
        check_job(job("upsampler", str(tmp_path / "no-parquet"), tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_job(job("upsampler", str(tmp_path / "missing"), tmp_path))
    with pytest.raises(ConfigError, match="data.path is empty"):
        check_job(job("upsampler", "", tmp_path))


def test_the_frozen_clip_must_be_a_clip_bundle(train_shapes, tiny_clip_bundle, prior_bundle, tmp_path):
    with pytest.raises(ConfigError, match=f"clip: {prior_bundle} is a prior bundle, not a CLIP bundle"):
        check_job(job("decoder", train_shapes, tmp_path, clip=prior_bundle))
    with pytest.raises(ConfigError, match="the prior job learns from a frozen CLIP: give --clip"):
        check_job(job("prior", train_shapes, tmp_path))
    with pytest.raises(ValueError, match="missing"):
        check_job(job("prior", train_shapes, tmp_path, clip=str(tmp_path / "nothing-here")))
    with pytest.raises(ConfigError, match="the upsampler job does not use a frozen CLIP"):
        check_job(job("upsampler", train_shapes, tmp_path, clip=tiny_clip_bundle))
    checked = check_job(job("prior", train_shapes, tmp_path, clip=tiny_clip_bundle))
    assert (checked.image_size, checked.context_length) == (32, 32)  # the tiny CLIP's


def test_decoder_from_embeddings_without_images_fails_at_submission(tiny_clip_bundle, tmp_path, capsys):
    """`dalle2 data embed --no-images` rows hold what the prior needs, not the decoder's images."""
    import pyarrow as pa

    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    rows = {
        "key": ["a", "b"], "caption": ["a red circle", "a blue square"], "tokens": [[1, 2], [1, 3]],
        "text_embed": [[0.0] * 4] * 2, "text_hidden": [[[0.0] * 4] * 2] * 2, "image_embed": [[0.0] * 4] * 2,
    }  # fmt: skip
    pq.write_table(pa.table(rows), embeddings / "part-00000.parquet")
    sections = {"clip": tiny_clip_bundle, "data": {"path": str(embeddings), "format": "embeddings"}, "run": {"storage": str(tmp_path / "runs")}}
    decoder = load_job_config("decoder", overrides=sections)
    with pytest.raises(DatasetError, match=r"written without the images \(`dalle2 data embed --no-images`\)"):
        run_job(decoder)
    assert not os.path.exists(tmp_path / "runs")  # refused before Ray or any worker started
    assert check_job(load_job_config("prior", overrides=sections)).job.job == "prior"  # the same rows are enough for the prior

    config = tmp_path / "decoder.yaml"
    config.write_text("job: decoder\ndata: {format: embeddings}\n")
    code = main_for_job("decoder", ["--config", str(config), "--data", str(embeddings), "--clip", tiny_clip_bundle, "--storage", str(tmp_path / "runs")])
    assert code == 2 and "train decoder: error:" in capsys.readouterr().err


def test_placement_is_checked_against_the_nodes():
    check_placement(ScalingSpec(workers=3, cpus_per_worker=0.5), 0.25, [NODE])
    with pytest.raises(ConfigError, match=r"5 workers of 0.5 CPU cannot be placed: the cluster has 2 CPU on 1 node"):
        check_placement(ScalingSpec(workers=5, cpus_per_worker=0.5), 0.25, [NODE])
    with pytest.raises(ConfigError, match="leave no CPU for the data pipeline"):
        check_placement(ScalingSpec(workers=2, cpus_per_worker=1.0), 0.25, [NODE])
    with pytest.raises(ConfigError, match=r"2 workers of 1 CPU \+ 1 GPU cannot be placed"):
        check_placement(ScalingSpec(workers=2, cpus_per_worker=1.0, use_gpu=True), 0.25, [NODE, {**NODE, "Resources": {"CPU": 8.0, "GPU": 1.0}}])
    # two nodes of 1.5 CPU: each fits one whole-CPU worker, together not three
    halves = [{"Alive": True, "Resources": {"CPU": 1.5}}] * 2
    with pytest.raises(ConfigError, match="cannot be placed"):
        check_placement(ScalingSpec(workers=3, cpus_per_worker=1.0), 0.25, halves)


def test_more_workers_than_the_cluster_holds_fail_before_starting(ray_cluster, train_shapes, tmp_path):
    with pytest.raises(ConfigError, match="8 workers of 0.5 CPU cannot be placed"):
        run_job(job("upsampler", train_shapes, tmp_path, scaling={"workers": 8}))
    assert not os.path.exists(tmp_path / "runs")  # nothing started, nothing written


def test_the_command_line_reports_bad_input_as_an_error(train_shapes, tmp_path, capsys):
    code = main_for_job("clip", ["--data", train_shapes, "--zero", "5", "--storage", str(tmp_path)])
    assert code == 2
    assert "train clip: error: deepspeed: zero_stage must be 0, 1, 2 or 3, got 5" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("job: clip\noptim: {lr: fast}\n")
    assert main_for_job("clip", ["--config", str(config), "--data", train_shapes]) == 2
    assert "optim.lr: expected a number, got 'fast'" in capsys.readouterr().err


def test_placement_counts_what_the_autoscaler_can_add():
    from dalle2.train.capacity import NodeType, node_types_from_config

    head = [{"Alive": True, "Resources": {"CPU": 8.0}}]  # a `ray up` head: no GPU node alive yet
    gpu_job = ScalingSpec(workers=8, cpus_per_worker=4.0, use_gpu=True, backend="nccl")
    with pytest.raises(ConfigError, match=r"8 workers of 4 CPU \+ 1 GPU cannot be placed: the cluster has 8 CPU, 0 GPU on 1 node"):
        check_placement(gpu_job, 0.25, head)  # no autoscaler: refused, as before
    config = {
        "max_workers": 12, "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 8}, "max_workers": 0},
            "gpu-4": {"resources": {"CPU": 48, "GPU": 4}, "min_workers": 0, "max_workers": 4},
            "cpu": {"resources": {"CPU": 16}, "max_workers": 0},
        },
    }  # fmt: skip
    types = node_types_from_config(config)
    assert types == [NodeType("gpu-4", {"CPU": 48.0, "GPU": 4.0}, 4)]
    note = check_placement(gpu_job, 0.25, head, types)
    assert note == "scaling: 8 workers of 4 CPU + 1 GPU do not fit the 8 CPU, 0 GPU on 1 node(s) alive now; the autoscaler can add 2 x gpu-4"
    with pytest.raises(ConfigError, match=r"32 workers of 4 CPU \+ 1 GPU cannot be placed: .* its autoscaler can add at most \(gpu-4: .* x 4\)"):
        check_placement(ScalingSpec(workers=32, cpus_per_worker=4.0, use_gpu=True, backend="nccl"), 0.25, head, types)
    # resources detected at start (resources: {}) cannot be checked: trusted, and said so
    trusted = check_placement(gpu_job, 0.25, head, [NodeType("gpu-auto", {}, 4)])
    assert "trusting the autoscaler's node types gpu-auto" in trusted
