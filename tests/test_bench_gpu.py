"""``dalle2 bench gpu``: without CUDA it says so and exits 0; ``--device cpu`` runs the same code
path on the tiny preset (FLOP counting, micro-batch search, cascade sampling, report)."""

from __future__ import annotations

import json

import pytest
import torch

from dalle2.bench.gpu import GpuBenchSettings, largest_batch, peak_tflops, run_gpu_bench, step_flops, training_step
from dalle2.cli import main
from dalle2.factory import load_config


def test_peak_table_and_override():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("cpu") is None and peak_tflops("cpu", 5.0) == 5.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_0(capsys):
    assert main(["bench", "gpu"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_flops_counted_and_batch_search_on_cpu():
    config = load_config("prior", "tiny")
    step, parameters = training_step("prior", config, 2, torch.device("cpu"))
    flops = step_flops(step)
    assert parameters > 0 and flops > 6 * parameters  # forward + backward of at least one token per sample
    assert largest_batch("prior", config, GpuBenchSettings(device="cpu", max_batch=4), torch.device("cpu")) == 4


def test_cpu_smoke_mode_reports_every_figure(capsys):
    assert main(["bench", "gpu", "--device", "cpu", "--json", "--no-peers", "--peak-tflops", "1", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    kinds = {row["kind"] for row in result["training"]}
    assert kinds == {"prior", "decoder", "upsampler_256", "upsampler_1024"}
    for row in result["training"]:
        assert row["images_per_s"] > 0 and row["tflops"] > 0 and 0 < row["mfu"] < 1
    assert result["sampling"][0]["images_per_s"] > 0 and result["sampling"][0]["stages"][0] == "prior"
