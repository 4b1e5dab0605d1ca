"""`dalle2 data import` as a Ray Data job: WebDataset shards (folder and s3://), the same rows and
skips as the single-process importer, --max-side, clear errors before any task, and a killed
import that resumes with every input row exactly once."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dalle2.data import storage
from dalle2.data.ray_import import RayImportConfig, ray_import
from dalle2.data.schema import DatasetError, read_dataset
from test_data_webdataset import EXPECTED_SKIPS, SIDE, write_shapes_shards, write_shards


def test_ray_import_of_webdataset_from_s3_counts_bad_rows_by_reason(s3_server, ray_cluster):
    prefix = s3_server.uri("rwds")
    good = write_shards(prefix)
    out = s3_server.uri("rwds-out")
    report = ray_import(RayImportConfig(src=prefix + "/{00000..00002}.tar", out=out, workers=2, rows_per_file=2, cpus_per_task=0.25))
    assert report.rows == len(good) and dict(report.skipped) == EXPECTED_SKIPS
    table = read_dataset(out)
    assert sorted(table.column("key").to_pylist()) == sorted(good)
    assert "url" in table.column_names
    again = ray_import(RayImportConfig(src=prefix + "/{00000..00002}.tar", out=out, workers=2, cpus_per_task=0.25))
    assert again.rows == len(good) and sorted(read_dataset(out).column("key").to_pylist()) == sorted(good)  # nothing redone


def test_ray_import_shrinks_to_max_side(ray_cluster, tmp_path):
    folder = str(tmp_path / "shards")
    write_shards(folder)
    out = str(tmp_path / "out")
    ray_import(RayImportConfig(src=folder, out=out, max_side=16, cpus_per_task=0.25))
    table = read_dataset(out)
    assert set(table.column("width").to_pylist()) == {16} and set(table.column("height").to_pylist()) == {16}
    assert SIDE > 16


def test_small_shards_share_a_task_and_a_retried_task_skips_finished_units(tmp_path):
    from dalle2.data.ray_import import TASKS_PER_WORKER, Unit, convert_unit, group_units, plan_units

    folder = str(tmp_path / "shards")
    write_shapes_shards(folder, shards=12, per_shard=10)
    config = RayImportConfig(src=folder, out=str(tmp_path / "out"), rows_per_file=4)
    units, extras = plan_units(config)
    assert len(units) == 12 and all(unit.size == os.path.getsize(unit.files[0]) for unit in units)
    tasks = group_units(units, workers=2)
    assert len(tasks) == 2 * TASKS_PER_WORKER  # small shards: not a task each, yet 4 per worker
    assert [unit for task in tasks for unit in task] == units  # each unit once, in order
    assert group_units([Unit(i, "webdataset", [], size=300 << 20) for i in range(20)], workers=2) == [
        [Unit(i, "webdataset", [], size=300 << 20)] for i in range(20)]  # LAION-size shards: a task each  # fmt: skip
    first = convert_unit(units[0], config, extras)
    written = {path: os.path.getmtime(path) for path in glob.glob(f"{config.out}/part-*.parquet")}
    assert first["rows"] == 10 and len(written) == 3
    assert convert_unit(units[0], config, extras) == first  # Ray retries a task: its finished units are not redone
    assert {path: os.path.getmtime(path) for path in glob.glob(f"{config.out}/part-*.parquet")} == written


def test_bad_import_options_and_inputs_fail_before_any_task(tmp_path):
    with pytest.raises(ValueError, match="max-side must be at least 8"):
        RayImportConfig(src="x", out="y", max_side=4)
    with pytest.raises(DatasetError, match="none exists"):
        ray_import(RayImportConfig(src=str(tmp_path) + "/{0..3}.tar", out=str(tmp_path / "o")))


def test_a_killed_import_resumes_with_every_row_once(ray_cluster, tmp_path):
    folder = str(tmp_path / "shards")
    write_shapes_shards(folder, shards=12, per_shard=10)
    out = str(tmp_path / "out")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"], "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-m", "dalle2.cli", "data", "import", folder, out, "--workers", "1",
               "--cpus-per-task", "0.25", "--rows-per-file", "4"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(glob.glob(f"{out}/_done/*.json")) < 3:
            assert process.poll() is None, "the import ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    time.sleep(2)  # the job's tasks go with their driver
    completed = len(glob.glob(f"{out}/_done/*.json"))
    assert 3 <= completed < 12
    # What an attempt killed mid-unit leaves: a Parquet file of a unit without a marker (here a copy
    # of a finished unit's file, so its rows would show twice if it stayed).
    pending = min(set(range(12)) - {int(os.path.basename(m)[5:11]) for m in glob.glob(f"{out}/_done/*.json")})
    finished_file = sorted(glob.glob(f"{out}/part-*.parquet"))[0]
    stale = f"{out}/part-{pending:06d}-0007.parquet"
    with open(finished_file, "rb") as source, open(stale, "wb") as copy:
        copy.write(source.read())
    report = ray_import(RayImportConfig(src=folder, out=out, workers=2, rows_per_file=4, cpus_per_task=0.25))
    keys = read_dataset(out).column("key").to_pylist()
    assert report.rows == 120 and len(keys) == 120 and len(set(keys)) == 120  # each input row exactly once
    markers = [json.loads(storage.read_bytes(path)) for path in sorted(glob.glob(f"{out}/_done/*.json"))]
    assert len(markers) == 12 and sum(m["rows"] for m in markers) == 120
    assert not os.path.exists(stale) and os.path.exists(finished_file)  # the driver deleted the partial unit's file only


def test_bench_import_reports_both_importers(ray_cluster):
    from dalle2.bench.imports import ImportBenchSettings, format_import_report, run_import_bench

    result = run_import_bench(ImportBenchSettings(shards=2, per_shard=4, repeats=1, warmup=0, cpus_per_task=0.25))
    assert result["single_process"]["rows"] == result["ray_data"]["rows"] == 8
    assert result["ray_vs_single"] > 0 and "images/s" in format_import_report(result)
