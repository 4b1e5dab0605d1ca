"""The Serve application, for real: one ``serve.run`` of serve/config.yaml on the session's Ray
cluster, with randomly initialised tiny bundles, called over HTTP like any OpenAI client would.

The app starts once for the module (about a minute on 2 cores: 8 replica processes import torch).
The test that kills a replica runs last.
"""

import base64
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from dalle2.bundle import save_bundle
from dalle2.factory import create_model
from dalle2.cascade import GenerationOptions, StageOptions, UnCLIP, text_to_image

API_KEY = "test-key"
ADMIN_KEY = "test-admin-key"
APP = "dalle2"
FAST = {"prior_steps": 2, "decoder_steps": 2, "upsampler_steps": 2, "response_format": "b64_json"}  # a request in ~1 s
FAST_VARIATION = {"decoder_steps": 2, "upsampler_steps": 2, "response_format": "b64_json"}  # variations have no prior stage
TIMEOUT_S = 120  # no request may hang: each one is answered within this


@dataclass
class ServeApp:
    url: str
    bundles: str  # local folder (the in-process pipeline loads it too)
    decoder_uri: str  # s3://
    config: dict


def _test_config(config: dict) -> dict:
    """serve/config.yaml, with the settings these tests check: 2 Decoder replicas; a Prior whose
    batches wait 0.25 s for company (so that concurrent requests surely meet); a last stage that
    serves one request at a time, queues 2 more, and answers 429 with Retry-After: 3 beyond that."""
    for entry in config["applications"][0]["deployments"]:
        if entry["name"] == "Prior":
            entry["user_config"] = {"max_batch_size": 16, "batch_wait_timeout_s": 0.25}
        if entry["name"] == "Decoder":
            entry.pop("autoscaling_config", None)
            entry["num_replicas"] = 2
        if entry["name"] == "Upsampler1024":
            entry.update(max_ongoing_requests=1, max_queued_requests=2, backpressure_config={"status_code": 429, "retry_after_s": 3})
    return config


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def serve_app(ray_cluster, s3_server, tmp_path_factory):
    from ray import serve

    from serve.app import app_from_config, read_serve_config

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    models = {kind: create_model(kind, "tiny").eval() for kind in ("clip", "prior", "decoder", "upsampler_256", "upsampler_1024")}
    for kind, model in models.items():
        save_bundle(model, kind, str(root / "bundles" / kind))
    # The decoder is served from object storage: a bundle named alone overrides the folder's.
    decoder_uri = save_bundle(models["decoder"], "decoder", s3_server.uri("decoder"))
    (root / "keys").write_text(f"{API_KEY}\n")
    (root / "admin-keys").write_text(f"{ADMIN_KEY}\n")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = _test_config(read_serve_config())
    app_args = {"bundles": str(root / "bundles"), "decoder": decoder_uri, "api_keys_file": str(root / "keys"),
                "admin_keys_file": str(root / "admin-keys")}  # fmt: skip
    try:
        serve.run(app_from_config(config, app_args), name=APP, route_prefix="/", blocking=False)
        yield ServeApp(f"http://127.0.0.1:{port}", str(root / "bundles"), decoder_uri, config)
    finally:
        serve.shutdown()


def _post(app, path, key=API_KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(app.url + path, headers=headers, timeout=TIMEOUT_S, **kwargs)


def _generate(app, **fields):
    return _post(app, "/v1/images/generations", json={"prompt": "a red circle", **FAST, **fields})


def _pngs(response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int) and body["created"] > 0
    images = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in body["data"]]
    assert all(image.format == "PNG" for image in images)
    return images


