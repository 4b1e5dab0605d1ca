"""serve/config.gpu.yaml places the stages on the GPUs it says, tested without GPUs: Ray is
started with 4 logical GPUs, the GPU config is deployed with tiny bundles, and each replica
reports ``ray.get_gpu_ids()`` while its model falls back to the CPU (CUDA is absent).

It needs a Ray cluster with GPUs, which the session's cluster is not, and one process can hold
only one Ray cluster: the deployment runs in a subprocess with a cluster of its own (~1 minute).
"""

import json
import os
import subprocess
import sys
import textwrap

import torch

from dalle2.bundle import save_bundle
from dalle2.factory import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_GROUP = ("TextEncoder", "ImageEncoder", "Prior")  # one GPU, shared by fractions
WHOLE_GPU = ("Decoder", "Upsampler256", "Upsampler1024")

DEPLOY = textwrap.dedent(
    """
    import json, socket, sys
    import ray, requests
    from ray import serve
    from serve.app import app_from_config, read_serve_config

    bundles, config_path = sys.argv[1], sys.argv[2]
    config = read_serve_config(config_path)
    for entry in config["applications"][0]["deployments"]:
        if entry["name"] == "Ingress":
            entry["num_replicas"] = 1  # placement concerns the model stages; one process less to start
    # Logical CPUs: the GPU config asks for more CPUs than this machine has cores.
    ray.init(address="local", num_cpus=16, num_gpus=4, include_dashboard=False)  # never another cluster
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_from_config(config, {"bundles": bundles}), name="dalle2", route_prefix="/")
        placement = {}
        for entry in config["applications"][0]["deployments"]:
            handle = serve.get_deployment_handle(entry["name"], app_name="dalle2")
            if entry["name"] not in ("Ingress", "ImageStore"):
                placement[entry["name"]] = handle.describe.remote().result(timeout_s=120)
        reply = requests.post(f"http://127.0.0.1:{port}/v1/images/generations", timeout=120, json={
            "prompt": "a red circle", "size": "32x32", "prior_steps": 2, "decoder_steps": 2})
        print("RESULT " + json.dumps({"placement": placement, "status": reply.status_code}))
    finally:
        serve.shutdown()
        ray.shutdown()
    """
)


def test_the_gpu_config_places_each_stage_on_its_gpus(tmp_path):
    torch.manual_seed(0)
    for kind in ("clip", "prior", "decoder", "upsampler_256", "upsampler_1024"):
        save_bundle(create_model(kind, "tiny").eval(), kind, str(tmp_path / "bundles" / kind))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a cluster of its own
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", DEPLOY, str(tmp_path / "bundles"), os.path.join(REPO, "serve", "config.gpu.yaml")],
        capture_output=True, text=True, timeout=540, env=env, cwd=REPO,
    )  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    placement = result["placement"]
    gpus = {name: placement[name]["gpu_ids"] for name in TEXT_GROUP + WHOLE_GPU}
    assert all(len(ids) == 1 for ids in gpus.values()), gpus
    text_gpu = {gpus[name][0] for name in TEXT_GROUP}
    assert len(text_gpu) == 1, f"text encoder, image encoder and prior should share one GPU: {gpus}"
    others = [gpus[name][0] for name in WHOLE_GPU]
    assert len(set(others)) == 3 and not text_gpu & set(others), f"decoder and upsamplers each on a GPU of their own: {gpus}"
    if not torch.cuda.is_available():
        assert all(placement[name]["device"] == "cpu" for name in gpus)  # no CUDA: the models run on the CPU
    assert result["status"] == 200  # and the graph still serves
