"""The README's cluster flow, for real: `cluster/start-local.sh` (`ray start --head`, token
authentication on), a training stage sent with `ray job submit --working-dir .` reading and
writing `s3://` with the credentials in the job's runtime environment, its export, and
`serve deploy` of a serve config whose bundles live in `s3://`, called over HTTP.

The head is this test's own (its own ports and state folder), stopped by
`cluster/stop-local.sh`, which ends only the processes the start script recorded.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests
import torch
import yaml
from PIL import Image

from dalle2.bundle import load_bundle, save_bundle
from dalle2.data import storage
from dalle2.data.shapes import write_shapes_dataset
from dalle2.factory import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE_TIMEOUT_S = 300


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def _read_env_file(path: str) -> dict[str, str]:
    """The `export NAME=value  # comment` lines of the env.sh that start-local.sh writes."""
    values = {}
    with open(path) as lines:
        for line in lines:
            if line.startswith("export "):
                name, _, value = line[len("export ") :].split("#")[0].strip().partition("=")
                values[name] = value
    return values


@pytest.fixture(scope="module")
def local_head(tmp_path_factory, s3_server):
    state = str(tmp_path_factory.mktemp("local-cluster"))
    ray_port, dashboard_port, agent_port, client_port = _free_ports(4)
    settings = {
        "DALLE2_LOCAL_DIR": state, "S3_STORE": "none", "RAY_NUM_CPUS": "2", "RAY_NUM_GPUS": "0",
        "RAY_PORT": str(ray_port), "RAY_DASHBOARD_PORT": str(dashboard_port), "RAY_AGENT_PORT": str(agent_port),
        "RAY_START_FLAGS": f"--ray-client-server-port={client_port}",
    }  # fmt: skip
    env = {**os.environ, **settings}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(["bash", "cluster/start-local.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        client = _read_env_file(os.path.join(state, "env.sh"))
        assert client["RAY_AUTH_MODE"] == "token"
        yield {**env, **client, **s3_server.env}
    finally:
        stopped = subprocess.run(["bash", "cluster/stop-local.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def _runtime_env(env: dict[str, str]) -> str:
    """Credentials (and the shared DeepSpeed op cache) reach the workers through the runtime environment."""
    passed = {name: value for name, value in env.items() if name.startswith("AWS_")}
    for name in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        if name in env:
            passed[name] = env[name]
    return json.dumps({"env_vars": passed})


def test_ray_job_submit_trains_from_s3_into_s3(local_head, s3_server, tmp_path):
    data = s3_server.uri("cluster-shapes")
    runs = s3_server.uri("cluster-runs")
    write_shapes_dataset(data, count=48, image_size=64, rows_per_file=24)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    submitted = subprocess.run(
        [ray, "job", "submit", "--working-dir", ".", "--runtime-env-json", _runtime_env(local_head), "--",
         "python", "-m", "jobs.train_upsampler", "--config", "jobs/configs/upsampler-tiny-cpu.yaml",
         "--data", data, "--storage", runs, "--name", "up", "--workers", "2", "--zero", "2", "--max-steps", "2"],
        cwd=REPO, env=local_head, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    assert "succeeded" in submitted.stdout + submitted.stderr
    run = storage.join(runs, "up")
    checkpoints = [uri for uri in storage.list_files(run) if "/checkpoint-" in uri]
    assert checkpoints, f"no checkpoint under {run}"

    exported = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "dalle2"), "export", run, str(tmp_path / "upsampler")],
        cwd=REPO, env=local_head, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    bundle = load_bundle(str(tmp_path / "upsampler"))
    assert bundle.kind == "upsampler_256" and bundle.metadata["step"] == 2


def _serve_config(bundles: str, port: int, env: dict[str, str]) -> dict:
    """serve/config.yaml for a cascade of clip, prior and decoder in s3:// (the upsampler
    deployments removed, as its comments say), credentials in the app's runtime environment."""
    with open(os.path.join(REPO, "serve", "config.yaml")) as file:
        config = yaml.safe_load(file)
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["bundles"] = bundles
    app["runtime_env"] = json.loads(_runtime_env(env))
    app["deployments"] = [entry for entry in app["deployments"] if not entry["name"].startswith("Upsampler")]
    return config


def test_serve_deploy_answers_over_http(local_head, s3_server, tmp_path):
    bundles = s3_server.uri("cluster-bundles")
    torch.manual_seed(0)
    for kind in ("clip", "prior", "decoder"):
        save_bundle(create_model(kind, "tiny").eval(), kind, storage.join(bundles, kind))
    (port,) = _free_ports(1)
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(_serve_config(bundles, port, local_head)))
    serve = os.path.join(os.path.dirname(sys.executable), "serve")
    deployed = subprocess.run([serve, "deploy", str(config_path)], cwd=REPO, env=local_head, capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    body = {"prompt": "a red circle", "n": 2, "size": "32x32", "prior_steps": 2, "decoder_steps": 2, "seed": 1,
            "response_format": "b64_json"}
    deadline, last = time.monotonic() + SERVE_TIMEOUT_S, None
    while time.monotonic() < deadline:  # the replicas import torch and load the bundles first
        try:
            last = requests.post(f"http://127.0.0.1:{port}/v1/images/generations", json=body, timeout=120)
            if last.status_code == 200:
                break
        except requests.ConnectionError as error:
            last = error
        time.sleep(2)
    assert isinstance(last, requests.Response) and last.status_code == 200, f"no answer from the deployed app: {last}"
    images = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in last.json()["data"]]
    assert [image.size for image in images] == [(32, 32), (32, 32)]
    status = subprocess.run([serve, "status"], cwd=REPO, env=local_head, capture_output=True, text=True, timeout=60)
    assert "RUNNING" in status.stdout, status.stdout + status.stderr

