"""What would fail on every retry is refused once, on the driver, before any worker starts:
a cluster address that does not answer, a worker share smaller than one batch, a resume with
another worker count / ZeRO stage / precision, a run folder of another job kind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from dalle2.data.epochs import Piece
from dalle2.train import checkpoint as ckpt
from dalle2.train.cli import main_for_job
from dalle2.train.config import ConfigError, job_to_dict, load_job_config
from dalle2.train.launch import check_job
from dalle2.train.preflight import check_batches, check_cluster_address, check_resume


def job(kind: str, data: str, runs: str, **sections):
    overrides = {"data": {"path": data, "validation_fraction": 0.1}, "run": {"storage": runs, "name": "preflight"}}
    overrides.update(sections)
    return load_job_config(kind, overrides=overrides)


def write_checkpoint(run_uri: str, written, step: int = 4) -> str:
    """A complete checkpoint folder as the loop writes it (job.json, train state, manifest), no weights."""
    folder = os.path.join(run_uri, ckpt.checkpoint_dir_name(step))
    os.makedirs(folder)
    ckpt.write_rank0_files(
        folder, state=ckpt.TrainState(step=step), job=job_to_dict(written), model_kind=written.model_kind,
        model_config={}, zero_stage=written.deepspeed.zero_stage, world_size=written.scaling.workers,
        ema_layout=None, extra={},
    )  # fmt: skip
    ckpt.write_manifest(folder, [ckpt.local_files(folder)], step)
    return folder


def dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed on leaving: nothing listens there


def test_a_cluster_address_that_does_not_answer():
    port = dead_port()
    with pytest.raises(ConfigError, match=rf"the Ray cluster at 127.0.0.1:{port} \(RAY_ADDRESS\) does not answer"):
        check_cluster_address(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(ConfigError, match="does not answer"):
        check_cluster_address(f"ray://127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(ConfigError, match="is not host:port"):
        check_cluster_address("my-cluster")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_cluster_address(f"127.0.0.1:{listening.getsockname()[1]}")
    for local in (None, "", "auto", "local"):
        check_cluster_address(local)


def test_the_command_line_refuses_a_dead_cluster_address(train_shapes, tmp_path):
    """In a fresh process (this one may already hold a Ray): exit 2 and the reason, no minute-long wait."""
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{dead_port()}"}
    command = [sys.executable, "-m", "jobs.train_upsampler", "--data", train_shapes, "--storage", str(tmp_path / "runs")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train upsampler: error: the Ray cluster at 127.0.0.1:" in done.stderr and "does not answer" in done.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_every_worker_share_must_hold_a_batch(tmp_path):
    pieces = [Piece(f"part-{i}.parquet", 0, 40) for i in range(4)]  # 160 rows, 4 pieces of 40
    check_batches(pieces, job("upsampler", "unused", str(tmp_path), loop={"batch_size": 16}, scaling={"workers": 4}))
    message = (
        r"data: 160 rows in 4 pieces give the smallest of 4 workers 40 rows \(about 36 for training after the 0.1 "
        r"validation fraction\), less than one batch of 64: use loop.batch_size <= 36, fewer workers, or more data"
    )
    with pytest.raises(ConfigError, match=message):
        check_batches(pieces, job("upsampler", "unused", str(tmp_path), loop={"batch_size": 64}, scaling={"workers": 4}))
    # more workers than pieces: one worker would read nothing at all
    with pytest.raises(ConfigError, match="smallest of 5 workers 0 rows"):
        check_batches(pieces, job("upsampler", "unused", str(tmp_path), loop={"batch_size": 1}, scaling={"workers": 5}))


def test_a_resume_must_match_its_checkpoint(train_shapes, tmp_path):
    runs = str(tmp_path / "runs")
    written = job("upsampler", train_shapes, runs, scaling={"workers": 2}, deepspeed={"zero_stage": 2, "precision": "fp32"})
    run_uri = check_job(written).run_uri
    assert check_resume(written, run_uri) is None  # a new run
    checkpoint = write_checkpoint(run_uri, written)
    assert check_resume(written, run_uri) == checkpoint  # the same settings resume

    resumed = job("upsampler", train_shapes, runs, scaling={"workers": 4}, deepspeed={"zero_stage": 3, "precision": "bf16"})
    message = (
        r"was written with scaling.workers \(--workers\) 2 \(this job: 4\), deepspeed.zero_stage \(--zero\) 2 \(this job: 3\), "
        r"deepspeed.precision fp32 \(this job: bf16\); a resume needs the same: set them back, or start a new run.name"
    )
    with pytest.raises(ConfigError, match=message):
        check_resume(resumed, run_uri)
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage \(--zero\) 2 \(this job: 1\); a resume"):
        check_resume(job("upsampler", train_shapes, runs, deepspeed={"zero_stage": 1, "precision": "fp32"}), run_uri)


def test_a_run_folder_of_another_job_kind_is_refused_by_the_command_line(train_shapes, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    written = job("clip", train_shapes, runs)
    write_checkpoint(check_job(written).run_uri, written)
    code = main_for_job("upsampler", ["--data", train_shapes, "--storage", runs, "--name", "preflight"])
    assert code == 2
    error = capsys.readouterr().err
    assert "holds a run of the clip job (clip), this is the upsampler job (upsampler_256): give this job another run.name (--name)" in error
