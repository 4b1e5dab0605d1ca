"""A GPU job on a cluster that has no GPU node yet, but an autoscaler that can add them.

The fake multi-node autoscaler of Ray's own tests (tests/multinode.py): a head with 1 CPU and no
GPU, and a worker type ``gpu`` (1 CPU, 1 logical GPU, ``min_workers: 0, max_workers: 2``). The
job asks for 2 workers with 1 GPU each: the placement check passes on what the autoscaler can
add (and says so), the autoscaler starts 2 nodes, the job completes (the models on the CPU: CUDA
is absent, the GPUs are logical).
"""

from __future__ import annotations

import pytest

from dalle2.data.shapes import write_shapes_dataset
from dalle2.train.config import ConfigError, load_job_config
from dalle2.train.launch import run_job
from multinode import autoscaling_cluster  # tests/multinode.py (pytest puts tests/ on sys.path)

pytestmark = pytest.mark.slow

GPU_TYPE = {"gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}}


@pytest.fixture(scope="module")
def autoscaling(s3_server):
    with autoscaling_cluster(head_cpus=1, worker_types=GPU_TYPE) as cluster:
        patch = pytest.MonkeyPatch()
        # Where `ray up` leaves the config on the head; here the fake cluster's own file.
        patch.setenv("DALLE2_AUTOSCALING_CONFIG", cluster.config_path)
        try:
            yield cluster
        finally:
            patch.undo()


def gpu_job(data: str, runs: str, workers: int):
    return load_job_config("clip", overrides={
        "data": {"path": data, "validation_fraction": 0.1},
        "run": {"storage": runs, "name": f"autoscaled-{workers}"},
        "loop": {"max_steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 2, "val_batches": 0},
        "scaling": {"workers": workers, "use_gpu": True, "gpus_per_worker": 1.0, "cpus_per_worker": 0.5},
    })  # fmt: skip


def test_a_gpu_job_starts_the_nodes_it_needs(autoscaling, s3_server, capsys):
    data, runs = s3_server.uri("autoscaling-shapes"), s3_server.uri("runs")
    write_shapes_dataset(data, count=64, image_size=32, rows_per_file=32)  # no path shared between nodes
    assert not any(node["Resources"].get("GPU") for node in autoscaling.live_nodes())  # no GPU node yet
    with pytest.raises(ConfigError, match=r"3 workers of 0.5 CPU \+ 1 GPU cannot be placed: .* its autoscaler can add at most \(gpu: .* x 2\)"):
        run_job(gpu_job(data, runs, workers=3))  # more than the node type's max_workers: refused at once

    result = run_job(gpu_job(data, runs, workers=2))
    assert result.metrics["step"] == 2 and result.checkpoint_uri.endswith("checkpoint-00000002")
    out = capsys.readouterr().out
    assert "do not fit the 1 CPU, 0 GPU on 1 node(s) alive now; the autoscaler can add 2 x gpu" in out
    gpu_nodes = [node for node in autoscaling.live_nodes() if node["Resources"].get("GPU")]
    assert len(gpu_nodes) == 2  # the autoscaler added them (idle ones go after idle_timeout_minutes)
