"""What keeps the public endpoint trustworthy, tested without a cluster: safe uploads, keys that
fail closed, rate limits, admission, deadlines, health checks that see a wedged batch, the
thread-safe image store with honest TTLs, and OpenAI's parameter parity."""

import asyncio
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from dalle2.images import InvalidInput, open_image
from dalle2.cascade import DEFAULT_PRIOR, DEFAULT_UPSAMPLER
from serve.admission import Admission, DeadlinePolicy, RateLimiter
from serve.api_keys import ADMIN_KEYS_ENV, API_KEYS_ENV, KeyConfigError, load_api_keys, require_keys_or_consent
from serve.health import StageHealth, Unhealthy
from serve.http_errors import ApiError
from serve.image_requests import ImageRequest, ServedSizes, Upload, parse_generation, parse_variation
from serve.image_store import ImageStoreCore
from serve.ingress import Stages, _finish_images
from serve.lockstep import RequestCancelled, run_in_lockstep
from serve.messages import Pixels


def _encoded(format: str, size=(24, 24), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format=format)
    return buffer.getvalue()


# --------------------------------------------------------------------------- uploads


@pytest.mark.parametrize("format, mode", [("EPS", "RGB"), ("TIFF", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("ICO", "RGBA")])
def test_uploads_of_other_formats_are_refused_before_any_decoder_runs(format, mode):
    data = _encoded(format, mode=mode)
    with pytest.raises(ApiError) as error:
        parse_variation({"image": Upload("x", "image/png", data)}, ServedSizes((32, 64), 32))
    assert (error.value.status, error.value.param) == (400, "image") and "PNG" in error.value.message


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_are_accepted(format):
    assert open_image(_encoded(format)).size == (24, 24)


def test_a_huge_image_is_refused_from_its_header():
    data = _encoded("PNG", size=(4097, 1), mode="L")  # tiny file, too wide
    with pytest.raises(InvalidInput, match="4097x1"):
        open_image(data)


# --------------------------------------------------------------------------- keys


def test_an_empty_key_source_refuses_to_start(tmp_path):
    for text in ("", "\n\n", "# only a comment\n   # another\n"):
        (tmp_path / "keys").write_text(text)
        with pytest.raises(KeyConfigError, match="holds no key"):
            load_api_keys(str(tmp_path / "keys"), {})
    with pytest.raises(KeyConfigError, match="holds no key"):
        load_api_keys(None, {API_KEYS_ENV: " , "})
    assert load_api_keys(None, {ADMIN_KEYS_ENV: "admin"}, env_name=ADMIN_KEYS_ENV) == {"admin"}
    assert load_api_keys(None, {}) == frozenset()  # nothing configured is not an error by itself...


def test_no_keys_on_a_public_address_refuses_to_start_unless_asked_for():
    for host in ("0.0.0.0", "10.1.2.3", "example.com", None):  # ...on a public address, it is
        with pytest.raises(KeyConfigError, match="open to anyone"):
            require_keys_or_consent(frozenset(), host, allow_unauthenticated=False)
        require_keys_or_consent(frozenset(), host, allow_unauthenticated=True)
        require_keys_or_consent(frozenset({"k"}), host, allow_unauthenticated=False)
    for host in ("127.0.0.1", "::1", "localhost"):
        require_keys_or_consent(frozenset(), host, allow_unauthenticated=False)


def test_dalle2_serve_refuses_a_public_host_without_keys_before_starting_ray(tmp_path):
    import argparse

    from dalle2.bundle import save_bundle
    from dalle2.factory import create_model
    from dalle2.serve_cli import add_serve_commands

    torch.manual_seed(0)
    for kind in ("clip", "decoder"):
        save_bundle(create_model(kind, "tiny"), kind, str(tmp_path / "bundles" / kind))
    (tmp_path / "empty-keys").write_text("# no keys yet\n")
    parser = argparse.ArgumentParser(prog="dalle2")
    add_serve_commands(parser.add_subparsers(dest="command", required=True))
    bundles = ["serve", "--bundles", str(tmp_path / "bundles"), "--port", "1"]
    for argv, match in [
        (bundles + ["--host", "0.0.0.0"], "open to anyone"),
        (bundles + ["--api-keys-file", str(tmp_path / "empty-keys")], "holds no key"),
    ]:
        args = parser.parse_args(argv)
        with pytest.raises(ValueError, match=match):
            args.func(args)


# --------------------------------------------------------------------------- limits and deadlines


def test_the_rate_limit_is_a_token_bucket_per_key():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(ApiError) as error:
        limiter.take("a")
    assert error.value.status == 429 and error.value.headers == {"Retry-After": "1"} and error.value.code == "rate_limit_exceeded"
    limiter.take("b")  # another key has its own bucket
    now[0] = 1.0  # one token back a second
    limiter.take("a")
    with pytest.raises(ApiError):
        limiter.take("a")


def test_admission_refuses_beyond_its_limit_at_once():
    admission = Admission(limit=2, retry_after_s=2)
    admission.enter(), admission.enter()
    with pytest.raises(ApiError) as error:
        admission.enter()
    assert error.value.status == 503 and error.value.headers == {"Retry-After": "2"}
    admission.leave()
    admission.enter()


def test_deadlines_are_sized_from_the_steps_a_request_runs():
    policy = DeadlinePolicy(base_s=10, per_step_s=0.5, max_s=100)
    assert policy.deadline_s(20) == 20 and policy.deadline_s(10_000) == 100
    assert DeadlinePolicy(fixed_s=3).deadline_s(10_000) == 3
    stages = Stages(None, None, object(), None, [(64, None), (128, None)], None, 32, 32,
                    {"prior": 32, "decoder": 25, "upsampler_64": 27, "upsampler_128": 15})  # fmt: skip
    served = ServedSizes((32, 64, 128), 32)
    request = parse_generation(json.dumps({"prompt": "x", "size": "64x64", "decoder_steps": 5}).encode(), "application/json", served)
    # the request's own decoder steps, the served defaults of the others; the 128 upsampler does not run
    assert stages.steps_of(request) == DEFAULT_PRIOR.steps + 5 + DEFAULT_UPSAMPLER.steps


# --------------------------------------------------------------------------- OpenAI parity


def test_openai_parameters_of_dall_e_2():
    served = ServedSizes((64, 256, 1024), 224)
    assert served.sizes == [64, 256, 512, 1024] and served.run_to(512) == 1024 and served.run_to(256) == 256

    def parse(**fields):
        return parse_generation(json.dumps({"prompt": "a cat", **fields}).encode(), "application/json", served)

    assert parse().response_format == "url" and parse(quality="standard").options.size == 1024
    assert parse(size="512x512").options.size == 512
    for field, value in [("quality", "hd"), ("style", "vivid"), ("size", "1792x1024")]:
        with pytest.raises(ApiError) as error:
            parse(**{field: value})
        assert (error.value.status, error.value.param) == (400, field)


def test_512_is_the_1024_image_brought_down():
    request = ImageRequest("generation", options=parse_generation(b'{"prompt": "x", "size": "512x512"}', "application/json",
                                                                   ServedSizes((64, 256, 1024), 224)).options, response_format="url")  # fmt: skip
    pngs = _finish_images(request, Pixels(torch.zeros(2, 3, 1024, 1024), torch.zeros(1)), 64)
    assert [Image.open(io.BytesIO(png)).size for png in pngs] == [(512, 512)] * 2


# --------------------------------------------------------------------------- health


def test_a_wedged_lockstep_batch_fails_the_health_check():
    release, now = threading.Event(), [0.0]
    health = StageHealth(probe=lambda: None, stall_s=30, clock=lambda: now[0])  # a clock the test moves

    def network(x, t):
        return x

    def sample(shared, item):
        if item == "wedged":
            release.wait(30)  # never calls its forward: the round cannot complete
        for _ in range(3):
            shared(torch.zeros(1), torch.zeros(1))
        return item

    async def scenario():
        health.batch_started()
        batch = asyncio.ensure_future(run_in_lockstep(network, ["ok", "wedged"], sample, on_forward=health.forward_done))
        await asyncio.sleep(0.2)
        now[0] = 20.0
        await health.check()  # still within the stall budget
        now[0] = 31.0  # no forward ran meanwhile: the round waits for the wedged loop
        with pytest.raises(Unhealthy, match="wedged"):
            await health.check()
        release.set()
        results, _ = await batch
        health.batch_ended()
        return results

    assert asyncio.run(scenario()) == ["ok", "wedged"]


def test_an_idle_replica_probes_its_model_within_a_budget():
    async def check(probe):
        health = StageHealth(probe=probe, probe_every_s=0.0, probe_budget_s=0.3)
        await asyncio.sleep(0.01)
        await health.check()

    asyncio.run(check(lambda: None))
    with pytest.raises(Unhealthy, match="longer than"):
        asyncio.run(check(lambda: time.sleep(1.0)))
    with pytest.raises(Unhealthy, match="failed"):
        asyncio.run(check(lambda: 1 / 0))


def test_a_cancelled_request_leaves_its_batch_and_the_others_finish():
    cancelled = {"b"}

    def sample(shared, item):
        for _ in range(3):
            shared(torch.zeros(1), torch.zeros(1))
        return item

    results, _ = asyncio.run(run_in_lockstep(lambda x, t: x, ["a", "b", "c"], sample, cancelled=lambda item: item in cancelled))
    assert results[0] == "a" and isinstance(results[1], RequestCancelled) and results[2] == "c"


# --------------------------------------------------------------------------- image store


def test_concurrent_image_store_puts_and_gets_never_raise():
    store = ImageStoreCore(ttl_s=60, max_megabytes=0.05)  # small: eviction runs all the time
    png = bytes(1000)

    def work(i):
        tokens = store.put([png, png])
        for token in tokens:
            status, data, _ = store.get(token)
            assert status in ("ok", "gone") and (data == png) == (status == "ok")
        return len(tokens)

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(work, range(2000))) == 4000
    stats = store.stats()
    assert stats["bytes"] == stats["images"] * 1000 <= 0.05 * 1024 * 1024