def _png_file(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _picture(width=40, height=40, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)


def _half_transparent_mask(size=40) -> Image.Image:
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[:, size // 2 :, 3] = 255  # left half transparent = repaint, right half kept
    return Image.fromarray(rgba, "RGBA")


def _stages(response) -> list[str]:
    """Server-Timing: the stages that served the request, in order."""
    return list(_timings(response))


# --------------------------------------------------------------------------- what comes back


@pytest.mark.parametrize("size, n", [(32, 1), (64, 2), (128, 3)])
def test_generations_return_pngs_of_the_size_and_count_asked(serve_app, size, n):
    response = _generate(serve_app, n=n, size=f"{size}x{size}")
    images = _pngs(response)
    assert len(images) == n and all(image.size == (size, size) for image in images)
    # The request crossed one deployment per stage, and only the upsamplers the size needs ran.
    expected = ["text_encoder", "prior", "decoder"] + [f"upsampler_{s}" for s in (64, 128) if s <= size]
    assert _stages(response) == expected


def test_same_seed_same_images_as_the_pipeline_in_process(serve_app):
    fields = dict(n=2, size="64x64", seed=7)
    first, again = _pngs(_generate(serve_app, **fields)), _pngs(_generate(serve_app, **fields))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    other = _pngs(_generate(serve_app, **{**fields, "seed": 8}))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    # The served graph threads the seed's generator through the stages as dalle2.cascade does.
    options = GenerationOptions(n=2, seed=7, size=64, prior=StageOptions(2), decoder=StageOptions(2, 3.0), upsampler=StageOptions(2))
    local = text_to_image(UnCLIP.from_bundles(serve_app.bundles), ["a red circle"], options)
    for served, expected in zip(first, local):
        difference = np.abs(np.asarray(served, np.int16) - np.asarray(expected, np.int16))
        assert difference.max() <= 1, difference.max()  # float rounding across processes at most


def _timings(response) -> dict[str, dict]:
    """Server-Timing: stage -> {batch (requests in its batch), forwards (of that batch)}."""
    stages = {}
    for entry in response.headers["Server-Timing"].split(", "):
        name, _, desc = entry.split(";")
        batch, forwards = desc.split('"')[1].split()
        stages[name] = {"batch": int(batch.split("=")[1]), "forwards": int(forwards.split("=")[1])}
    return stages


def test_concurrent_requests_share_forward_passes_and_keep_their_own_noise(serve_app):
    seeds, steps = [11, 12, 13, 14], 6
    with ThreadPoolExecutor(len(seeds)) as pool:
        responses = list(pool.map(lambda s: _generate(serve_app, size="32x32", seed=s, prior_steps=steps), seeds))
    prior = [_timings(response)["prior"] for response in responses]
    # The prior batched the concurrent requests, and a batch of k requests of 6 steps ran 6
    # shared forwards, not 6k.
    assert max(p["batch"] for p in prior) >= 2, prior
    assert all(p["forwards"] == steps for p in prior), prior
    # Batched or alone, a request's images come from its own seed.
    alone = [_pngs(_generate(serve_app, size="32x32", seed=s, prior_steps=steps))[0] for s in seeds]
    for response, single in zip(responses, alone):
        assert np.abs(np.asarray(_pngs(response)[0], np.int16) - np.asarray(single, np.int16)).max() <= 1
    assert len({np.asarray(image).tobytes() for image in alone}) == len(seeds)


def test_bench_serve_compares_the_default_samplers_with_the_old_ones(serve_app):
    from serve.bench_defaults import OLD_DEFAULTS, measure_defaults

    forwards = []  # per request: diffusion stage -> network forwards it ran (Server-Timing)

    def post(extra: dict):
        response = _post(serve_app, "/v1/images/generations", json={"prompt": "a red circle", "size": "64x64", "response_format": "b64_json", **extra})
        timings = _timings(response)
        forwards.append({stage: timings[stage]["forwards"] for stage in ("prior", "decoder", "upsampler_64")})
        return response

    result = measure_defaults(2, post)
    new = GenerationOptions()
    new_forwards = {"prior": new.prior.steps, "decoder": new.decoder.steps, "upsampler_64": new.upsampler.steps}
    old_forwards = {"prior": OLD_DEFAULTS["prior_steps"], "decoder": OLD_DEFAULTS["decoder_steps"], "upsampler_64": OLD_DEFAULTS["upsampler_steps"]}
    # warm-ups (new, old), then the two kinds interleaved, each request with its own steps
    assert forwards == [new_forwards, old_forwards] * 3
    assert result["old_defaults"]["decoder"] == "ddim 25" and result["new_defaults"]["decoder"] == f"{new.decoder.sampler} {new.decoder.steps}"
    assert result["requests_each"] == 2 and result["speedup_p50"] == result["old_p50_s"] / result["new_p50_s"] > 0


def test_variations_of_any_image_shape(serve_app):
    square = _post(serve_app, "/v1/images/variations", files={"image": ("a.png", _png_file(_picture()), "image/png")},
                   data={"n": "2", "size": "64x64", **FAST_VARIATION})  # fmt: skip
    assert [image.size for image in _pngs(square)] == [(64, 64)] * 2
    assert list(_stages(square)) == ["image_encoder", "decoder", "upsampler_64"]
    # Documented handling: a non-square image is center-cropped, not refused.
    wide = _post(serve_app, "/v1/images/variations", files={"image": ("w.png", _png_file(_picture(60, 30, "RGBA")), "image/png")},
                 data={"size": "32x32", **FAST_VARIATION})  # fmt: skip
    assert [image.size for image in _pngs(wide)] == [(32, 32)]


@pytest.mark.parametrize("size", [32, 64])  # 64: upsampled, and the kept pixels restored at 64
def test_edits_keep_the_opaque_part_of_the_mask(serve_app, size):
    image = _picture()
    files = {"image": ("i.png", _png_file(image), "image/png"), "mask": ("m.png", _png_file(_half_transparent_mask()), "image/png")}
    response = _post(serve_app, "/v1/images/edits", files=files, data={"prompt": "a green square", "n": "2", "size": f"{size}x{size}", **FAST})
    results = _pngs(response)
    assert len(results) == 2 and all(result.size == (size, size) for result in results)
    original = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), np.int16)
    half = size // 2
    for result in results:
        pixels = np.asarray(result, np.int16)
        assert np.abs(pixels[:, half:] - original[:, half:]).max() <= 1  # kept
        assert np.abs(pixels[:, :half] - original[:, :half]).mean() > 5  # repainted


