"""The orchestration `make demo` uses, end to end at the smallest sizes, and its bad input."""

import os
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from jobs.pipeline import load_pipeline_config, run_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "jobs", "configs")


def _write_config(tmp_path, **changes):
    config = {
        "workdir": str(tmp_path / "work"),
        "shapes": {"count": 96, "size": 32, "seed": 0},
        "clip": {"config": os.path.join(CONFIGS, "clip-tiny-cpu.yaml"), "max_steps": 3},
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
@pytest.mark.skipif(not os.environ.get("DALLE2_E2E"), reason="several minutes of Ray Train + Serve: set DALLE2_E2E=1")
def test_full_pipeline_returns_images_over_http_and_resumes(tmp_path):
    path = _write_config(tmp_path)
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    grid = Image.open(tmp_path / "work" / "demo-grid.png")
    assert grid.size == (2 * 66 + 2, 68)  # 2 images of 64px (32 -> 64 upsampler), 2px padding
    for bundle in ("clip", "prior", "decoder", "upsampler_256"):
        assert (tmp_path / "work" / "bundles" / bundle / "config.json").exists()

    # Rerun: every training stage is skipped (bundles exist); only serving runs again.
    rerun = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", str(path), "--stop-after", "upsampler"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("exists, skipped") == 5, rerun.stdout


def test_missing_dataset_is_one_clear_error(tmp_path):
    config = load_pipeline_config(str(_write_config(tmp_path, data=str(tmp_path / "nowhere"))))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_pipeline(config)
    assert not (tmp_path / "work" / "bundles").exists()  # nothing half-written


def test_stage_without_its_input_bundle_is_a_clear_error(tmp_path, ray_cluster):
    from jobs.pipeline import stage_data, stage_train

    config = load_pipeline_config(str(_write_config(tmp_path)))
    stage_data(config)
    with pytest.raises(FileNotFoundError, match="input bundle .*clip is absent"):
        stage_train(config, "prior", config.prior)
    assert not (tmp_path / "work" / "bundles" / "prior").exists()


def test_unknown_pipeline_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        load_pipeline_config(str(_write_config(tmp_path, decoders={"config": "x"})))
