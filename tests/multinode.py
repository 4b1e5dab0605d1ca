"""Several Ray nodes on this one machine, made with Ray's own test means, stopped by process id.

:class:`NodeCluster` wraps ``ray.cluster_utils.Cluster``: a head and worker nodes, each a real
raylet with its own resources (logical GPUs allowed), that the driver joins. :meth:`lose` takes a
node away as a machine would go: its raylet, object store and every worker process on it are
killed at once (SIGKILL), nothing is told first.

:class:`AutoscalingNodeCluster` wraps ``ray.cluster_utils.AutoscalingCluster`` (the fake
multi-node provider, ``RAY_FAKE_CLUSTER=1``, that Ray's own autoscaler tests use).

Ray's helpers end with ``ray stop --force``, which stops every Ray process of the machine, other
test runs' included: these wrappers end only the processes they started (and their children),
by pid. Both disconnect a driver that another fixture connected (``ray_cluster``) and start a
local Ray like it again when they stop, so later test modules find what they expect.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Optional

import psutil

KILL_WAIT_S = 10


def _tree(pids: list[int]) -> list[psutil.Process]:
    """The processes ``pids`` and all their descendants that are still alive."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            found[pid] = process
            for child in process.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def kill_tree(pids: list[int]) -> None:
    """SIGKILL ``pids`` and their descendants together, and reap them."""
    processes = _tree(pids)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=KILL_WAIT_S)


def _node_pids(node) -> list[int]:
    """Pids of the processes a ``ray._private.node.Node`` started (raylet, GCS, reaper...)."""
    return [info.process.pid for infos in node.all_processes.values() for info in infos if info.process is not None]


@contextlib.contextmanager
def _own_driver() -> Iterator[bool]:
    """Leave a connected driver (the session's local Ray) for the block; start it again after."""
    import ray

    was_connected = ray.is_initialized()
    if was_connected:
        ray.shutdown()
    try:
        yield was_connected
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if was_connected:  # as conftest.ray_cluster starts it
            ray.init(address="local", num_cpus=2, include_dashboard=False)


class NodeCluster:
    """A head and worker nodes (``ray.cluster_utils.Cluster``) that the driver joins.

    ``head`` and each entry of ``workers`` are ``add_node`` arguments: ``num_cpus``,
    ``num_gpus``, ``resources``..."""

    def __init__(self, head: dict, workers: list[dict]):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **head})
        self.workers = [self.cluster.add_node(**node) for node in workers]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def connect(self) -> None:
        import ray

        ray.init(address=self.address)

    def node_of(self, node_id: str):
        return next(node for node in self.workers if node.node_id == node_id)

    def add(self, **node):
        added = self.cluster.add_node(**node)
        self.workers.append(added)
        return added

    def lose(self, node) -> None:
        """The node's machine is gone: its raylet and every process under it die at once."""
        kill_tree(_node_pids(node))
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)  # bookkeeping: its processes are dead already

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for node in list(self.workers):
            self.lose(node)
        head = self.cluster.head_node
        if head is not None:
            kill_tree(_node_pids(head))
            self.cluster.remove_node(head, allow_graceful=False)
        # What Cluster.shutdown resets besides, without deleting the machine's ray address file
        # (another cluster on this machine may have written it).
        ray.experimental.internal_kv._internal_kv_reset()
        ray._private.services.find_gcs_addresses.cache_clear()


@contextlib.contextmanager
def node_cluster(head: dict, workers: list[dict]) -> Iterator[NodeCluster]:
    """A connected :class:`NodeCluster`, stopped by pid at the end."""
    with _own_driver():
        cluster = NodeCluster(head, workers)
        try:
            cluster.connect()
            yield cluster
        finally:
            cluster.shutdown()
