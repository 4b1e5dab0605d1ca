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
from typing import Iterator

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


def _processes_mentioning(marker: str) -> list[int]:
    """Pids of the processes whose command line names ``marker`` (our own temp folder)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(marker in part for part in process.info["cmdline"] or ()):
            found.append(process.info["pid"])
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class AutoscalingNodeCluster:
    """A head started by ``ray start --head --autoscaling-config`` with the fake multi-node
    provider (``RAY_FAKE_CLUSTER=1``): the autoscaler starts and stops worker nodes of the
    ``worker_types`` (``available_node_types`` entries) as the load asks.

    As ``ray.cluster_utils.AutoscalingCluster.start`` does, without its ``ray stop --force``:
    the head gets its own port and temp folder, and :meth:`shutdown` kills the processes whose
    command line names that folder (the head's, and the nodes the autoscaler started, which
    take the head's folder) with their children."""

    def __init__(self, head_cpus: float, worker_types: dict, max_workers: int = 8):
        import ray

        self.temp_dir = tempfile.mkdtemp(prefix="d2as-", dir="/tmp")  # short: unix socket paths
        self.port = _free_port()
        ip = ray._private.services.get_node_ip_address()
        self.address = f"{ip}:{self.port}"
        self.config_path = os.path.join(self.temp_dir, "autoscaling.yaml")
        config = {
            "cluster_name": "dalle2-fake", "max_workers": max_workers, "head_node_type": "ray.head.default",
            "provider": {
                "type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                "disable_launch_config_check": True, "gcs_address": self.address,
            },
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}, **worker_types,
            },
            "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
            "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        }  # fmt: skip
        import yaml

        with open(self.config_path, "w") as file:
            yaml.safe_dump(config, file)
        # `ray start` asks for a token by default (~/.ray/auth_token); this driver, a test of the
        # same user on 127.0.0.1, joins without one, as to conftest's ray.init(address="local").
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled"}
        command = [
            os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", f"--port={self.port}",
            f"--num-cpus={head_cpus:g}", "--num-gpus=0", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
            f"--autoscaling-config={self.config_path}", "--disable-usage-stats",
        ]  # fmt: skip
        try:
            subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=120)
        except BaseException:
            self.shutdown()
            raise

    def live_nodes(self) -> list[dict]:
        import ray

        return [node for node in ray.nodes() if node["Alive"]]

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        kill_tree(_processes_mentioning(self.temp_dir))
        ray._private.services.find_gcs_addresses.cache_clear()


@contextlib.contextmanager
def autoscaling_cluster(head_cpus: float, worker_types: dict) -> Iterator[AutoscalingNodeCluster]:
    """A connected :class:`AutoscalingNodeCluster`, its processes killed by pid at the end."""
    import ray

    with _own_driver():
        cluster = AutoscalingNodeCluster(head_cpus, worker_types)
        try:
            ray.init(address=cluster.address)
            yield cluster
        finally:
            cluster.shutdown()
