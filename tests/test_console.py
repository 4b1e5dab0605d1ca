"""The pipeline's console (ours on the terminal, the rest in logs), progress bars, and the
trackers a training run writes to (TensorBoard, MLflow), without a cluster."""

import fcntl
import io
import json
import os
import select
import struct
import subprocess
import sys
import termios
import textwrap

import pytest

from PIL import Image

from dalle2.images import png_bytes
from dalle2.progress_bars import Bar
from dalle2.train.tracking import Trackers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_console_keeps_our_lines_and_logs_the_rest_even_below_python(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys, logging
        from dalle2.console import Console
        with Console({str(tmp_path / "logs")!r}) as console:
            console.section("clip")
            console.say("ours")
            print("a library's print")
            logging.getLogger("ray").warning("a logger line")
            os.write(2, b"a C++ line on fd 2\\n")
            console.error(RuntimeError("it broke"))
        print("after: back on the terminal")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].endswith("] ours") and run.stdout.splitlines()[1:] == ["after: back on the terminal"]
    log = (tmp_path / "logs" / "clip.log").read_text()
    assert run.stderr == f"pipeline: error: it broke\nfull log: {tmp_path / 'logs' / 'clip.log'}\n"
    for line in ("] ours", "a library's print", "a logger line", "a C++ line on fd 2", "RuntimeError: it broke"):
        assert line in log, log


def test_bar_is_plain_lines_off_a_terminal_and_tqdm_on_one():
    plain = io.StringIO()
    with Bar(10, "data: rendering", "img", every_s=0, stream=plain) as bar:
        bar.update(3)
    lines = plain.getvalue().splitlines()
    assert "data: rendering: 3/10 (30%)" in lines[0] and "img/s" in lines[0] and "eta" in lines[0] and "\r" not in plain.getvalue()

    main, side = os.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal of 100 columns
    with os.fdopen(side, "w") as terminal, Bar(10, "eval: generating", "img", stream=terminal) as bar:
        bar.update(10)
    drawn = b""
    while select.select([main], [], [], 0.5)[0]:
        try:
            drawn += os.read(main, 4096)
        except OSError:  # EIO: the terminal's other side is closed and all was read
            break
    os.close(main)
    drawn = drawn.decode()
    assert "eval: generating: 100%" in drawn and "10/10" in drawn, drawn


def test_trackers_write_tensorboard_events_and_an_mlflow_file_store_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store is opt-in
    run, mlruns = tmp_path / "runs" / "decoder", (tmp_path / "mlruns").as_uri()
    grid = run / "samples" / "step-00000002.png"
    grid.parent.mkdir(parents=True)
    grid.write_bytes(png_bytes(Image.new("RGB", (20, 10), (255, 0, 0))))
    trackers = Trackers("decoder", str(run), mlruns)
    rows = [{"step": 1, "loss": 0.5, "lr": 1e-3, "samples_per_s": 8.0, "max_steps": 2},
            {"step": 2, "loss": 0.25, "val_loss": 0.3, "lr": 1e-3, "samples_per_s": 9.0, "dropped_rows": 1,
             "max_steps": 2, "sample_grid": str(grid)}]  # fmt: skip
    for row in rows:
        trackers.add(row, flush=False)

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert {"val_loss", "lr", "samples_per_s", "dropped_rows"} <= set(events.Tags()["scalars"])
    (image,) = events.Images("samples")
    assert (image.step, image.width, image.height) == (2, 20, 10)

    client = MlflowClient(mlruns)
    (found,) = client.search_runs([client.get_experiment_by_name("dalle2").experiment_id])
    assert [m.value for m in client.get_metric_history(found.info.run_id, "loss")] == [0.5, 0.25]
    assert found.info.status == "FINISHED" and found.data.metrics["val_loss"] == 0.3
    assert [a.path for a in client.list_artifacts(found.info.run_id, "samples")] == ["samples/step_0000002.png"]


def test_open_trackers_pickle_for_a_restart_after_a_lost_node(tmp_path):
    # Ray Train's controller pickles the progress callback (and its Trackers) again when it
    # restarts a failed worker group; an open TensorBoard writer holds a thread and locks.
    import pickle

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "clip"
    trackers = Trackers("clip", str(run))
    trackers.add({"step": 4, "loss": 0.5}, flush=True)
    restarted = pickle.loads(pickle.dumps(trackers))
    restarted.add({"step": 5, "loss": 0.25}, flush=True)  # opens its own writer
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(4, 0.5), (5, 0.25)]


def test_verbose_console_writes_the_logs_and_shows_them_too(tmp_path):
    script = textwrap.dedent(f"""
        import os, logging
        from dalle2.console import Console
        with Console({str(tmp_path / "logs")!r}, echo=True) as console:
            console.say("before any section")
            console.section("clip")
            console.say("ours")
            print("a library's print", flush=True)
            logging.getLogger("ray").warning("a logger line")
            os.write(2, b"a C++ line on fd 2\\n")
            console.section("prior")
            os.write(1, b"a prior worker line\\n")
        print("after: back on the terminal")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    terminal = run.stdout.splitlines()
    assert terminal[0].endswith("] before any section") and terminal[-1] == "after: back on the terminal"
    for line in ("] ours", "a library's print", "a logger line", "a C++ line on fd 2", "a prior worker line"):
        assert sum(line in shown for shown in terminal) == 1, terminal  # on the terminal once, not twice
    clip, prior = ((tmp_path / "logs" / f"{name}.log").read_text() for name in ("clip", "prior"))
    for line in ("] ours", "a library's print", "a logger line", "a C++ line on fd 2"):
        assert line in clip, clip
    assert "a prior worker line" in prior and "before any section" not in clip + prior


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_dalle2_train_alone_keeps_our_lines_and_logs_ray_and_deepspeed(tmp_path, train_shapes):
    """`dalle2 train` outside the pipeline: the job's header, progress lines and summary without
    Ray's `(TrainController pid=...)` prefixes; the rest in <storage>/logs/<name>.log."""
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "jobs.train_upsampler", "--data", train_shapes, "--storage", str(runs), "--name", "up",
               "--max-steps", "2", "--workers", "1", "--batch-size", "8"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    *ours, summary = done.stdout.splitlines()
    assert all(line.startswith("[") and "] " in line for line in ours), ours
    text = "\n".join(ours)
    log = runs / "logs" / "up.log"
    assert "upsampler: training tiny upsampler_256 for 2 steps from the images" in text and f"log    {log}" in text
    assert "upsampler step 2/2 (100%)" in text and "upsampler: done in " in text and f"run {runs / 'up'}" in text
    for noise in ("pid=", "real_accelerator", "[WARNING]", "INFO worker.py"):  # Ray's prefixes, DeepSpeed's and Ray's loggers
        assert noise not in done.stdout + done.stderr, noise
    assert done.stderr == ""
    assert json.loads(summary)["step"] == 2
    written = log.read_text(errors="replace")
    assert "pid=" in written and "deepspeed" in written.lower() and "upsampler step 2/2" in written
