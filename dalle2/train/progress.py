"""Progress people can follow: one line per report on the driver, and the run's history in the run folder.

:class:`ProgressCallback` is a Ray Train ``UserCallback``: it runs in the Train controller, sees
every report of rank 0 (whose metrics are already averaged over the workers) and appends them
to ``<run>/metrics.csv`` (local folder or ``s3://``), with the count of rows the data pipeline
dropped so far, and to TensorBoard (and MLflow when ``MLFLOW_TRACKING_URI`` is set, see
:mod:`dalle2.train.tracking`). Its line goes to the driver through a queue when the driver
asks for it (:func:`forwarded_lines`), else it is printed where the controller runs.
"""

from __future__ import annotations

import csv
import io
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from dalle2.data import storage

CSV_COLUMNS = (
    "step", "epoch", "samples", "loss", "val_loss", "lr", "steps_per_s", "samples_per_s",
    "eta_s", "elapsed_s", "dropped_rows", "sample_grid",
)  # fmt: skip


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def job_header(job: Any) -> tuple[str, dict[str, str]]:
    """A training job's header on the console (`dalle2 train`, each pipeline stage): the title,
    then what trains where, on what data, and where its run lives."""
    source = {"embeddings": "the embeddings", "webdataset": "the WebDataset shards"}.get(job.data.format.value, "the images")
    scaling = job.scaling
    devices = f"{scaling.workers} worker{'s' if scaling.workers > 1 else ''}" + (" (GPU)" if scaling.use_gpu else " (CPU)")
    run = storage.join(job.run.storage, job.run.name)
    title = f"{job.job}: training {job.model.preset} {job.model_kind} for {job.loop.max_steps} steps from {source}"
    return title, {
        "model": f"{job.model.preset} {job.model_kind}, DeepSpeed ZeRO-{job.deepspeed.zero_stage} on {devices}, {_precision(job)}",
        "data": job.data.path,
        "run": f"{run} (metrics.csv, tensorboard/, checkpoints)",
    }


def _precision(job: Any) -> str:
    """``fp32``, or ``fp32 weights, bf16 autocast`` (``deepspeed.autocast``; auto: on this CPU or not)."""
    precision, autocast = job.deepspeed.precision.value, job.deepspeed.autocast.value
    if autocast == "none":
        return precision
    if autocast == "bf16":
        return f"{precision} weights, bf16 autocast"
    if job.scaling.use_gpu:
        return f"{precision} weights, bf16 autocast where the GPU has bf16"
    from dalle2.precision import cpu_has_native_bf16  # imports torch: only for this case

    if cpu_has_native_bf16():
        return f"{precision} weights, bf16 autocast (this CPU has bf16 arithmetic)"
    return f"{precision} (no bf16 arithmetic on this CPU: no autocast)"


def final_metrics(metrics: dict[str, Any]) -> str:
    """``loss 0.1234 | val 0.1100``: a finished job's summary line's figures (those it has)."""
    names = {"loss": "loss", "val_loss": "val"}
    return " | ".join(f"{names[k]} {metrics[k]:.4f}" for k in names if isinstance(metrics.get(k), (int, float)))


def progress_line(job: str, metrics: dict[str, Any]) -> str:
    """``decoder step 40/200 (20%) | loss 0.1234 | val 0.1100 | 3.20 steps/s | 51.2 samples/s | lr 3.0e-04 | eta 0:00:50``"""
    step, total = metrics["step"], metrics.get("max_steps") or metrics["step"]
    parts = [f"{job} step {step}/{total} ({100 * step // max(total, 1)}%)", f"loss {metrics['loss']:.4f}"]
    if "val_loss" in metrics:
        parts.append(f"val {metrics['val_loss']:.4f}")
    parts += [
        f"{metrics['steps_per_s']:.2f} steps/s",
        f"{metrics['samples_per_s']:.1f} samples/s",
        f"lr {metrics['lr']:.1e}",
        f"eta {format_duration(metrics['eta_s'])}",
    ]
    if metrics.get("dropped_rows"):
        parts.append(f"dropped {metrics['dropped_rows']} rows")
    if metrics.get("sample_grid"):
        parts.append(f"samples {metrics['sample_grid']}")
    return " | ".join(parts)