def test_url_responses_are_served_by_the_app(serve_app):
    response = _generate(serve_app, n=2, size="32x32", response_format="url")
    default = _post(serve_app, "/v1/images/generations", json={"prompt": "a red circle", "size": "32x32", "prior_steps": 2, "decoder_steps": 2})
    assert default.status_code == 200 and "url" in default.json()["data"][0]  # OpenAI's default
    assert response.status_code == 200, response.text
    urls = [item["url"] for item in response.json()["data"]]
    assert len(urls) == 2 and all(url.startswith(serve_app.url + "/v1/images/files/") for url in urls)
    image = requests.get(urls[0], timeout=TIMEOUT_S)  # a capability URL: no key needed
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    max_age = int(image.headers["Cache-Control"].rsplit("=", 1)[1])  # what is left of the URL's TTL
    assert 3500 < max_age <= 3600
    assert Image.open(io.BytesIO(image.content)).size == (32, 32)
    gone = requests.get(serve_app.url + "/v1/images/files/never-made.png", timeout=TIMEOUT_S)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def test_models_list_only_models_and_the_admin_route_reports_the_live_bundles(serve_app):
    from ray import serve

    response = requests.get(serve_app.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT_S)
    assert response.status_code == 200
    models = response.json()["data"]
    assert [model["id"] for model in models] == ["dalle2", "dall-e-2"]
    assert all(set(model) == {"id", "object", "created", "owned_by", "sizes"} for model in models)  # no internals
    assert models[0]["sizes"] == ["32x32", "64x64", "128x128"]
    for key in (API_KEY, None):  # the API key is not an admin key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        _assert_openai_error(requests.get(serve_app.url + "/admin/stages", headers=headers, timeout=TIMEOUT_S), 401)
    admin = requests.get(serve_app.url + "/admin/stages", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=TIMEOUT_S)
    assert admin.status_code == 200, admin.text
    stages = admin.json()["stages"]
    for stage, kind in [("text_encoder", "clip"), ("prior", "prior"), ("upsampler_128", "upsampler_1024")]:
        bundle = stages[stage]["bundle"]
        assert bundle["kind"] == kind and bundle["uri"] == f"{serve_app.bundles}/{kind}" and len(bundle["fingerprint"]) == 12
    assert stages["decoder"]["bundle"]["uri"] == serve_app.decoder_uri and serve_app.decoder_uri.startswith("s3://")
    assert stages["decoder"]["device"] == "cpu" and stages["decoder"]["batching"]["max_batch_size"] == 16
    # A replica with a fraction of a CPU computes on one thread: 8 replicas on 2 cores do not
    # oversubscribe them.
    assert {stage["torch_threads"] for stage in stages.values()} == {1}, stages
    # Each deployment runs the replicas its config entry asks for.
    deployments = serve.status().applications[APP].deployments
    for entry in serve_app.config["applications"][0]["deployments"]:
        running = deployments[entry["name"]].replica_states.get("RUNNING", 0)
        assert running == entry.get("num_replicas", 1), entry["name"]
    assert requests.get(serve_app.url + "/healthz", timeout=TIMEOUT_S).json() == {"status": "ok"}
    ready = requests.get(serve_app.url + "/readyz", timeout=TIMEOUT_S)
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    assert set(ready.json()["stages"]) == {entry["name"] for entry in serve_app.config["applications"][0]["deployments"]}
    page = requests.get(serve_app.url + "/", timeout=TIMEOUT_S)
    assert page.status_code == 200 and "v1/images/generations" in page.text


