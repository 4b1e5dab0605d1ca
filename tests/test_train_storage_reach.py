"""An ``s3://`` location that some node's workers cannot reach is refused on the driver, before
training starts, naming the node and the reason.

One cluster for the module (tests/multinode.py): a head without CPU and two worker nodes, the
second started with a wrong AWS secret in its environment (a `ray up` worker type without the
instance profile, say). The driver itself has good credentials, so the data checks of the
driver pass: only a probe on each node finds the one that would fail, as would a job whose
runtime env carries wrong keys.
"""

from __future__ import annotations

import re

import ray
import pytest

from dalle2.data import storage
from dalle2.data.shapes import write_shapes_dataset
from dalle2.train.config import ConfigError, load_job_config
from dalle2.train.launch import run_job
from dalle2.train.preflight import PROBE_FOLDER, check_storage_reach, probe_storage, probe_targets
from multinode import node_cluster  # tests/multinode.py (pytest puts tests/ on sys.path)

WRONG_SECRET = {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}


def test_the_probe_says_why_a_location_cannot_be_reached(s3_server, monkeypatch):
    data = s3_server.uri("reach-probe-data")
    storage.write_bytes(storage.join(data, "a.txt"), b"x")
    runs = s3_server.uri("reach-probe-runs")
    assert probe_storage([data], [runs], "here") == []
    assert not storage.exists(storage.join(runs, PROBE_FOLDER, "here"))  # the probe object is deleted
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    failed = dict(probe_storage([data], [runs], "here"))
    assert set(failed) == {f"read {data}", f"write under {runs}"}
    for why in failed.values():
        assert re.search("ACCESS_DENIED|SIGNATURE_DOES_NOT_MATCH", why), why  # the server's reason, in the SDK's words
        assert why.endswith(f"(endpoint {s3_server.endpoint}, AWS_ACCESS_KEY_ID ...-key from the environment)")


def test_what_the_probe_reads_and_writes():
    prior = load_job_config("prior", overrides={
        "data": {"path": "s3://b/shards-{000..003}.tar", "format": "webdataset"}, "clip": "s3://b/bundles/clip",
        "run": {"storage": "s3://b/runs"},
    })  # fmt: skip
    assert probe_targets(prior) == (["s3://b", "s3://b/bundles/clip"], ["s3://b/runs"])  # the shards' folder, not a pattern
    local = load_job_config("clip", overrides={"data": {"path": "/data/shapes"}, "run": {"storage": "runs"}})
    assert probe_targets(local) == ([], [])  # one machine's paths: nothing to probe


@pytest.fixture(scope="module")
def nodes(s3_server):
    good, bad = {"num_cpus": 1}, {"num_cpus": 1, "env_vars": WRONG_SECRET}
    with node_cluster(head={"num_cpus": 0}, workers=[good, bad]) as cluster:
        yield cluster


def clip_job(data: str, runs: str):
    return load_job_config("clip", overrides={
        "data": {"path": data, "validation_fraction": 0.1},
        "run": {"storage": runs, "name": "unreachable"},
        "loop": {"max_steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 2, "val_batches": 0},
        "scaling": {"workers": 1, "cpus_per_worker": 0.5},
    })  # fmt: skip


def test_a_node_without_the_credentials_is_named_before_training_starts(nodes, s3_server):
    data, runs = s3_server.uri("reach-shapes"), s3_server.uri("reach-runs")
    write_shapes_dataset(data, count=32, image_size=32, rows_per_file=32)
    good, bad = nodes.workers
    with pytest.raises(ConfigError) as caught:
        run_job(clip_job(data, runs))
    message = str(caught.value)
    assert f"(node {bad.node_id[:12]}) cannot read {data}: " in message
    assert f"(node {bad.node_id[:12]}) cannot write under {runs}: " in message
    assert re.search("ACCESS_DENIED|SIGNATURE_DOES_NOT_MATCH", message)
    assert good.node_id[:12] not in message  # the node with the credentials is fine
    assert "instance profile" in message and "runtime_env" in message  # what to change
    assert not storage.exists(storage.join(runs, "unreachable"))  # nothing started, no run folder
    assert not storage.exists(storage.join(runs, PROBE_FOLDER, good.node_id))  # the good node's probe object is gone

    nodes.lose(bad)  # the job runs on the nodes that can reach the bucket
    assert check_storage_reach(clip_job(data, runs)) is None


def test_wrong_keys_in_the_jobs_runtime_env_fail_on_every_node(nodes, s3_server):
    data, runs = s3_server.uri("reach-shapes"), s3_server.uri("reach-runs")
    ray.shutdown()  # a driver of a job submitted with wrong keys in its runtime env
    ray.init(address=nodes.address, runtime_env={"env_vars": {"AWS_ACCESS_KEY_ID": "nobody"}})
    try:
        with pytest.raises(ConfigError, match=r"cannot read .*AWS_ACCESS_KEY_ID \.\.\.body from the environment"):
            check_storage_reach(clip_job(data, runs))
    finally:
        ray.shutdown()
        nodes.connect()