class MetricsLog:
    """Rows of a CSV at a URI, one per reported step. A step reported again (a run restarted
    from its last checkpoint after a worker or node was lost, or resumed by name past where
    its last checkpoint was taken) replaces that step and every later one: each step is in the
    file once, with the values of the attempt that went on.

    Local files are appended to at once (rewritten only on a replay). An object store has no
    append: the whole file is rewritten, at most every ``rewrite_every_s`` seconds and whenever
    ``flush`` is asked for (the loop's checkpoints), so a long run does not upload its growing
    CSV at every report."""

    def __init__(self, uri: str, rewrite_every_s: float = 60.0):
        self.uri = uri
        self.rewrite_every_s = rewrite_every_s
        self._local = not uri.startswith("s3://")
        self._rows: Optional[list[dict[str, Any]]] = None  # read from the file at the first row
        self._written_at = 0.0

    def _text(self, rows: list[dict[str, Any]], header: bool) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def append(self, row: dict[str, Any], flush: bool = True) -> None:
        if self._rows is None:
            self._rows = read_metrics(self.uri) if storage.exists(self.uri) else []
        step = int(row["step"])
        replayed = bool(self._rows) and int(self._rows[-1]["step"]) >= step
        if replayed:
            self._rows = [old for old in self._rows if int(old["step"]) < step]
        self._rows.append(row)
        if self._local:
            path = storage.path_of(self.uri)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if replayed or not os.path.exists(path):
                with open(path, "w", newline="") as file:
                    file.write(self._text(self._rows, header=True))
            else:
                with open(path, "a", newline="") as file:
                    file.write(self._text([row], header=False))
            return
        if flush or replayed or time.monotonic() - self._written_at >= self.rewrite_every_s:
            storage.write_bytes(self.uri, self._text(self._rows, header=True).encode())
            self._written_at = time.monotonic()


def read_metrics(uri: str) -> list[dict[str, str]]:
    """The rows of a run's metrics CSV."""
    return list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode())))


@contextmanager
def forwarded_lines(on_line: Optional[Callable[[str], None]]) -> Iterator[Any]:
    """A Ray queue whose lines a driver thread hands to ``on_line`` until the block ends
    (then the rest); yields None, and starts nothing, when ``on_line`` is None."""
    if on_line is None:
        yield None
        return
    from ray.util.queue import Empty, Queue

    lines = Queue(actor_options={"num_cpus": 0})  # no CPU: a small cluster's are all in use
    done = threading.Event()

    def drain() -> None:
        while not done.is_set():
            try:
                on_line(lines.get(timeout=0.5))
            except Empty:
                pass

    thread = threading.Thread(target=drain, name="progress-lines", daemon=True)
    thread.start()
    try:
        yield lines
    finally:
        done.set()
        thread.join()
        while not lines.empty():
            on_line(lines.get_nowait())
        lines.shutdown()


def make_progress_callback(job: str, run_uri: str, dropped_rows=None, lines=None):
    """A Ray Train UserCallback (built here so that this module imports without Ray); ``lines``:
    a queue of :func:`forwarded_lines` for the progress lines."""
    import ray
    from ray.train import UserCallback

    from dalle2.train.tracking import Trackers

    trackers = Trackers(job, run_uri, os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_EXPERIMENT_NAME", "dalle2"))

    class ProgressCallback(UserCallback):
        def __init__(self) -> None:
            self.log = MetricsLog(storage.join(run_uri, "metrics.csv"))

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if not metrics or "step" not in metrics[0]:
                return
            row = dict(metrics[0])
            if dropped_rows is not None:
                try:
                    row["dropped_rows"] = sum(ray.get(dropped_rows.totals.remote()).values())
                except ray.exceptions.RayActorError:  # its node went away: the step counts, the count not
                    pass
            line = progress_line(job, row)
            print(line, flush=True)  # the controller's log (and the driver's when nothing forwards)
            if lines is not None:
                lines.put(line)
            self.log.append(row, flush=checkpoint is not None)
            try:
                trackers.add(row, flush=checkpoint is not None)
            except Exception as error:  # noqa: BLE001 - a tracker's failure must not stop training
                warning = f"{job}: tracking failed at step {row['step']}: {error!r}"
                print(warning, flush=True)
                if lines is not None:
                    lines.put(warning)

    return ProgressCallback()
