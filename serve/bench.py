"""``dalle2 bench serve``: the served graph measured against itself and against the pipeline
in-process, in one run on this machine (a benchmark, not a test: nothing here asserts).

    latency     one request at a time over HTTP vs ``text_to_image`` called in one process (a Ray
                worker, so with a replica's CPU priority and threads), same bundles, steps and
                seed; p50 of each (target: HTTP at most 1.10x in-process)
    throughput  images/s with 16 concurrent clients, batching on (serve/config.yaml) vs off (each
                model replica takes one request at a time); target: on at least 2x off
    ceiling     the decoder's forward time per image at batch 1 vs batch ``clients``, in one process:
                the most that sharing forward passes can give on this machine (on a CPU a forward is
                compute-bound already at batch 1, so it stays near 1x; on a GPU it is many x)
    load        200 requests from 32 concurrent clients: each answered with images or a clean
                429/503, none lost or hung, every replica alive afterwards
    overload    64 clients against a queue limit of 8 (the ingress admits 8 image requests, every
                stage queues at most 8): every request ends 200, or 503/429 with Retry-After (the
                client then waits that long), within its deadline; none hangs; ``/healthz`` is
                probed every 50 ms meanwhile (target: p99 under 100 ms)

The app runs on a local Ray cluster that this command starts, with the given bundles or, without
``--bundles``, randomly initialised tiny ones (speed does not depend on the weights). Every model
deployment has one replica in both throughput runs, so only batching differs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

APP = "dalle2-bench"
MODEL_DEPLOYMENTS = ("TextEncoder", "ImageEncoder", "Prior", "Decoder", "Upsampler256", "Upsampler1024")


@dataclass(frozen=True)
class BenchSettings:
    bundles: Optional[str] = None
    port: int = 8123
    size: int = 64
    prior_steps: Optional[int] = None  # None: the API's default (dalle2.cascade.GenerationOptions)
    decoder_steps: Optional[int] = None
    upsampler_steps: Optional[int] = None
    latency_requests: int = 10
    clients: int = 16
    throughput_requests: int = 64
    load_requests: int = 200
    load_clients: int = 32
    overload_clients: int = 64
    overload_limit: int = 8
    overload_s: float = 60.0
    runs: tuple[str, ...] = ("latency", "throughput", "load", "overload", "defaults")
    timeout_s: float = 300.0

    def body(self, seed: int) -> dict[str, Any]:
        steps = {"prior_steps": self.prior_steps, "decoder_steps": self.decoder_steps, "upsampler_steps": self.upsampler_steps}
        body = {"prompt": "a red circle at the top left", "n": 1, "size": f"{self.size}x{self.size}", "seed": seed,
                "response_format": "b64_json"}  # fmt: skip
        return {**body, **{name: value for name, value in steps.items() if value is not None}}


def write_tiny_bundles(folder: str) -> str:
    import torch

    from dalle2.bundle import save_bundle
    from dalle2.factory import create_model

    torch.manual_seed(0)
    for kind in ("clip", "prior", "decoder", "upsampler_256", "upsampler_1024"):
        save_bundle(create_model(kind, "tiny").eval(), kind, os.path.join(folder, kind))
    return folder


def batching_ceiling(bundles: str, clients: int, repeats: int = 5) -> dict[str, Any]:
    """Seconds per image of one guided decoder forward at batch 1 and at batch ``clients``
    (classifier-free guidance doubles the rows of both), and their ratio."""
    import torch

    from dalle2.bundle import load_bundle

    decoder = load_bundle(os.path.join(bundles, "decoder")).model.eval()
    config = decoder.config

    def seconds_per_image(batch: int) -> float:
        rows = 2 * batch
        inputs = {
            "image_embed": torch.randn(rows, config.embed_dim),
            "text_tokens": torch.randint(1, 1000, (rows, config.text.context_length)),
            "drop_image_embed": torch.arange(rows) >= batch, "drop_text": torch.arange(rows) >= batch,
        }  # fmt: skip
        x, t = torch.randn(rows, 3, config.image_size, config.image_size), torch.full((rows,), 500)
        with torch.inference_mode():
            decoder(x, t, **inputs)  # warm-up
            started = time.perf_counter()
            for _ in range(repeats):
                decoder(x, t, **inputs)
        return (time.perf_counter() - started) / repeats / batch

    alone, shared = seconds_per_image(1), seconds_per_image(clients)
    return {"per_image_batch_1_s": alone, f"per_image_batch_{clients}_s": shared, "ratio": alone / shared}


def _deployment_options(config: dict, batching: bool) -> dict:
    """serve/config.yaml's settings, one replica per model stage; without batching each model
    replica takes one request at a time and no batch waits for company."""
    config = copy.deepcopy(config)
    for entry in config["applications"][0]["deployments"]:
        if entry["name"] in MODEL_DEPLOYMENTS:
            entry.pop("autoscaling_config", None)
            entry["num_replicas"] = 1
            entry["max_queued_requests"] = -1  # measure speed here, not refusals
            if not batching:
                entry["max_ongoing_requests"] = 1
                entry["user_config"] = {**entry.get("user_config", {}), "batch_wait_timeout_s": 0.0}
    return config


def _deploy(config: dict, bundles: str, **args: Any) -> None:
    from ray import serve

    from serve.app import app_from_config

    serve.run(app_from_config(config, {"bundles": bundles, **args}), name=APP, route_prefix="/", blocking=False)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _post(settings: BenchSettings, seed: int, extra: Optional[dict] = None):
    import requests

    body = {**settings.body(seed), **(extra or {})}
    return requests.post(f"http://127.0.0.1:{settings.port}/v1/images/generations", json=body, timeout=settings.timeout_s)


def in_process_times(settings: BenchSettings, bundles: str) -> list[float]:
    """Seconds of ``text_to_image`` calls in this process (the baseline of the latency figure)."""
    import torch

    from dalle2.cascade import GenerationOptions, StageOptions, UnCLIP, text_to_image

    torch.set_num_threads(1)  # as a replica with a fraction of a CPU (Ray: OMP_NUM_THREADS=1)
    pipe = UnCLIP.from_bundles(bundles)
    defaults = GenerationOptions()  # what the HTTP API uses for the fields the body leaves out

    def stage(default: StageOptions, steps) -> StageOptions:
        return dataclasses.replace(default, steps=default.steps if steps is None else steps)

    options = GenerationOptions(
        n=1, seed=0, size=settings.size, prior=stage(defaults.prior, settings.prior_steps),
        decoder=stage(defaults.decoder, settings.decoder_steps), upsampler=stage(defaults.upsampler, settings.upsampler_steps),
    )  # fmt: skip
    prompt = settings.body(0)["prompt"]
    text_to_image(pipe, [prompt], options)  # warm-up
    times = []
    for _ in range(settings.latency_requests):
        start = time.perf_counter()
        text_to_image(pipe, [prompt], options)
        times.append(time.perf_counter() - start)
    return times


def measure_latency(settings: BenchSettings, bundles: str) -> dict[str, Any]:
    import ray

    # The baseline runs in a Ray worker process too: Ray starts workers with a lower CPU priority
    # (niceness 15) than this driver, which on a busy machine alone would make replicas look slow.
    local = ray.get(ray.remote(num_cpus=0.25)(in_process_times).remote(settings, bundles))
    _post(settings, 0).raise_for_status()  # warm-up
    served, in_stages = [], []
    for _ in range(settings.latency_requests):
        start = time.perf_counter()
        response = _post(settings, 0)
        served.append(time.perf_counter() - start)
        response.raise_for_status()
        # Server-Timing: each stage's time inside its replica; the rest is HTTP, hops, PNG encoding.
        in_stages.append(sum(float(part.split("dur=")[1].split(";")[0]) for part in response.headers["Server-Timing"].split(", ")) / 1000)
    p50_local, p50_http = statistics.median(local), statistics.median(served)
    return {
        "in_process_p50_s": p50_local, "http_p50_s": p50_http, "http_p95_s": percentile(served, 0.95),
        "http_time_in_stages_p50_s": statistics.median(in_stages), "ratio": p50_http / p50_local,
    }  # fmt: skip


def _hammer(settings: BenchSettings, requests_total: int, clients: int, on_response: Callable) -> float:
    """``requests_total`` requests from ``clients`` threads as fast as answers come; wall seconds."""
    counter = iter(range(requests_total))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                seed = next(counter, None)
            if seed is None:
                return
            try:
                on_response(_post(settings, seed))
            except Exception as error:  # a timeout or a dropped connection: a lost request
                on_response(error)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return time.perf_counter() - start


def measure_throughput(settings: BenchSettings) -> dict[str, Any]:
    images, failures = [0], [0]
    lock = threading.Lock()

    def count(response) -> None:
        ok = not isinstance(response, Exception) and response.status_code == 200
        with lock:
            if ok:
                images[0] += len(response.json()["data"])
            else:
                failures[0] += 1

    wall = _hammer(settings, settings.throughput_requests, settings.clients, count)
    return {"images_per_s": images[0] / wall, "requests": settings.throughput_requests, "failed": failures[0], "wall_s": wall}


def measure_load(settings: BenchSettings) -> dict[str, Any]:
    import requests
    from ray import serve

    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def count(response) -> None:
        if isinstance(response, Exception):
            key = f"lost ({type(response).__name__})"
        elif response.status_code == 200 and response.json().get("data"):
            key = "200 image"
        elif response.status_code in (429, 503) and "error" in response.json() and "Retry-After" in response.headers:
            key = f"{response.status_code} clean"
        else:
            key = f"{response.status_code} other"
        with lock:
            outcomes[key] = outcomes.get(key, 0) + 1

    wall = _hammer(settings, settings.load_requests, settings.load_clients, count)
    deployments = serve.status().applications[APP].deployments
    unhealthy = {name: str(d.status) for name, d in deployments.items() if str(d.status).split(".")[-1] != "HEALTHY"}
    health = requests.get(f"http://127.0.0.1:{settings.port}/healthz", timeout=30).status_code
    answered = sum(n for key, n in outcomes.items() if key in ("200 image", "429 clean", "503 clean"))
    return {
        "requests": settings.load_requests, "clients": settings.load_clients, "outcomes": outcomes, "wall_s": wall,
        "all_answered_cleanly": answered == settings.load_requests, "unhealthy_deployments": unhealthy, "healthz": health,
    }  # fmt: skip


def _overload_options(config: dict, limit: int) -> dict:
    """The shipped config with every model stage queueing at most ``limit`` requests."""
    config = copy.deepcopy(config)
    for entry in config["applications"][0]["deployments"]:
        if entry["name"] in MODEL_DEPLOYMENTS:
            entry["max_queued_requests"] = limit
    return config


def measure_overload(settings: BenchSettings, deadline_s: float) -> dict[str, Any]:
    """``overload_clients`` clients for ``overload_s`` seconds against a queue limit of
    ``overload_limit``, and a ``/healthz`` probe every 50 ms meanwhile."""
    import requests

    outcomes: dict[str, int] = {}
    slowest, healthz, lock, stop = [0.0], [], threading.Lock(), threading.Event()
    seeds = iter(range(10**9))

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            with lock:
                seed = next(seeds)
            started = time.perf_counter()
            try:
                response = session.post(f"http://127.0.0.1:{settings.port}/v1/images/generations", json=settings.body(seed), timeout=settings.timeout_s)
                retry = response.headers.get("Retry-After")
                if response.status_code == 200:
                    key = "200 image"
                elif response.status_code in (429, 503) and retry and "error" in response.json():
                    key = f"{response.status_code} with Retry-After"
                else:
                    key = f"{response.status_code} other"
            except Exception as error:  # a hang cut by the client's timeout, a dropped connection
                key, retry = f"lost ({type(error).__name__})", None
            elapsed = time.perf_counter() - started
            with lock:
                outcomes[key] = outcomes.get(key, 0) + 1
                slowest[0] = max(slowest[0], elapsed)
            if retry:
                stop.wait(float(retry))  # as a well-behaved client: come back when told

    def probe(into: list, until: threading.Event) -> None:
        while not until.is_set():
            started = time.perf_counter()
            try:
                ok = requests.get(f"http://127.0.0.1:{settings.port}/healthz", timeout=30).status_code == 200
            except Exception:
                ok = False
            into.append(time.perf_counter() - started if ok else float("inf"))
            until.wait(0.05)

    # The baseline: /healthz on the same app, same machine, just before the overload, no load.
    idle, idle_done = [], threading.Event()
    threading.Timer(min(15.0, settings.overload_s), idle_done.set).start()
    probe(idle, idle_done)
    with ThreadPoolExecutor(settings.overload_clients + 1) as pool:
        futures = [pool.submit(client) for _ in range(settings.overload_clients)] + [pool.submit(probe, healthz, stop)]
        time.sleep(settings.overload_s)
        stop.set()
        for future in futures:
            future.result()
    total = sum(outcomes.values())
    clean = sum(n for key, n in outcomes.items() if key == "200 image" or key.endswith("with Retry-After"))
    return {
        "clients": settings.overload_clients, "queue_limit": settings.overload_limit, "seconds": settings.overload_s,
        "requests": total, "outcomes": outcomes, "all_clean": clean == total, "slowest_request_s": slowest[0],
        # the ingress answers at the deadline; the answer then needs its HTTP trip back (1 s allowed)
        "deadline_s": deadline_s, "within_deadline": slowest[0] <= deadline_s + 1.0,
        "healthz_idle_p50_ms": 1000 * percentile(idle, 0.5), "healthz_idle_p99_ms": 1000 * percentile(idle, 0.99),
        "healthz_probes": len(healthz), "healthz_p50_ms": 1000 * percentile(healthz, 0.5),
        "healthz_p99_ms": 1000 * percentile(healthz, 0.99), "healthz_max_ms": 1000 * max(healthz),
    }  # fmt: skip


def run(settings: BenchSettings, progress: Callable[[str], None] = print) -> dict[str, Any]:
    import ray
    import torch
    from ray import serve

    from serve.app import read_serve_config

    with tempfile.TemporaryDirectory(prefix="dalle2-bench-") as scratch:
        bundles = settings.bundles or write_tiny_bundles(os.path.join(scratch, "bundles"))
        config = read_serve_config()
        result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}, "settings": settings.__dict__}
        # Our own cluster (never another one on this machine), its workers' logs kept out of the figures.
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={**(config.get("http_options") or {}), "host": "127.0.0.1", "port": settings.port})
            if "latency" in settings.runs or "throughput" in settings.runs:
                progress("starting the app (batching on)...")
                _deploy(_deployment_options(config, batching=True), bundles)
            if "latency" in settings.runs:
                progress("latency: HTTP vs in-process...")
                result["latency"] = measure_latency(settings, bundles)
            if "throughput" in settings.runs:
                progress("decoder forward per image, batch 1 vs batched (the ceiling of batching here)...")
                ceiling = batching_ceiling(bundles, settings.clients)
                progress(f"throughput, batching on ({settings.clients} clients)...")
                batched = measure_throughput(settings)
                progress("redeploying with batching off...")
                _deploy(_deployment_options(config, batching=False), bundles)
                unbatched = measure_throughput(settings)
                speedup = batched["images_per_s"] / max(unbatched["images_per_s"], 1e-9)
                result["throughput"] = {"batching_on": batched, "batching_off": unbatched, "speedup": speedup, "ceiling": ceiling}
            if "defaults" in settings.runs:
                from serve.bench_defaults import measure_defaults

                progress(f"defaults: {settings.latency_requests} requests at the new defaults and at the old, interleaved...")
                _deploy(config, bundles)
                result["defaults"] = measure_defaults(settings.latency_requests, lambda extra: _post(settings, 0, extra))
            if "load" in settings.runs:
                progress(f"load: {settings.load_requests} requests from {settings.load_clients} clients (shipped config)...")
                _deploy(config, bundles)
                result["load"] = measure_load(settings)
            if "overload" in settings.runs:
                from serve.app import AppArgs

                progress(f"overload: {settings.overload_clients} clients, queue limit {settings.overload_limit}, {settings.overload_s:.0f} s...")
                _deploy(_overload_options(config, settings.overload_limit), bundles, max_image_requests=settings.overload_limit)
                args = AppArgs.model_validate({**(config["applications"][0].get("args") or {}), "bundles": bundles})
                steps = _request_steps(settings, bundles)
                result["overload"] = measure_overload(settings, args.ingress_settings().deadline.deadline_s(steps))
        finally:
            serve.shutdown()
            ray.shutdown()
    return result


def _request_steps(settings: BenchSettings, bundles: str) -> int:
    """The diffusion steps one bench request runs (its deadline is sized from them)."""
    from serve.app import AppArgs, bundle_uris, cascade_sizes, default_steps

    uris = bundle_uris(AppArgs(bundles=bundles))
    _, upsamplers = cascade_sizes(uris)
    defaults = default_steps(uris, upsamplers)
    steps = (settings.prior_steps or defaults["prior"]) + (settings.decoder_steps or defaults["decoder"])
    return steps + sum(settings.upsampler_steps or defaults[f"upsampler_{size}"] for _, size in upsamplers if size <= settings.size)


def summary(result: dict[str, Any]) -> str:
    lines = []
    if "latency" in result:
        latency = result["latency"]
        lines.append(
            f"latency     in-process p50 {latency['in_process_p50_s'] * 1000:.0f} ms, HTTP p50 {latency['http_p50_s'] * 1000:.0f} ms"
            f" (p95 {latency['http_p95_s'] * 1000:.0f} ms, of which in the stages {latency['http_time_in_stages_p50_s'] * 1000:.0f} ms):"
            f" {latency['ratio']:.2f}x (target <= 1.10x)"
        )
    if "throughput" in result:
        throughput = result["throughput"]
        lines += [
            f"throughput  batching on {throughput['batching_on']['images_per_s']:.2f} images/s, off "
            f"{throughput['batching_off']['images_per_s']:.2f} images/s: {throughput['speedup']:.2f}x (target >= 2x)",
            f"ceiling     decoder forward per image, batch 1 vs {result['settings']['clients']}: {throughput['ceiling']['ratio']:.2f}x"
            " (the most that sharing forward passes can give on this machine)",
        ]
    if "defaults" in result:
        from serve.bench_defaults import summary_line

        lines.append(summary_line(result["defaults"]))
    if "load" in result:
        load = result["load"]
        lines.append(
            f"load        {load['requests']} requests / {load['clients']} clients in {load['wall_s']:.0f} s: {load['outcomes']};"
            f" all answered cleanly: {load['all_answered_cleanly']}; unhealthy after: {load['unhealthy_deployments'] or 'none'}"
        )
    if "overload" in result:
        over = result["overload"]
        lines.append(
            f"overload    {over['clients']} clients, queue limit {over['queue_limit']}, {over['seconds']:.0f} s: {over['requests']} requests"
            f" {over['outcomes']}; all clean: {over['all_clean']}; slowest {over['slowest_request_s']:.1f} s (deadline"
            f" {over['deadline_s']:.0f} s); /healthz p50 {over['healthz_p50_ms']:.0f} ms, p99 {over['healthz_p99_ms']:.0f} ms,"
            f" max {over['healthz_max_ms']:.0f} ms over {over['healthz_probes']} probes (target p99 < 100 ms; idle just before:"
            f" p50 {over['healthz_idle_p50_ms']:.0f} ms, p99 {over['healthz_idle_p99_ms']:.0f} ms)"
        )
    return "\n".join(lines)

