"""The recipes in cluster/ cannot rot silently: every YAML file parses, the KubeRay manifests are
``ray.io/v1`` RayJobs / a RayService, and every entry point, job config, CLI command and Serve
import path they name exists in this repository. The local scripts pass ``bash -n``."""

from __future__ import annotations

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
    assert any(t["node_config"]["InstanceType"].startswith(("g5.", "p4d.")) for t in workers)
    assert all(t["min_workers"] <= t["max_workers"] for t in workers)
    setup = " ".join(config["setup_commands"])
    assert "-c /home/ray/dalle2/constraints.txt" in setup and "-e /home/ray/dalle2" in setup
    assert (REPO / "constraints.txt").is_file()


@pytest.mark.parametrize("script", ["start-local.sh", "stop-local.sh"])
def test_local_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(CLUSTER / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
