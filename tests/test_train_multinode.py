"""Training on several Ray nodes, with nothing shared between them but S3.

One cluster for the module (tests/multinode.py): a head with no CPU (the driver, the Train
controller) and two worker nodes of 2 logical CPUs each, every node its own raylet and object
store. Data, runs, checkpoints and bundles live in s3:// on the SeaweedFS fixture.

- Two workers spread over the two worker nodes train, resume by name and export.
- A worker's node is lost mid-run (raylet and processes SIGKILLed): with ``max_failures: 1`` the
  run goes on from its last complete checkpoint on the node left, reaches ``max_steps``, and its
  metrics.csv has each step once.
- The dropped-rows counters live on the driver's node, which the job cannot outlive.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
from ray import cloudpickle

from dalle2.bundle import load_bundle
from dalle2.data import storage
from dalle2.data.shapes import write_shapes_dataset
from dalle2.train.checkpoint import check_complete, local_files, rank_copy
from dalle2.train.config import deep_merge, load_job_config
from dalle2.train.export import export_run
from dalle2.train.launch import run_job
from dalle2.train.loop import TrainHooks
from dalle2.train.progress import read_metrics
from multinode import node_cluster  # tests/multinode.py (pytest puts tests/ on sys.path)

pytestmark = pytest.mark.slow

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks travel to the workers by value

LOSS_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def nodes(s3_server):
    """Started after the S3 variables are set: every node's workers inherit them."""
    with node_cluster(head={"num_cpus": 0}, workers=[{"num_cpus": 2}, {"num_cpus": 2}]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def s3_shapes(s3_server) -> str:
    uri = s3_server.uri("multinode-shapes")
    write_shapes_dataset(uri, count=160, image_size=32, rows_per_file=80)
    return uri


def clip_job(data: str, runs: str, name: str, **sections):
    overrides = {
        "data": {"path": data, "validation_fraction": 0.1},
        "run": {"storage": runs, "name": name},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 2},
        "loop": {"max_steps": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 4, "val_batches": 0},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5, "placement": "spread"},
    }  # fmt: skip
    return load_job_config("clip", overrides=deep_merge(overrides, sections))


class Recorder(TrainHooks):
    """Writes to S3 (no folder is shared between nodes) where each rank ran, when rank 0 finished
    each step, and, with ``lose_at``, rank 1 announces its node at that step of the first attempt
    and waits there for the test to take the node away."""

    def __init__(self, uri: str, lose_at: int = 0):
        self.uri, self.lose_at = uri, lose_at

    def after_step(self, step: int, rank: int) -> None:
        import ray

        if rank == 0:
            storage.write_bytes(storage.join(self.uri, "steps", f"{step:04d}.json"), json.dumps({"time": time.time()}).encode())
        marker = storage.join(self.uri, "lost.json")
        if step == self.lose_at and rank == 1 and not storage.exists(marker):
            storage.write_bytes(marker, json.dumps({"node_id": ray.get_runtime_context().get_node_id()}).encode())
            time.sleep(LOSS_TIMEOUT_S)  # the node goes before this ends

    def at_end(self, model, rank: int) -> None:
        import ray
        import ray.train

        where = {"node_id": ray.get_runtime_context().get_node_id(), "node_rank": ray.train.get_context().get_node_rank()}
        storage.write_bytes(storage.join(self.uri, "placement", f"rank-{rank}.json"), json.dumps(where).encode())


