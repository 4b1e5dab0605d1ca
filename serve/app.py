"""The application: which bundles, which deployments, how they are bound together.

    serve run serve/config.yaml            # import_path: serve.app:build_app, with args
    serve deploy serve/config.yaml         # the same file, on a running cluster
    DALLE2_BUNDLES=/abs/bundles serve build serve.app:app -o my-config.yaml
    dalle2 serve --bundles runs/bundles    # quick local start (serve/config.yaml's settings)

``build_app(args)`` is the builder Serve calls with the config's ``args``:

    bundles: a folder (local or s3://) whose subfolders are bundles (clip, prior, decoder,
             upsamplers), as ``dalle2 export`` writes them and ``UnCLIP.from_bundles`` reads
    clip / prior / decoder / upsampler_256 / upsampler_1024: one bundle each, overriding the folder
    api_keys_file, allow_unauthenticated, admin_keys_file: see serve.api_keys (keys fail closed)
    url_ttl_s, url_store_megabytes: see serve.image_store
    deadline_s (fixed) or deadline_base_s + deadline_per_step_s x steps (at most deadline_max_s),
    body_timeout_s, max_image_requests, rate_limit_per_minute, rate_limit_burst: see serve.admission

Deployment names (what a config's ``deployments:`` list refers to): Ingress, TextEncoder,
ImageEncoder, Prior, Decoder, Upsampler256, Upsampler1024, ImageStore; the upsamplers and the
prior exist only when their bundles do. Each deployment's replicas, resources, queue limits and
batching come from the config (Serve applies the ``deployments:`` entries); the defaults in code
are a laptop's.

Local paths are read where the builder runs (a Ray worker): give absolute paths or ``s3://``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from dalle2.bundle import read_bundle_header
from dalle2.clip import open_clip_dims
from dalle2.data.storage import list_files, relative_path
from serve.diffusion_stages import Decoder, Prior, Upsampler
from serve.encoders import ImageEncoder, TextEncoder
from serve.image_store import ImageStore
from serve.admission import DeadlinePolicy
from serve.ingress import Ingress, IngressSettings, Stages

BUNDLES_ENV = "DALLE2_BUNDLES"  # for `serve.app:app` (serve build / serve run without a config)
BUNDLE_KINDS = ("clip", "prior", "decoder", "upsampler_256", "upsampler_1024")
UPSAMPLER_DEPLOYMENTS = {"upsampler_256": "Upsampler256", "upsampler_1024": "Upsampler1024"}
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "config.yaml")


class AppArgs(BaseModel):
    """The ``args`` of the serve config's application (unknown keys are an error)."""

    model_config = ConfigDict(extra="forbid")

    bundles: Optional[str] = None
    clip: Optional[str] = None
    prior: Optional[str] = None
    decoder: Optional[str] = None
    upsampler_256: Optional[str] = None
    upsampler_1024: Optional[str] = None
    api_keys_file: Optional[str] = None
    allow_unauthenticated: bool = False
    admin_keys_file: Optional[str] = None
    url_ttl_s: float = 3600.0
    url_store_megabytes: float = 256.0
    deadline_s: Optional[float] = None
    deadline_base_s: float = DeadlinePolicy.base_s
    deadline_per_step_s: float = DeadlinePolicy.per_step_s
    deadline_max_s: float = DeadlinePolicy.max_s
    body_timeout_s: float = IngressSettings.body_timeout_s
    max_image_requests: int = IngressSettings.max_image_requests
    retry_after_s: float = IngressSettings.retry_after_s
    rate_limit_per_minute: Optional[float] = None
    rate_limit_burst: int = IngressSettings.rate_limit_burst

    def ingress_settings(self) -> IngressSettings:
        return IngressSettings(
            api_keys_file=self.api_keys_file and _absolute(self.api_keys_file),
            allow_unauthenticated=self.allow_unauthenticated,
            admin_keys_file=self.admin_keys_file and _absolute(self.admin_keys_file),
            deadline=DeadlinePolicy(self.deadline_s, self.deadline_base_s, self.deadline_per_step_s, self.deadline_max_s),
            body_timeout_s=self.body_timeout_s,
            max_image_requests=self.max_image_requests,
            retry_after_s=self.retry_after_s,
            rate_limit_per_minute=self.rate_limit_per_minute,
            rate_limit_burst=self.rate_limit_burst,
        )


def _absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def discover_bundles(folder: str) -> dict[str, str]:
    """{kind: uri} of the bundles directly below ``folder``."""
    found: dict[str, str] = {}
    for config_file in list_files(folder, "/config.json"):
        if relative_path(folder, config_file).count("/") != 1:
            continue
        uri = config_file.rsplit("/", 1)[0]
        kind = read_bundle_header(uri)["kind"]
        if kind in found:
            raise ValueError(f"{folder}: two {kind} bundles ({found[kind]} and {uri}); name one in the config")
        found[kind] = uri
    return found