# --------------------------------------------------------------------------- bad input

BIG_UPLOAD = b"\x89PNG\r\n\x1a\n" + bytes(4 * 1024 * 1024)  # over 4 MB


def _bad_requests():
    image = ("i.png", _png_file(_picture()), "image/png")
    generations, variations, edits = "/v1/images/generations", "/v1/images/variations", "/v1/images/edits"
    return [
        # (name, path, request kwargs, status, param)
        ("missing prompt", generations, dict(json={"n": 1}), 400, "prompt"),
        ("empty prompt", generations, dict(json={"prompt": ""}), 400, "prompt"),
        ("prompt over 1000 characters", generations, dict(json={"prompt": "a" * 1001}), 400, "prompt"),
        ("n = 0", generations, dict(json={"prompt": "a cat", "n": 0}), 400, "n"),
        ("n = 11", generations, dict(json={"prompt": "a cat", "n": 11}), 400, "n"),
        ("unknown size", generations, dict(json={"prompt": "a cat", "size": "1024x1024"}), 400, "size"),
        ("unknown response_format", generations, dict(json={"prompt": "a cat", "response_format": "jpeg"}), 400, "response_format"),
        ("malformed JSON", generations, dict(data=b'{"prompt": ', headers={"Content-Type": "application/json"}), 400, None),
        ("wrong content type", generations, dict(data={"prompt": "a cat"}), 400, None),
        ("multipart to the JSON endpoint", generations, dict(files={"image": image}), 400, None),
        ("JSON to a multipart endpoint", variations, dict(json={"n": 1}), 400, None),
        ("image that is not an image", variations, dict(files={"image": ("i.png", b"hello", "image/png")}), 400, "image"),
        ("missing image", variations, dict(files={"n": (None, "1")}), 400, "image"),
        ("upload over 4 MB", variations, dict(files={"image": ("i.png", BIG_UPLOAD, "image/png")}), 400, "image"),  # OpenAI: 400
        ("body far over the limit", variations, dict(files={"image": ("i.png", BIG_UPLOAD * 3, "image/png")}), 413, None),
        ("mask of another size", edits, dict(files={"image": image, "mask": ("m.png", _png_file(_half_transparent_mask(20)), "image/png")},
                                              data={"prompt": "a cat"}), 400, "mask"),  # fmt: skip
        ("edit without a prompt", edits, dict(files={"image": image, "mask": ("m.png", _png_file(_half_transparent_mask()), "image/png")}), 400, "prompt"),
    ]


