"""``dalle2 serve --bundles DIR [--port P]``: the Ray Serve app on this machine, in one command.

It starts (or joins, with ``--address``) a Ray cluster, runs the application of serve/config.yaml
(or ``--config``) with the bundles of DIR, and serves until Ctrl-C. Deployments whose bundles DIR
lacks (an upsampler, the prior) are left out. For a cluster, use ``serve deploy`` with the config.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time

SERVE_APP_NAME = "dalle2"


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"cannot serve on {host}:{port}: {error.strerror or error} (choose another --port)") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.app import DEFAULT_CONFIG, app_from_config, bundle_uris, AppArgs, read_serve_config

    from serve.api_keys import load_api_keys, require_keys_or_consent

    config = read_serve_config(args.config or DEFAULT_CONFIG)
    app_args = {"bundles": args.bundles}
    if args.api_keys_file:
        app_args["api_keys_file"] = args.api_keys_file
    if args.insecure_no_auth:
        app_args["allow_unauthenticated"] = True
    # Fail here, before starting Ray, on what can be checked here (the ingress checks keys again).
    merged = AppArgs.model_validate({**(config["applications"][0].get("args") or {}), **app_args})
    bundle_uris(merged)
    require_keys_or_consent(load_api_keys(merged.api_keys_file), args.host, merged.allow_unauthenticated)
    _check_port_free(args.host, args.port)
    http_options = {**(config.get("http_options") or {}), "host": args.host, "port": args.port}

    import ray
    from ray import serve

    # "local": a new cluster of our own, never one another `ray start` left on this machine.
    ray.init(address=args.address or "local", include_dashboard=False)
    try:
        serve.start(http_options=http_options)
        serve.run(app_from_config(config, app_args), name=SERVE_APP_NAME, route_prefix="/", blocking=False)
        print(f"dalle2: serving {args.bundles} at http://{args.host}:{args.port}/ (OpenAI Images API under /v1; Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


def add_serve_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``dalle2 serve`` on the CLI's subcommands."""
    serve = subparsers.add_parser(
        "serve",
        help="serve a cascade of bundles with Ray Serve behind OpenAI's Images API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--bundles", required=True, help="folder (or s3:// prefix) with clip/, prior/, decoder/, upsampler_*/ bundles")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    serve.add_argument("--config", default=None, help="a serve config YAML for replicas and resources (default: serve/config.yaml)")
    serve.add_argument("--api-keys-file", default=None, help="require one of these keys (one per line) as a Bearer token")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="serve without API keys on a non-loopback --host (refused otherwise: keys fail closed)")  # fmt: skip
    serve.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="a running Ray cluster to join, or auto (default: start one)")
    serve.set_defaults(func=cmd_serve)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import json

    from serve.bench import BenchSettings, run, summary

    _check_port_free("127.0.0.1", args.port)
    settings = BenchSettings(
        bundles=args.bundles, port=args.port, size=args.size, prior_steps=args.steps, decoder_steps=args.steps,
        upsampler_steps=args.steps, latency_requests=args.latency_requests, throughput_requests=args.throughput_requests,
        load_requests=args.load_requests, overload_clients=args.overload_clients, overload_limit=args.overload_limit,
        overload_s=args.overload_seconds, runs=tuple(args.runs.split(",")),
    )  # fmt: skip
    # Ray's own messages (raylet warnings) go to stderr with the progress, so stdout is the figures alone.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


def add_serve_benchmark(bench_commands: argparse._SubParsersAction) -> None:
    """Register ``serve`` under the CLI's ``dalle2 bench`` group (``dalle2 bench serve``)."""
    bench = bench_commands.add_parser("serve", help="latency, throughput (batching on/off), load and overload of the served graph")
    bench.add_argument("--bundles", default=None, help="a cascade folder (default: random tiny bundles)")
    bench.add_argument("--port", type=int, default=8123)
    bench.add_argument("--size", type=int, default=64)
    bench.add_argument("--steps", type=int, default=None, help="diffusion steps of every stage (default: each model's own)")
    bench.add_argument("--latency-requests", type=int, default=10)
    bench.add_argument("--throughput-requests", type=int, default=64)
    bench.add_argument("--load-requests", type=int, default=200)
    bench.add_argument("--overload-clients", type=int, default=64)
    bench.add_argument("--overload-limit", type=int, default=8, help="image requests the ingress admits and each stage queues")
    bench.add_argument("--overload-seconds", type=float, default=60.0)
    bench.add_argument(
        "--runs", default="latency,throughput,load,overload,defaults",
        help="which runs, comma-separated (defaults: p50 at the default samplers and steps vs the old DDIM ones)",
    )  # fmt: skip
    bench.add_argument("--json", action="store_true", help="the figures as JSON")
    bench.set_defaults(func=cmd_bench_serve)


if __name__ == "__main__":  # python -m dalle2.serve_cli {serve ..., bench serve ...}
    parser = argparse.ArgumentParser(prog="dalle2")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_commands(commands)
    add_serve_benchmark(commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed) or 0)