def bundle_uris(args: AppArgs) -> dict[str, str]:
    uris = discover_bundles(_absolute(args.bundles)) if args.bundles else {}
    uris.update({kind: _absolute(getattr(args, kind)) for kind in BUNDLE_KINDS if getattr(args, kind)})
    missing = [kind for kind in ("clip", "decoder") if kind not in uris]
    if missing:
        where = f"in {args.bundles}" if args.bundles else "(set 'bundles' or each bundle in the config's args)"
        raise ValueError(f"no {' or '.join(missing)} bundle {where}: a cascade needs clip and decoder")
    return uris


def cascade_sizes(uris: dict[str, str]) -> tuple[int, list[tuple[str, int]]]:
    """The decoder's size and the (kind, output size) of each upsampler, checked to chain."""
    size = read_bundle_header(uris["decoder"])["config"]["image_size"]
    base, upsamplers = size, []
    for kind in ("upsampler_256", "upsampler_1024"):
        if kind not in uris:
            continue
        config = read_bundle_header(uris[kind])["config"]
        if config["low_res"] != size:
            raise ValueError(f"{uris[kind]}: upsampler {config['low_res']}->{config['image_size']} does not follow a {size}px stage")
        size = config["image_size"]
        upsamplers.append((kind, size))
    return base, upsamplers


def default_steps(uris: dict[str, str], upsamplers: list[tuple[str, int]]) -> dict[str, int]:
    """Each diffusion stage's own sampling steps (a request's deadline is sized from them)."""
    steps = {kind: read_bundle_header(uris[kind])["config"]["diffusion"]["sample_steps"] for kind in ("prior", "decoder") if kind in uris}
    steps.update({f"upsampler_{size}": read_bundle_header(uris[kind])["config"]["diffusion"]["sample_steps"] for kind, size in upsamplers})
    return steps


def clip_input_size(uri: str) -> int:
    config = read_bundle_header(uri)["config"]
    return int(config.get("image_size") or open_clip_dims(config["model_name"])["image_size"])


def build_graph(args: AppArgs | dict[str, Any], deployment_options: Optional[dict[str, dict]] = None) -> Application:
    """The bound application; ``deployment_options`` ({deployment name: Deployment.options kwargs})
    is what a config file's ``deployments:`` list says, for callers that run it with serve.run."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    options = dict(deployment_options or {})
    uris = bundle_uris(args)
    base_size, upsamplers = cascade_sizes(uris)

    def bind(deployment, name: str, *init_args):
        return deployment.options(name=name, **options.pop(name, {})).bind(*init_args)

    stages = Stages(
        text_encoder=bind(TextEncoder, "TextEncoder", uris["clip"]),
        image_encoder=bind(ImageEncoder, "ImageEncoder", uris["clip"]),
        prior=bind(Prior, "Prior", uris["prior"]) if "prior" in uris else None,
        decoder=bind(Decoder, "Decoder", uris["decoder"]),
        upsamplers=[(size, bind(Upsampler, UPSAMPLER_DEPLOYMENTS[kind], uris[kind])) for kind, size in upsamplers],
        image_store=bind(ImageStore, "ImageStore", args.url_ttl_s, args.url_store_megabytes),
        base_size=base_size,
        clip_input_size=clip_input_size(uris["clip"]),
        default_steps=default_steps(uris, upsamplers),
    )
    app = bind(Ingress, "Ingress", stages, args.ingress_settings())
    if options:
        raise ValueError(f"options for deployments this app does not have: {sorted(options)}")
    return app


def build_app(args: AppArgs) -> Application:
    """The application builder named in serve/config.yaml (``import_path: serve.app:build_app``)."""
    return build_graph(args)


def read_serve_config(path: str = DEFAULT_CONFIG) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        config = yaml.safe_load(file)
    applications = config.get("applications") or []
    if len(applications) != 1:
        raise ValueError(f"{path}: expected one application, found {len(applications)}")
    return config


def app_from_config(config: dict[str, Any], args: Optional[dict[str, Any]] = None) -> Application:
    """The application a serve config describes, with ``args`` overriding its args, for serve.run.

    Entries for deployments the bundles do not call for (an Upsampler1024 without its bundle)
    are skipped here, where ``serve run``/``serve deploy`` would refuse the file."""
    application = config["applications"][0]
    merged = AppArgs.model_validate({**(application.get("args") or {}), **(args or {})})
    present = {"TextEncoder", "ImageEncoder", "Decoder", "ImageStore", "Ingress"}
    uris = bundle_uris(merged)
    present |= {"Prior"} if "prior" in uris else set()
    present |= {UPSAMPLER_DEPLOYMENTS[kind] for kind in UPSAMPLER_DEPLOYMENTS if kind in uris}
    options = {
        entry["name"]: {key: value for key, value in entry.items() if key != "name"}
        for entry in application.get("deployments") or []
        if entry["name"] in present
    }
    return build_graph(merged, options)


def __getattr__(name: str) -> Any:
    # `serve.app:app` for `serve build` / `serve run serve.app:app`: built on first access (never
    # at import: Ray imports this module in every replica) from the DALLE2_BUNDLES folder.
    if name == "app":
        if BUNDLES_ENV not in os.environ:
            raise RuntimeError(f"serve.app:app reads its bundles folder from ${BUNDLES_ENV}; set it (or use serve.app:build_app with args)")
        return build_app(AppArgs(bundles=os.environ[BUNDLES_ENV]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