def _assert_openai_error(response, status, param=None):
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert "Traceback" not in response.text and "/work/" not in response.text


def test_every_bad_input_gets_its_status_and_the_openai_error_shape(serve_app):
    for name, path, kwargs, status, param in _bad_requests():
        headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
        response = requests.post(serve_app.url + path, headers=headers, timeout=TIMEOUT_S, **kwargs)
        try:
            _assert_openai_error(response, status, param)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
    assert requests.get(serve_app.url + "/v1/nothing", timeout=TIMEOUT_S).status_code == 404


def test_api_keys_are_required_when_configured(serve_app):
    for key in (None, "wrong-key"):
        response = _post(serve_app, "/v1/images/generations", key=key, json={"prompt": "a cat", **FAST})
        _assert_openai_error(response, 401)
        assert response.json()["error"]["code"] == "invalid_api_key"
    basic = requests.get(serve_app.url + "/v1/models", headers={"Authorization": f"Basic {API_KEY}"}, timeout=TIMEOUT_S)
    _assert_openai_error(basic, 401)


def test_a_full_queue_answers_429_with_retry_after(serve_app):
    # The test config lets Upsampler1024 serve 1 request and queue 2, and a request is checked
    # when it arrives. Once the first of 4 slow 128px requests is done, the other 3 wait there:
    # a newcomer is refused at once.
    slow = dict(size="128x128", upsampler_steps=4)
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(_generate, serve_app, seed=i, **slow) for i in range(4)]
        next(as_completed(futures))
        refused, deadline = None, time.monotonic() + TIMEOUT_S
        while refused is None and time.monotonic() < deadline:
            futures.append(pool.submit(_generate, serve_app, seed=len(futures), **slow))
            try:
                if futures[-1].result(timeout=0.25).status_code == 429:  # refusals come back at once
                    refused = futures[-1].result()
            except TimeoutError:  # admitted: it joins the queue
                pass
        statuses = [future.result().status_code for future in futures]  # every one answered
    assert refused is not None, statuses
    assert set(statuses) <= {200, 429} and statuses[:4] == [200] * 4, statuses
    _assert_openai_error(refused, 429)
    assert refused.headers["Retry-After"] == "3" and refused.json()["error"]["code"] == "rate_limit_exceeded"


# --------------------------------------------------------------------------- failures (last)


def test_a_replica_killed_under_load_is_replaced(serve_app):
    import ray
    from ray import serve

    decoder = serve.get_deployment_handle("Decoder", app_name=APP)
    victim = decoder.describe.remote().result(timeout_s=TIMEOUT_S)["actor_name"]
    with ThreadPoolExecutor(6) as pool:
        in_flight = [pool.submit(_generate, serve_app, size="32x32", seed=i, decoder_steps=30) for i in range(6)]
        time.sleep(1.0)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        responses = [future.result() for future in in_flight]  # each answered: none hangs
    outcomes = [(response.status_code, response.text[:300]) for response in responses]
    for response in responses:  # an image, or a clean 503 for the requests the dead replica held
        if response.status_code != 200:
            assert response.status_code == 503 and "Retry-After" in response.headers, outcomes
            _assert_openai_error(response, 503)
    deadline = time.monotonic() + 2 * TIMEOUT_S  # a new replica imports torch: slow on a busy machine
    while time.monotonic() < deadline:
        replicas = serve.status().applications[APP].deployments["Decoder"].replica_states
        if replicas.get("RUNNING", 0) == 2 and sum(replicas.values()) == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the Decoder did not get back to 2 running replicas: {replicas}")
    names = {decoder.describe.remote().result(timeout_s=TIMEOUT_S)["actor_name"] for _ in range(8)}
    assert victim not in names
    for seed in range(3):
        assert len(_pngs(_generate(serve_app, size="32x32", seed=seed))) == 1
