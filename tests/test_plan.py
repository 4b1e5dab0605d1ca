"""``dalle2 plan``: every shipped GPU job config fits its declared GPU memory with 10% headroom,
and the activation extrapolation matches a direct measurement at a third width."""

from __future__ import annotations

import glob
import json
import os

import pytest

from dalle2.cli import main
from dalle2.factory import load_config
from dalle2.train.activations import CHECK_FACTOR, FIT_FACTORS, measure, reduced_config, saved_bytes
from dalle2.train.plan import HEADROOM, plan_file

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "*-gpu.yaml")))


def test_the_paper_size_configs_are_shipped():
    names = {os.path.basename(path) for path in CONFIGS}
    for kind in ("clip", "prior", "decoder", "upsampler-256", "upsampler-1024"):
        assert f"{kind}-paper-gpu.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_gpu_config_fits_its_declared_memory(path):
    plan = plan_file(path)
    assert plan.gpu_memory_gib > 0, "a GPU config declares scaling.gpu_memory_gib"
    assert plan.fits and plan.total_gib <= (1 - HEADROOM) * plan.gpu_memory_gib, plan
    assert plan.model_states_gib > 0 and plan.activations_gib > 0
    if plan.activation_checkpointing:
        assert plan.activations_gib < 0.5 * plan.activations_without_checkpointing_gib


def test_the_width_extrapolation_matches_a_direct_measurement():
    config = load_config("decoder", "base")
    estimate = measure("decoder", "decoder", config, batch=2, check=True)
    assert estimate.check_error is not None and estimate.check_error < 0.02
    # The line is increasing in width and its reading at full width is above every measured width.
    small, large = (estimate.fit[f] for f in FIT_FACTORS)
    assert small < large < estimate.bytes_plain
    direct = saved_bytes("decoder", "decoder", reduced_config("decoder", config, CHECK_FACTOR), 2)["plain"]
    assert large < direct < estimate.bytes_plain


def test_plan_command_prints_json(capsys):
    path = next(p for p in CONFIGS if p.endswith("upsampler-base-gpu.yaml"))
    assert main(["plan", "--config", path, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["zero_stage"] == 2 and plan["global_batch"] == 32 * 8
