"""The pipeline's last stage: the bundles behind Ray Serve, asked over HTTP, images into a PNG grid.

Split from :mod:`jobs.stages` (which calls it with its console) so that the orchestration reads
in one sitting.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import urllib.request

from dalle2.data import storage
from dalle2.console import Console


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_port_free(port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise ValueError(
                f"serve.port {port}: 127.0.0.1:{port} is already in use ({error.strerror}); "
                "stop what listens there, choose another port, or 0 for any free one"
            ) from None


def _post_json(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def stage_serve(config, console: Console) -> tuple[str, str]:
    """Serve the bundles with Ray Serve, ask the HTTP API for each prompt, write a PNG grid;
    returns the grid's URI and the URL it was served at."""
    from PIL import Image
    from ray import serve

    from dalle2.images import make_grid, png_bytes
    from dalle2.progress_bars import Bar
    from serve.app import DEFAULT_CONFIG as SERVE_CONFIG
    from serve.app import app_from_config, read_serve_config

    serve_config = read_serve_config(os.path.join(config.base_dir, config.serve.config) if config.serve.config else SERVE_CONFIG)
    port = config.serve.port or _free_port()
    bundles = storage.join(config.workdir, "bundles")
    bundles = bundles if "://" in bundles else os.path.abspath(bundles)  # replicas run elsewhere
    console.header(f"serve: the bundles behind OpenAI's Images API at http://127.0.0.1:{port}/v1/images/generations",
           bundles=bundles, log=console.section("serve"))  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_from_config(serve_config, {"bundles": bundles}), name="dalle2", route_prefix="/", blocking=False)
        images = []
        with Bar(len(config.serve.prompts) * config.serve.n, "serve: generating over HTTP", "img") as bar:
            for prompt in config.serve.prompts:
                reply = _post_json(
                    f"http://127.0.0.1:{port}/v1/images/generations",
                    {"prompt": prompt, "n": config.serve.n, "response_format": "b64_json", "seed": len(images)},
                )
                images += [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB") for item in reply["data"]]
                bar.update(len(reply["data"]))
    finally:
        serve.shutdown()
    storage.write_bytes(config.grid_uri, png_bytes(make_grid(images, columns=config.serve.n)))
    console.say(f"serve: {len(images)} images in {config.grid_uri}")
    return config.grid_uri, f"http://127.0.0.1:{port}"
