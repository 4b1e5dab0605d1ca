"""The recipes in cluster/ cannot rot silently: every YAML file parses, the KubeRay manifests are
``ray.io/v1`` RayJobs / a RayService, and every entry point, job config, CLI command and Serve
import path they name exists in this repository. The local scripts pass ``bash -n``."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/home/ray/dalle2/"  # where cluster/Dockerfile puts the checkout
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
KUBERAY_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))
TRAINING_STAGES = ("clip", "prior", "decoder", "upsampler")

JOB_MODULE = re.compile(r"python -m (jobs\.[A-Za-z_][\w.]*)")
JOB_CONFIG = re.compile(r"((?:/home/ray/dalle2/)?jobs/configs/[\w.-]+\.ya?ml)")


def documents(path: Path) -> list:
    with open(path) as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def kuberay_resources() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in KUBERAY_FILES for doc in documents(path)]


def texts() -> dict[Path, str]:
    return {path: path.read_text() for path in [*YAML_FILES, CLUSTER / "README.md", CLUSTER / "start-local.sh"]}


def test_every_yaml_file_parses():
    assert YAML_FILES, "cluster/ holds no YAML files"
    for path in YAML_FILES:
        assert documents(path), f"{path.relative_to(REPO)} is empty"


def test_kuberay_manifests_are_v1_rayjobs_and_a_rayservice():
    resources = kuberay_resources()
    for path, doc in resources:
        assert doc.get("apiVersion") == "ray.io/v1", f"{path.name}: apiVersion {doc.get('apiVersion')!r}"
        assert doc.get("kind") in ("RayJob", "RayService"), f"{path.name}: kind {doc.get('kind')!r}"
    entrypoints = {doc["spec"]["entrypoint"] for _, doc in resources if doc["kind"] == "RayJob"}
    for stage in TRAINING_STAGES:
        assert any(f"python -m jobs.train_{stage} " in e for e in entrypoints), f"no RayJob trains the {stage}"
    assert any("python -m jobs.embed " in e for e in entrypoints), "no RayJob computes the embeddings"
    assert [doc["kind"] for _, doc in resources].count("RayService") == 1
    for path, doc in resources:  # a failed RayJob is retried on a new cluster, resuming by --name
        if doc["kind"] == "RayJob" and "jobs.train_" in doc["spec"]["entrypoint"]:
            assert doc["spec"].get("backoffLimit", 0) >= 1, f"{path.name}: no backoffLimit"


def cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for path, doc in kuberay_resources():
        key = "rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"
        specs.append((path.name, doc["spec"][key]))
    return specs


def test_every_kuberay_cluster_has_a_gpu_group_and_gets_s3_credentials_from_a_secret():
    for name, spec in cluster_specs():
        groups = spec["workerGroupSpecs"]
        gpu_limits = [
            container["resources"]["limits"].get("nvidia.com/gpu")
            for group in groups
            for container in group["template"]["spec"]["containers"]
        ]
        assert any(gpu_limits), f"{name}: no worker group with GPUs"
        pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in groups)]
        for pod in pods:
            for container in pod["containers"]:
                secrets = [source["secretRef"]["name"] for source in container.get("envFrom", [])]
                assert "dalle2-s3" in secrets, f"{name}: container {container['name']} lacks the S3 Secret"
                if name == "rayservice.yaml":  # the public endpoint's keys, from a Secret (fail closed)
                    assert "dalle2-api-keys" in secrets, f"{name}: container {container['name']} lacks the API key Secret"
                env = {item["name"] for item in container.get("env", [])}
                assert not any(var.startswith("AWS_") for var in env), f"{name}: credentials written into the manifest"
        for group in groups:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}: {group['groupName']}"


def test_the_rayservice_serves_the_gpu_serve_config():
    (service,) = [doc for _, doc in kuberay_resources() if doc["kind"] == "RayService"]
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    gpu_config = documents(REPO / "serve" / "config.gpu.yaml")[0]
    assert served["applications"] == gpu_config["applications"], (
        "cluster/kuberay/rayservice.yaml serveConfigV2 differs from serve/config.gpu.yaml: copy its applications section"
    )


def test_serve_import_paths_exist():
    import_paths = set()
    for path, doc in kuberay_resources():
        if doc["kind"] == "RayService":
            import_paths |= {app["import_path"] for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]}
    assert import_paths
    for import_path in import_paths:
        module, attribute = import_path.split(":")
        source = REPO / (module.replace(".", "/") + ".py")
        assert source.is_file(), f"{import_path}: no {source.relative_to(REPO)}"
        assert re.search(rf"^(def|class) {attribute}\b|^{attribute}\s*=", source.read_text(), re.M), import_path


def test_every_job_module_and_config_named_exists():
    modules, configs = set(), set()
    for path, text in texts().items():
        modules |= set(JOB_MODULE.findall(text))
        configs |= {m.removeprefix(IMAGE_ROOT) for m in JOB_CONFIG.findall(text)}
    assert {f"jobs.train_{stage}" for stage in TRAINING_STAGES} | {"jobs.embed"} <= modules
    for module in sorted(modules):
        assert importlib.util.find_spec(module) is not None, f"{module} is named in cluster/ but does not exist"
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
    assert configs
    for config in sorted(configs):
        assert (REPO / config).is_file(), f"{config} is named in cluster/ but does not exist"


def test_every_dalle2_command_in_the_manifests_parses():
    from dalle2.cli import build_parser

    parser = build_parser()
    commands = []
    for _, doc in kuberay_resources():
        if doc["kind"] == "RayJob":
            for part in doc["spec"]["entrypoint"].split("&&"):
                words = shlex.split(part)
                if words[0] == "dalle2":
                    commands.append(words[1:])
    assert commands
    for words in commands:
        try:
            parser.parse_args(words)
        except SystemExit:
            pytest.fail(f"`dalle2 {' '.join(words)}` (cluster/kuberay) is not a dalle2 command")


def test_the_launcher_installs_this_project_with_its_constraints():
    (config,) = documents(CLUSTER / "ray-cluster.yaml")
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert "GPU" not in head["resources"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g5.", "p4de.")) for t in workers)
    assert all(t["min_workers"] <= t["max_workers"] for t in workers)
    setup = " ".join(config["setup_commands"])
    assert "-c /home/ray/dalle2/constraints.txt" in setup and "-e /home/ray/dalle2" in setup
    assert (REPO / "constraints.txt").is_file()


@pytest.mark.parametrize("script", ["start-local.sh", "stop-local.sh"])
def test_local_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(CLUSTER / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- resources fit the machines


def kube_quantity(value) -> float:
    """A Kubernetes CPU quantity ("8", "500m") in CPUs."""
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def pod_resources(group: dict, is_head: bool) -> dict:
    """What Ray sees on a pod of ``group``: its CPU and GPU limits, unless rayStartParams override."""
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    params = group.get("rayStartParams") or {}
    cpu = float(params.get("num-cpus", kube_quantity(limits["cpu"])))
    gpu = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return {"CPU": cpu, "GPU": gpu} if not is_head or gpu else {"CPU": cpu}


def kuberay_capacity(spec: dict):
    """(nodes alive when the job starts, node types the autoscaler adds) of a KubeRay cluster spec."""
    from dalle2.train.capacity import NodeType

    nodes = [{"Resources": pod_resources(spec["headGroupSpec"], is_head=True)}]
    types = []
    for group in spec["workerGroupSpecs"]:
        resources = pod_resources(group, is_head=False)
        nodes += [{"Resources": resources}] * group["replicas"]
        if group["maxReplicas"] > group["replicas"]:
            types.append(NodeType(group["groupName"], resources, group["maxReplicas"] - group["replicas"]))
    return nodes, types


def ray_up_capacity():
    """(the head, node types) of cluster/ray-cluster.yaml: only the head is alive at first."""
    from dalle2.train.capacity import node_types_from_config

    (config,) = documents(CLUSTER / "ray-cluster.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    return [{"Resources": head["resources"]}], node_types_from_config(config)


def assert_placed(scaling, data_cpus: float, nodes, types, where: str) -> None:
    from dalle2.train.launch import check_placement

    note = check_placement(scaling, data_cpus, nodes, types)  # raises ConfigError when it cannot
    assert note is None or "trusting" not in note, f"{where}: resources not declared, nothing checked ({note})"


def test_every_rayjob_fits_the_pods_it_starts():
    from dalle2.data.embed import EmbedConfig
    from dalle2.train.cli import add_job_arguments, job_overrides
    from dalle2.train.config import ScalingSpec, load_job_config
    from jobs.embed import build_parser as embed_parser

    checked = 0
    for path, doc in kuberay_resources():
        if doc["kind"] != "RayJob":
            continue
        nodes, types = kuberay_capacity(doc["spec"]["rayClusterSpec"])
        words = shlex.split(doc["spec"]["entrypoint"].split("&&")[0])
        module = words[2]
        if module == "jobs.embed":  # a pool of CLIP actors, one GPU each (--accelerator gpu)
            args = embed_parser().parse_args(words[3:])
            assert args.accelerator == "gpu", f"{path.name}: embeddings on CPUs in a GPU cluster"
            cpus = EmbedConfig.__dataclass_fields__["cpus_per_task"].default
            scaling = ScalingSpec(workers=args.actors, cpus_per_worker=cpus, use_gpu=True, gpus_per_worker=1.0, backend="nccl")
            assert_placed(scaling, cpus, nodes, types, path.name)
        else:
            parser = argparse.ArgumentParser()
            add_job_arguments(parser)
            args = parser.parse_args(words[3:])
            job = load_job_config(module.removeprefix("jobs.train_"), str(REPO / args.config.removeprefix(IMAGE_ROOT)), job_overrides(args))
            assert job.scaling.use_gpu, f"{path.name}: a GPU cluster for a CPU job"
            assert_placed(job.scaling, job.data.cpus_per_task, nodes, types, path.name)
        checked += 1
    assert checked == len(TRAINING_STAGES) + 1


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "jobs" / "configs").glob("*-gpu.yaml")))
def test_every_gpu_job_config_fits_the_ray_up_node_types(config):
    from dalle2.train.config import load_job_config

    job = load_job_config(config.split("-")[0], str(REPO / "jobs" / "configs" / config))
    nodes, types = ray_up_capacity()
    assert_placed(job.scaling, job.data.cpus_per_task, nodes, types, f"cluster/ray-cluster.yaml for {config}")


def serve_replicas(application: dict) -> list[tuple[str, dict, int, int]]:
    """(deployment, {CPU, GPU} per replica, most replicas, most per node) of a serve application."""
    replicas = []
    for entry in application["deployments"]:
        most = (entry.get("autoscaling_config") or {}).get("max_replicas", entry.get("num_replicas", 1))
        options = entry.get("ray_actor_options") or {}
        need = {"CPU": float(options.get("num_cpus", 1)), "GPU": float(options.get("num_gpus", 0))}
        replicas.append((entry["name"], need, most, entry.get("max_replicas_per_node") or most))
    return replicas


def pack(replicas, machines: list[dict]) -> dict[str, list[int]]:
    """Place every replica (first fit, the most GPU first) on ``machines`` ({CPU, GPU} each, used
    up as they fill), at most ``per_node`` of a deployment on one machine. A packing found proves
    the replicas fit; returns {deployment: [machine index per replica]}."""
    free = [dict(machine) for machine in machines]
    placed: dict[str, list[int]] = {}
    for name, need, count, per_node in sorted(replicas, key=lambda r: (-r[1]["GPU"], -r[1]["CPU"])):
        for _ in range(count):
            spot = next(
                (i for i, room in enumerate(free)
                 if placed.get(name, []).count(i) < per_node and all(room.get(k, 0) + 1e-9 >= v for k, v in need.items())),
                None,
            )  # fmt: skip
            assert spot is not None, f"no machine left for a replica of {name} ({need}); placed so far: {placed}"
            for key, value in need.items():
                free[spot][key] = free[spot].get(key, 0) - value
            placed.setdefault(name, []).append(spot)
    return placed


def test_serve_stages_that_scale_out_spread_over_nodes():
    application = documents(REPO / "serve" / "config.gpu.yaml")[0]["applications"][0]
    for name, _, most, per_node in serve_replicas(application):
        if most > 1:
            assert per_node == 1, f"serve/config.gpu.yaml: {name} may run {most} replicas but {per_node} on one node"


def test_the_gpu_serve_config_at_its_largest_fits_the_rayservice_pods_and_the_ray_up_nodes():
    application = documents(REPO / "serve" / "config.gpu.yaml")[0]["applications"][0]
    replicas = serve_replicas(application)
    (service,) = [doc for _, doc in kuberay_resources() if doc["kind"] == "RayService"]
    spec = service["spec"]["rayClusterConfig"]
    pods = [pod_resources(spec["headGroupSpec"], is_head=True)]
    pods += [pod_resources(g, is_head=False) for g in spec["workerGroupSpecs"] for _ in range(g["maxReplicas"])]
    placed = pack(replicas, pods)
    assert len(set(placed["Decoder"])) == len(placed["Decoder"]) == 2  # on two pods

    (config,) = documents(CLUSTER / "ray-cluster.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    nodes = [head["resources"]]
    for node_type in ray_up_capacity()[1]:
        nodes += [node_type.resources] * node_type.max_count
    pack(replicas, nodes)


def test_ray_up_workers_reach_s3_through_an_instance_profile_not_keys():
    (config,) = documents(CLUSTER / "ray-cluster.yaml")
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"]:  # the head gets Ray's ray-autoscaler-v1 profile
            assert node_type["node_config"].get("IamInstanceProfile"), f"ray-cluster.yaml: {name} has no S3 credentials"
    text = (CLUSTER / "ray-cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{12}|aws_secret_access_key\s*[:=]", text, re.I), "keys written into ray-cluster.yaml"
    assert "dalle2-worker" in (CLUSTER / "README.md").read_text()  # how to create the profile
