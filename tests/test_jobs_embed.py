"""``python -m jobs.embed``: the Ray Job entry point of ``dalle2 data embed``, same arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import ray.data

from dalle2.bundle import save_bundle
from dalle2.data import storage
from dalle2.data.embed import MANIFEST, is_complete
from dalle2.data.schema import read_dataset
from dalle2.data.shapes import write_shapes_dataset
from dalle2.factory import create_model
from jobs.embed import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_the_dalle2_data_embed_arguments():
    result = subprocess.run(
        [sys.executable, "-m", "jobs.embed", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m jobs.embed")
    for flag in ("--clip", "--actors", "--batch-size", "--accelerator", "--no-images"):
        assert flag in result.stdout


def test_missing_bundle_is_one_clear_error(tmp_path, capsys):
    code = main([str(tmp_path / "data"), str(tmp_path / "out"), "--clip", str(tmp_path / "no-bundle")])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("embed: error:") and "no-bundle" in error


def test_embeds_every_row_of_a_local_dataset(ray_cluster, tmp_path, capsys):
    clip = create_model("clip", "tiny").eval()
    bundle = save_bundle(clip, "clip", str(tmp_path / "clip"))
    data, out = str(tmp_path / "data"), str(tmp_path / "embeddings")
    write_shapes_dataset(data, count=6, image_size=32, seed=4, rows_per_file=3)

    assert main([data, out, "--clip", bundle, "--batch-size", "4", "--accelerator", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 6 and report["dropped"] == {} and report["out"] == out

    filesystem, path = storage.resolve(out)
    rows = ray.data.read_parquet(path, filesystem=filesystem).take_all()  # 6 rows: fine on the driver
    assert sorted(row["key"] for row in rows) == [f"shapes/{i:06d}" for i in range(6)]
    source = {r["key"]: r for r in read_dataset(data, columns=["key", "caption", "image"]).to_pylist()}
    config = clip.config
    for row in rows:
        assert row["image_embed"].shape == (config.embed_dim,) and np.isfinite(row["image_embed"]).all()
        assert row["text_embed"].shape == (config.embed_dim,)
        assert row["text_hidden"].shape == (config.context_length, config.text_width)
        # The decoder trains from these rows: each keeps its image, the original PNG bytes.
        assert row["image"] == source[row["key"]]["image"] and row["caption"] == source[row["key"]]["caption"]

    assert is_complete(out)  # the manifest, written last
    manifest = json.loads(storage.read_bytes(storage.join(out, MANIFEST)))
    assert manifest == {"data": data, "clip": bundle, "rows": 6, "files": report["files"], "dropped": {}, "images": True}


def test_the_decoder_live_path_embeds_the_images_as_dalle2_data_embed_does(ray_cluster, tmp_path, capsys):
    """A decoder smaller than its CLIP (base/paper: 64 px against 224) gets its training images
    at CLIP's size on the live path: CLIP embeds them exactly as `dalle2 data embed` (and so the
    prior and `variations`) does, and x0 is a downsampled copy at the decoder's size."""
    import torch

    from dalle2.data.preprocess import preprocess_batch
    from dalle2.train.config import ModelSpec, resolve_model_config
    from dalle2.train.tasks import make_task

    torch.manual_seed(0)
    clip = create_model("clip", "tiny").eval()  # 32 px
    bundle = save_bundle(clip, "clip", str(tmp_path / "clip"))
    data, out = str(tmp_path / "data"), str(tmp_path / "embeddings")
    write_shapes_dataset(data, count=6, image_size=64, seed=5, rows_per_file=6)
    assert main([data, out, "--clip", bundle, "--batch-size", "6", "--accelerator", "cpu", "--no-images"]) == 0
    capsys.readouterr()
    filesystem, path = storage.resolve(out)
    stored = {row["key"]: row["image_embed"] for row in ray.data.read_parquet(path, filesystem=filesystem).take_all()}

    config = resolve_model_config(ModelSpec(kind="decoder", preset="tiny", overrides={"image_size": 16}), clip.config)
    task = make_task("decoder", "decoder", config, clip=clip)
    assert task.image_size == 32  # CLIP's, not the decoder's 16
    rows = read_dataset(data, columns=["key", "caption", "image"]).to_pylist()
    columns = {name: np.array([row[name] for row in rows], dtype=object) for name in ("key", "caption", "image")}
    batch, _ = preprocess_batch(columns, image_size=task.image_size, context_length=task.context_length)
    inputs = task.inputs(batch)
    assert inputs["x0"].shape == (6, 3, 16, 16)
    expected = torch.from_numpy(np.stack([stored[key] for key in batch["key"]]))
    torch.testing.assert_close(inputs["image_embed"], expected, rtol=1e-4, atol=1e-5)


def test_auto_counts_the_gpus_an_autoscaler_can_add():
    import yaml

    from dalle2.data.embed import pick_accelerator
    from dalle2.train.capacity import NodeType, node_types_from_config

    with open(os.path.join(REPO, "cluster", "ray-cluster.yaml")) as file:
        ray_up = node_types_from_config(yaml.safe_load(file))  # GPU types with min_workers: 0
    use_gpu, line = pick_accelerator("auto", 0, ray_up)
    assert use_gpu and line.startswith("embed: on GPU (auto): no GPU alive now, the autoscaler can add gpu_a10g (4 GPU, up to 4)")
    assert pick_accelerator("auto", 2, None) == (True, "embed: on GPU (auto): the cluster has 2 GPU(s) alive")
    assert pick_accelerator("auto", 0, None) == (False, "embed: on CPU (auto): no GPU on the cluster")
    cpu_only = [NodeType("cpu", {"CPU": 16.0}, 4)]
    assert pick_accelerator("auto", 0, cpu_only) == (False, "embed: on CPU (auto): no GPU on the cluster nor among its autoscaler's node types")
    use_gpu, line = pick_accelerator("auto", 0, [NodeType("gpu-auto", {}, 4)])  # resources left for Ray to detect
    assert not use_gpu and "gpu-auto do not declare their resources" in line and "--accelerator gpu" in line
    assert pick_accelerator("cpu", 8, ray_up) == (False, "embed: on CPU (--accelerator cpu)")


def test_auto_reads_the_clusters_autoscaling_config(ray_cluster, tmp_path, monkeypatch, capsys):
    from dalle2.data.embed import _use_gpu

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/ray_bootstrap_config.yaml of a real `ray up` head
    monkeypatch.delenv("DALLE2_AUTOSCALING_CONFIG", raising=False)
    assert not _use_gpu("auto")  # the session's cluster: 2 CPUs, no GPU, no autoscaler
    assert capsys.readouterr().err == "embed: on CPU (auto): no GPU on the cluster\n"
    config = tmp_path / "autoscaling.yaml"
    config.write_text(
        "max_workers: 2\nhead_node_type: head\navailable_node_types:\n"
        "  head: {resources: {CPU: 2}, node_config: {}, max_workers: 0}\n"
        "  gpu: {resources: {CPU: 4, GPU: 1}, node_config: {}, min_workers: 0, max_workers: 2}\n"
    )
    monkeypatch.setenv("DALLE2_AUTOSCALING_CONFIG", str(config))  # where `ray up` leaves it on the head
    assert _use_gpu("auto")
    assert capsys.readouterr().err == "embed: on GPU (auto): no GPU alive now, the autoscaler can add gpu (1 GPU, up to 2)\n"
