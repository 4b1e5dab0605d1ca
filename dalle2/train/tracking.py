"""Where a run's history goes besides ``metrics.csv``: TensorBoard event files, and MLflow
when ``MLFLOW_TRACKING_URI`` is set.

Both are written by the progress callback (:mod:`dalle2.train.progress`) from rank 0's reports,
already averaged over the workers, so every training job has them without code in the loop.
TensorBoard's events live in ``<run>/tensorboard``: ``tensorboard --logdir <workdir>/runs``
shows every stage of a pipeline side by side. A run in object storage writes its events to a
local folder and copies them to ``<run>/tensorboard`` at each checkpoint (TensorBoard's writer
appends to a local file).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Any, Optional

from dalle2.data import storage

# Each scalar of a report, under the name it has in TensorBoard and MLflow.
SCALARS = ("loss", "val_loss", "lr", "steps_per_s", "samples_per_s", "dropped_rows")
EVENTS_FOLDER = "tensorboard"


def scalars_of(row: dict[str, Any]) -> dict[str, float]:
    return {name: float(row[name]) for name in SCALARS if isinstance(row.get(name), (int, float))}


def _sample_image(row: dict[str, Any]):
    """The sample grid a report names (a PNG in the run folder), as a PIL image, or None."""
    from PIL import Image

    uri = row.get("sample_grid")
    if not uri or not storage.exists(uri):
        return None
    return Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")


class TensorBoardLog:
    def __init__(self, run_uri: str):
        from torch.utils.tensorboard import SummaryWriter

        self.uri = storage.join(run_uri, EVENTS_FOLDER)
        self._remote = self.uri.startswith("s3://")
        folder = tempfile.mkdtemp(prefix="dalle2-events-") if self._remote else storage.path_of(self.uri)
        self.writer = SummaryWriter(log_dir=folder)

    def add(self, row: dict[str, Any], image=None) -> None:
        step = int(row["step"])
        for name, value in scalars_of(row).items():
            self.writer.add_scalar(name, value, step)
        if image is not None:
            import numpy as np

            self.writer.add_image("samples", np.asarray(image), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        if self._remote:
            for name in os.listdir(self.writer.log_dir):
                with open(os.path.join(self.writer.log_dir, name), "rb") as file:
                    storage.write_bytes(storage.join(self.uri, name), file.read())


class MlflowLog:
    """One MLflow run per training job run (a resumed run opens a new MLflow run, tagged with
    the same run folder), through MLflow's own client."""

    def __init__(self, tracking_uri: str, experiment: str, job: str, run_uri: str, params: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=job, tags={"dalle2.run": run_uri}).info.run_id
        for key, value in params.items():
            self.client.log_param(self.run_id, key, value)

    def add(self, row: dict[str, Any], image=None) -> None:
        from mlflow.entities import Metric

        step, now = int(row["step"]), int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in scalars_of(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        if image is not None:
            self.client.log_image(self.run_id, image, artifact_file=f"samples/step_{step:07d}.png")
        if row.get("max_steps") and step >= int(row["max_steps"]):
            self.client.set_terminated(self.run_id, "FINISHED")


class Trackers:
    """TensorBoard always; MLflow when a tracking URI was given (read on the driver: the Train
    controller that runs this may not see the driver's environment)."""

    def __init__(self, job: str, run_uri: str, mlflow_uri: Optional[str] = None, experiment: str = "dalle2"):
        self.job, self.run_uri = job, run_uri
        self.mlflow_uri, self.experiment = mlflow_uri, experiment
        self._tensorboard: Optional[TensorBoardLog] = None
        self._mlflow: Optional[MlflowLog] = None

    def __getstate__(self) -> dict[str, Any]:
        # The Train controller pickles its callbacks again to restart a failed worker group (a lost
        # node): the open writer (a thread, locks) and MLflow client stay behind, and the copy opens
        # its own at its next report. Events not yet flushed are of steps the restart replays.
        return {**self.__dict__, "_tensorboard": None, "_mlflow": None}

    def add(self, row: dict[str, Any], flush: bool) -> None:
        if self._tensorboard is None:  # opened at the first report, in the process that reports
            self._tensorboard = TensorBoardLog(self.run_uri)
            if self.mlflow_uri:
                params = {"job": self.job, "run": self.run_uri, "max_steps": row.get("max_steps", "")}
                self._mlflow = MlflowLog(self.mlflow_uri, self.experiment, self.job, self.run_uri, params)
        image = _sample_image(row)
        self._tensorboard.add(row, image)
        if self._mlflow is not None:
            self._mlflow.add(row, image)
        if flush or image is not None:
            self._tensorboard.flush()
