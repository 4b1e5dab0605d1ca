"""The orchestration `make demo` uses, end to end at the smallest sizes, and its bad input."""

import os
import socket
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from jobs.stages import load_pipeline_config, run_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "jobs", "configs")


def _write_config(tmp_path, **changes):
    config = {
        "workdir": str(tmp_path / "work"),
        "shapes": {"count": 96, "size": 32, "seed": 0},
        "clip": {"config": os.path.join(CONFIGS, "clip-tiny-cpu.yaml"), "max_steps": 3},
        "embed": {"batch_size": 32, "accelerator": "cpu"},
        "prior": {"config": os.path.join(CONFIGS, "prior-tiny-cpu.yaml"), "max_steps": 3},
        "decoder": {"config": os.path.join(CONFIGS, "decoder-tiny-cpu.yaml"), "max_steps": 3},
        "upsampler": {"config": os.path.join(CONFIGS, "upsampler-tiny-cpu.yaml"), "max_steps": 3},
        "serve": {"prompts": ["a large red circle at the top left on a white background"], "n": 2},
        **changes,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_full_pipeline_returns_images_over_http_and_resumes(tmp_path):
    path = _write_config(tmp_path)
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "-m", "jobs.stages", "--config", str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    grid = Image.open(tmp_path / "work" / "demo-grid.png")
    assert grid.size == (2 * 66 + 2, 68)  # 2 images of 64px (32 -> 64 upsampler), 2px padding
    for bundle in ("clip", "prior", "decoder", "upsampler_256"):
        assert (tmp_path / "work" / "bundles" / bundle / "config.json").exists()
    assert (tmp_path / "work" / "embeddings" / "embed.json").exists()
    for job in ("prior", "decoder"):  # CLIP ran once, in the embed stage
        assert f"{job}: training tiny {job} for 3 steps from the embeddings" in run.stdout, run.stdout

    # Rerun: data, CLIP, embed and every other training stage are skipped; serving is not reached.
    rerun = subprocess.run([sys.executable, "-m", "jobs.stages", "--config", str(path), "--stop-after", "upsampler"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("exists, skipped") == 6, rerun.stdout


def test_missing_dataset_is_one_clear_error(tmp_path):
    config = load_pipeline_config(str(_write_config(tmp_path, data=str(tmp_path / "nowhere"))))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_pipeline(config)
    assert not (tmp_path / "work" / "bundles").exists()  # nothing half-written


def test_a_taken_serve_port_is_refused_before_any_stage(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        path = _write_config(tmp_path, serve={"prompts": ["a red circle"], "n": 1, "port": port})
        with pytest.raises(ValueError, match=f"127.0.0.1:{port} is already in use"):
            run_pipeline(load_pipeline_config(str(path)))
        assert not (tmp_path / "work").exists()  # not even the dataset was written


def test_stage_without_its_input_bundle_is_a_clear_error(tmp_path, ray_cluster):
    from jobs.stages import stage_data, stage_train

    config = load_pipeline_config(str(_write_config(tmp_path)))
    stage_data(config)
    with pytest.raises(FileNotFoundError, match="input bundle .*clip is absent"):
        stage_train(config, "prior", config.prior)
    assert not (tmp_path / "work" / "bundles" / "prior").exists()


def test_embed_stage_needs_clip_and_the_prior_needs_the_embeddings(tmp_path):
    from dalle2.bundle import save_bundle
    from dalle2.factory import create_model
    from jobs.stages import stage_embed, stage_train

    config = load_pipeline_config(str(_write_config(tmp_path)))
    with pytest.raises(FileNotFoundError, match="embed: its input bundle .*clip is absent"):
        stage_embed(config, config.embed)
    assert not (tmp_path / "work" / "embeddings").exists()
    save_bundle(create_model("clip", "tiny"), "clip", config.bundle("clip"))
    for job in ("prior", "decoder"):
        with pytest.raises(FileNotFoundError, match=f"{job}: its input embeddings .*embeddings are absent or incomplete"):
            stage_train(config, job, getattr(config, job))
    assert not (tmp_path / "work" / "runs").exists()


def test_embed_stage_redoes_an_incomplete_output_then_skips(tmp_path, ray_cluster, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dalle2.bundle import save_bundle
    from dalle2.data.schema import read_dataset
    from dalle2.factory import create_model
    from jobs.stages import stage_data, stage_embed

    config = load_pipeline_config(str(_write_config(tmp_path, shapes={"count": 24, "size": 32, "seed": 0})))
    stage_data(config)
    save_bundle(create_model("clip", "tiny"), "clip", config.bundle("clip"))
    partial = tmp_path / "work" / "embeddings"
    partial.mkdir()
    pq.write_table(pa.table({"key": ["left over"]}), partial / "part-left-over.parquet")  # an interrupted run's, no manifest

    assert stage_embed(config, config.embed) == config.embeddings_uri
    assert "removing the incomplete output" in capsys.readouterr().out
    assert not (partial / "part-left-over.parquet").exists() and (partial / "embed.json").exists()
    rows = read_dataset(config.embeddings_uri, columns=["key", "image"])
    assert rows.num_rows == 24 and len(set(rows["key"].to_pylist())) == 24

    stage_embed(config, config.embed)
    assert "embed: " + config.embeddings_uri + " exists, skipped" in capsys.readouterr().out


def test_unknown_pipeline_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        load_pipeline_config(str(_write_config(tmp_path, decoders={"config": "x"})))
    with pytest.raises(ValueError, match="embed.accelerator: 'tpu' is not one of auto, cpu, gpu"):
        load_pipeline_config(str(_write_config(tmp_path, embed={"accelerator": "tpu"})))
    assert load_pipeline_config(str(_write_config(tmp_path, embed=None))).embed is None  # prior and decoder from images