def read_json(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def test_two_workers_on_two_nodes_train_resume_and_export(nodes, s3_shapes, s3_server):
    runs, probes = s3_server.uri("runs"), s3_server.uri("probes")
    first = run_job(clip_job(s3_shapes, runs, "across"), hooks=Recorder(probes))
    assert first.metrics["step"] == 4 and first.checkpoint_uri == f"{runs}/across/checkpoint-00000004"
    placement = [read_json(storage.join(probes, "placement", f"rank-{rank}.json")) for rank in range(2)]
    worker_nodes = {node.node_id for node in nodes.workers}
    assert {p["node_id"] for p in placement} == worker_nodes  # one worker on each worker node
    # Ray Train numbers nodes by IP address (get_node_rank), and these nodes share 127.0.0.1's
    # machine: the node ids are what tells them apart here.
    assert [p["node_rank"] for p in placement] == [0, 0]

    second = run_job(clip_job(s3_shapes, runs, "across", loop={"max_steps": 6}))  # the same name resumes
    assert second.checkpoint_uri == f"{runs}/across/checkpoint-00000006"
    assert [int(row["step"]) for row in read_metrics(f"{runs}/across/metrics.csv")] == [2, 4, 6]

    # What each rank fetches to resume (the function the loop calls): every file of the checkpoint
    # but the other rank's ZeRO-2 optimizer shard and data position (CLIP keeps no EMA).
    files = check_complete(first.checkpoint_uri)["files"]
    filesystem, path = storage.resolve(first.checkpoint_uri)
    for rank, other in ((0, 1), (1, 0)):
        others = {name for name in files if f"zero_pp_rank_{other}_" in name or f"rank-{other:05d}" in name}
        assert len(others) == 2 and any(name.endswith("optim_states.pt") for name in others), sorted(files)
        lines = []
        with rank_copy(filesystem, path, rank, log=lines.append) as folder:
            fetched = local_files(folder)
        assert set(fetched) == (set(files) - others) | {"manifest.json"}, sorted(fetched)
        assert sum(fetched.values()) - fetched["manifest.json"] == sum(files.values()) - sum(files[name] for name in others)
        assert lines and lines[0].startswith(f"rank {rank}: resume fetched {len(fetched)} files")
        print(f"\n{lines[0]}")

    bundle = load_bundle(export_run(second.run_uri, s3_server.uri("bundles")))
    assert bundle.kind == "clip" and bundle.metadata["step"] == 6


def test_the_dropped_rows_counters_live_on_the_drivers_node(nodes):
    """Not on a worker node that may be lost (the head here has no CPU for them to ask for)."""
    import ray

    from dalle2.data.ray_reader import dropped_rows_counter

    counters = [dropped_rows_counter() for _ in range(8)]
    where = ray.get([counter.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()) for counter in counters])
    assert set(where) == {ray.get_runtime_context().get_node_id()} == {nodes.cluster.head_node.node_id}
    for counter in counters:
        ray.kill(counter)


def take_away_announced_node(nodes, marker: str, lost: dict) -> None:
    """Waits for rank 1's announcement, then kills its node (run in a thread beside run_job)."""
    deadline = time.monotonic() + 10 * LOSS_TIMEOUT_S
    while not storage.exists(marker):
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    node = nodes.node_of(read_json(marker)["node_id"])
    lost["time"] = time.time()
    nodes.lose(node)
    lost["node_id"] = node.node_id


def test_a_lost_node_restarts_the_run_from_its_last_checkpoint(nodes, s3_shapes, s3_server):
    runs, probes = s3_server.uri("runs"), s3_server.uri("probes")
    job = clip_job(s3_shapes, runs, "lost", loop={"max_steps": 12}, run={"max_failures": 1})
    lost: dict = {}
    killer = threading.Thread(target=take_away_announced_node, args=(nodes, storage.join(probes, "lost.json"), lost), daemon=True)
    killer.start()
    # Step 6 is reported, step 7 is where rank 1's node goes: the restart from checkpoint 4 reports 6 again.
    result = run_job(job, hooks=Recorder(probes, lose_at=7))
    killer.join(timeout=LOSS_TIMEOUT_S)
    assert "node_id" in lost and lost["node_id"] not in {node.node_id for node in nodes.workers}
    assert result.metrics["step"] == 12 and result.checkpoint_uri == f"{runs}/lost/checkpoint-00000012"
    assert [int(row["step"]) for row in read_metrics(f"{runs}/lost/metrics.csv")] == [2, 4, 6, 8, 10, 12]
    placement = [read_json(storage.join(probes, "placement", f"rank-{rank}.json")) for rank in range(2)]
    assert all(p["node_id"] != lost["node_id"] for p in placement)  # the run finished on the node left

    step_times = [read_json(uri)["time"] for uri in storage.list_files(storage.join(probes, "steps"), ".json")]
    resumed_after = min(t for t in step_times if t > lost["time"]) - lost["time"]
    print(f"\nnode loss: {resumed_after:.1f} s from the node's loss to the next completed step (restarted from step 4)")
