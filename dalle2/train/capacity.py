"""What an autoscaler can add to a cluster: its node types, their resources and most nodes.

A cluster started by ``ray up`` (cluster/ray-cluster.yaml) or KubeRay may have no GPU node alive
when a job is submitted (``min_workers: 0``): the placement check (dalle2.train.launch) then
counts what the autoscaler could start, not only the nodes alive. Where that comes from, first
found wins:

1. the cluster config that the autoscaler reported to the GCS (KubeRay, autoscaler v2);
2. the autoscaling config file: ``DALLE2_AUTOSCALING_CONFIG``, else ``~/ray_bootstrap_config.yaml``
   (what ``ray up`` leaves on the head, where ``ray job submit`` drivers run).

No source: no autoscaler, the live nodes are all there is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import yaml

CONFIG_ENV = "DALLE2_AUTOSCALING_CONFIG"
RAY_UP_CONFIG = "~/ray_bootstrap_config.yaml"
UNLIMITED = -1


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict  # {"CPU": 48, "GPU": 4, ...}; empty: detected when the node starts (unknown here)
    max_count: int  # most nodes of this type the autoscaler starts; UNLIMITED = -1


def node_types_from_config(config: dict) -> list[NodeType]:
    """The worker node types of an autoscaling config (``ray up`` YAML): ``available_node_types``
    minus the head's, each capped by its ``max_workers`` and the cluster's."""
    cluster_max = int(config.get("max_workers", UNLIMITED))
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        count = int(spec.get("max_workers", cluster_max))
        if cluster_max != UNLIMITED:
            count = min(count, cluster_max) if count != UNLIMITED else cluster_max
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items() if k != "object_store_memory"}
        if count != 0:
            types.append(NodeType(name, resources, count))
    return types


def _from_gcs() -> Optional[list[NodeType]]:
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS, or none connected: fall back to the file
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        NodeType(group.name, {k: float(v) for k, v in group.resources.items()}, int(group.max_count))
        for group in config.node_group_configs
        if group.max_count == UNLIMITED or group.max_count > group.min_count  # types that can grow
    ]


def autoscaler_node_types() -> Optional[list[NodeType]]:
    """The node types the autoscaler of the connected cluster can add, or None without one."""
    reported = _from_gcs()
    if reported:
        return reported
    path = os.path.expanduser(os.environ.get(CONFIG_ENV) or RAY_UP_CONFIG)
    if not os.path.exists(path):
        return None
    with open(path) as file:
        types = node_types_from_config(yaml.safe_load(file) or {})
    return types or None