def test_image_urls_live_their_ttl_or_answer_gone():
    now = [0.0]
    store = ImageStoreCore(ttl_s=100, max_megabytes=1, clock=lambda: now[0])
    (token,) = store.put([b"png"])
    now[0] = 40
    assert store.get(token) == ("ok", b"png", 60)  # Cache-Control: what is left of the TTL
    now[0] = 100
    assert store.get(token)[0] == "gone"
    assert store.get("never-made")[0] == "missing"
    (first,) = store.put([bytes(700_000)])
    store.put([bytes(700_000)])  # no room for both: the oldest goes, and says so
    assert store.get(first)[0] == "gone" and store.stats()["dropped_early"] == 1


# --------------------------------------------------------------------------- the shipped configs


@pytest.mark.parametrize("name", ["config.yaml", "config.gpu.yaml"])
def test_the_shipped_configs_bound_every_queue_and_time(name):
    import os

    from serve.app import AppArgs, read_serve_config

    config = read_serve_config(os.path.join(os.path.dirname(__file__), "..", "serve", name))
    application = config["applications"][0]
    for entry in application["deployments"]:
        assert entry.get("max_queued_requests", -1) > 0, f"{name}: {entry['name']} queues without bound"
    args = AppArgs.model_validate({**application["args"], "bundles": None}).ingress_settings()
    # The proxy's cut comes after the longest deadline, so the ingress answers first (504, OpenAI's shape).
    assert config["http_options"]["request_timeout_s"] > args.deadline.max_s
    ingress = next(entry for entry in application["deployments"] if entry["name"] == "Ingress")
    assert ingress["max_ongoing_requests"] >= 2 * args.max_image_requests  # room for /healthz beside the image requests
    assert "api_keys_file" not in application["args"] and not args.allow_unauthenticated  # keys from the environment
