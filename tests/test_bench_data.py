"""``dalle2 bench data`` runs end to end on a tiny dataset and reports every figure. A smoke test:
no timing is asserted (timings are the command's job, on a machine chosen for it)."""

from __future__ import annotations

import argparse

from dalle2.bench.cli import add_bench_commands
from dalle2.bench.data import cmd_data, format_data_report, ray_session_cpu_seconds, run_data_bench, settings_from_args


def test_bench_data_reports_throughputs_ratio_and_data_wait(ray_cluster):
    parser = argparse.ArgumentParser(prog="dalle2")
    add_bench_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["bench", "data", "--json", "--quiet", "--count", "48", "--rows-per-file", "12", "--batch-size", "8",
         "--repeats", "1", "--warmup", "0", "--decoder-batch", "4", "--decoder-steps", "2", "--decoder-warmup", "1",
         "--preprocess-tasks", "3", "--shuffle-buffer", "16"]
    )  # fmt: skip
    assert args.func is cmd_data  # registered in the bench group
    # The result itself, not stdout: Ray's own warnings may land on stdout in the middle of it.
    result = run_data_bench(settings_from_args(args))

    assert {"machine", "settings", "dataset", "plain_loop", "pipeline", "pipeline_vs_plain", "decoder_step", "targets"} <= set(result)
    assert result["dataset"]["files"] == 4 and result["dataset"]["image_size"] == 32  # the tiny decoder's resolution
    assert result["plain_loop"]["images_per_epoch"] == 48
    assert result["pipeline"]["images_per_epoch"] == 48  # 2 equal shards of an even row count: nothing left out
    assert result["pipeline"]["decode_tasks"] == 3 and result["settings"]["preprocess_tasks"] == 3
    for reader in ("plain_loop", "pipeline"):
        assert result[reader]["images_per_s"] > 0
    shuffling = result["shuffle_cost"]  # the training reader: 2 workers x 2 files x 12 rows, batches of 8
    for reader in ("shuffled", "file_order"):
        assert shuffling[reader]["images_per_epoch"] == 48 and shuffling[reader]["images_per_s"] > 0
    assert shuffling["met"] == (shuffling["shuffle_cost"] < 0.10) and "shuffling costs" in format_data_report(result)
    assert result["pipeline_vs_plain"] > 0
    step = result["decoder_step"]
    assert step["steps"] == 4 and len(step["per_worker_wait_fraction"]) == 2  # 2 workers x 2 timed steps
    assert 0 <= step["data_wait_fraction"] <= 1 and step["step_s"] > 0
    assert result["machine"]["cpu_parallelism"] > 0
    assert set(result["targets"]["met"]) == {"pipeline_vs_plain", "data_wait_fraction"}

    # Ray was started by the fixture, so the pipeline's CPU is not attributed (other tests' work
    # would be counted); the accounting itself sees this node's processes.
    assert result["pipeline"]["cpu_ms_per_image"] is None and result["cpu_bound_estimate"] is None
    assert result["plain_loop"]["cpu_ms_per_image"] > 0
    assert ray_session_cpu_seconds() > 0

    report = format_data_report(result)
    assert "images/s" in report and "waiting for data" in report and "decode tasks at once: 3" in report
