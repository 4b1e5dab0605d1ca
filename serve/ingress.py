"""The HTTP ingress: OpenAI's Images API in front of the deployment graph.

A request is checked here (serve.image_requests), then the stages are chained by passing each
stage's ``DeploymentResponse`` into the next stage's call: the ingress only awaits the last one,
so the tensors go from replica to replica and the ingress's event loop never blocks (uploads are
decoded and PNGs encoded in threads).

    generations  TextEncoder -> Prior(n draws)            -> Decoder -> Upsampler.. (up to size)
    variations   ImageEncoder(n copies)                   -> Decoder -> Upsampler..
    edits        TextEncoder -> Prior(1 draw, n copies)   -> Decoder(known pixels) -> Upsampler..

What keeps it trustworthy under traffic (serve.admission): a key check that fails closed, an
optional per-key rate limit (429), a bound on image requests in flight (503 + Retry-After beyond
it), a body-read timeout (408), and a deadline per request across the whole chain (504; the
stages' work is cancelled).

Routes: ``POST /v1/images/{generations,variations,edits}``, ``GET /v1/images/files/<token>.png``
(``response_format: url``), ``GET /v1/models`` (models and sizes), ``GET /healthz`` (this process
answers), ``GET /readyz`` (every stage has a running replica), ``GET /admin/stages`` (replicas,
bundles, settings; admin key), ``GET /`` (the studio, serve.web).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures (Request)
# of Serve's class-based view at run time, and string annotations make it see query parameters.

import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from dalle2.images import center_square, edit_mask, image_to_tensor, png_bytes, tensor_to_images
from serve.admission import Admission, DeadlinePolicy, RateLimiter, deadline_exceeded
from serve.api_keys import ADMIN_KEYS_ENV, bearer_key, is_authorized, load_api_keys, require_keys_or_consent
from serve.http_body import MAX_JSON_BYTES, read_body, read_form
from serve.http_errors import ApiError, api_error_from, unauthorized
from serve.image_requests import MODEL_ID, MODEL_NAMES, ImageRequest, ServedSizes, parse_edit, parse_generation, parse_variation
from serve.messages import DiffusionJob, Pixels, PriorJob
from serve.metrics import IngressMetrics
from serve.web import PAGE

logger = logging.getLogger("ray.serve")


@dataclass
class Stages:
    """Handles of the model deployments (bound by serve.app) and what the cascade is made of."""

    text_encoder: DeploymentHandle
    image_encoder: DeploymentHandle
    prior: Optional[DeploymentHandle]  # None: a cascade without a prior serves no text-to-image
    decoder: DeploymentHandle
    upsamplers: list[tuple[int, DeploymentHandle]]  # (output size, handle), in cascade order
    image_store: DeploymentHandle
    base_size: int  # the decoder's
    clip_input_size: int = 224  # CLIP's image size (variations' uploads are brought down to it)
    default_steps: dict[str, int] = field(default_factory=dict)  # "prior", "decoder", "upsampler_<size>"

    @property
    def sizes(self) -> list[int]:
        return [self.base_size] + [size for size, _ in self.upsamplers]

    @property
    def served(self) -> ServedSizes:
        return ServedSizes(tuple(self.sizes), self.clip_input_size)

    def named(self) -> dict[str, DeploymentHandle]:
        named = {"text_encoder": self.text_encoder, "image_encoder": self.image_encoder, "decoder": self.decoder}
        if self.prior is not None:
            named["prior"] = self.prior
        named.update({f"upsampler_{size}": handle for size, handle in self.upsamplers})
        return named

    def steps_of(self, request: ImageRequest) -> int:
        """The diffusion steps ``request`` runs across its stages (its own, else each model's)."""
        options, run_to = request.options, self.served.run_to(request.size)
        steps = 0 if request.kind == "variation" else options.prior.steps or self.default_steps.get("prior", 64)
        steps += options.decoder.steps or self.default_steps.get("decoder", 64)
        for size, _ in self.upsamplers:
            if size <= run_to:
                steps += options.upsampler.steps or self.default_steps.get(f"upsampler_{size}", 27)
        return steps


@dataclass(frozen=True)
class IngressSettings:
    api_keys_file: Optional[str] = None  # plus DALLE2_API_KEYS from the environment
    allow_unauthenticated: bool = False  # no keys on a non-loopback address: only when this says so
    admin_keys_file: Optional[str] = None  # plus DALLE2_ADMIN_KEYS; none = no admin route
    deadline: DeadlinePolicy = DeadlinePolicy()
    body_timeout_s: float = 30.0
    max_image_requests: int = 64  # admitted at once per ingress replica; more get 503 + Retry-After
    retry_after_s: float = 1.0
    rate_limit_per_minute: Optional[float] = None  # per API key (per client address without keys)
    rate_limit_burst: int = 10


http_api = FastAPI(title="dalle2", docs_url=None, redoc_url=None, openapi_url=None)


@http_api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and methods, in OpenAI's error shape too.
    message = "Unknown request URL" if error.status_code == 404 else str(error.detail)
    return _error_response(ApiError(error.status_code, f"{message}: {request.method} {request.url.path}"))


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _server_timing(pixels: Pixels) -> str:
    """Each stage's time, batch size and forward passes, for browsers' devtools (no replica ids:
    those are on the admin route)."""
    return ", ".join(f'{t.stage};dur={t.seconds * 1000:.1f};desc="batch={t.batch_requests} forwards={t.forwards}"' for t in pixels.timings)


def _finish_images(request: ImageRequest, pixels: Pixels, base_size: int) -> list[bytes]:
    """PNGs of the final images (run in a thread: encoding is CPU work)."""
    images = pixels.images
    if request.kind == "edit" and images.shape[-1] != base_size:
        # As dalle2.cascade.edit: the kept pixels are restored exactly at the output size.
        keep = edit_mask(request.mask, request.image, images.shape[-1]).to(images)
        images = keep * image_to_tensor(request.image, images.shape[-1]).to(images) + (1 - keep) * images
    finals = tensor_to_images(images)
    if finals[0].size[0] != request.size:  # 512x512: the 1024 image brought down
        finals = [image.resize((request.size, request.size), Image.Resampling.LANCZOS) for image in finals]
    return [png_bytes(image) for image in finals]


def _proxy_host() -> Optional[str]:
    """The address Serve's HTTP proxies bind (None when it cannot be learned: treated as public)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:
        return None


_REJECTIONS = {401: "unauthorized", 408: "body_timeout", 429: "rate_limited", 503: "overloaded", 504: "deadline"}


# max_ongoing_requests well above max_image_requests: the ingress's own cheap routes (/healthz,
# /readyz, image files) always find a slot; image requests beyond the limit are refused at once.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256, max_queued_requests=64)
@serve.ingress(http_api)
class Ingress:
    def __init__(self, stages: Stages, settings: IngressSettings = IngressSettings()):
        self.stages = stages
        self.settings = settings
        self.api_keys = load_api_keys(settings.api_keys_file)
        require_keys_or_consent(self.api_keys, _proxy_host(), settings.allow_unauthenticated)
        self.admin_keys = load_api_keys(settings.admin_keys_file, env_name=ADMIN_KEYS_ENV)
        self.admission = Admission(settings.max_image_requests, settings.retry_after_s)
        self.rate_limiter = (
            RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst) if settings.rate_limit_per_minute else None
        )
        self.metrics = IngressMetrics()
        self.started = int(time.time())
        logger.info("dalle2 ingress: sizes %s, API keys %s", stages.served.sizes, "on" if self.api_keys else "OFF")

    # ------------------------------------------------------------------ routes

    @http_api.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE)

    @http_api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: this ingress answers (never queued behind image requests, see Admission)."""
        return {"status": "ok"}

    @http_api.get("/readyz")
    async def readyz(self) -> Response:
        """Readiness, for load balancers and KubeRay probes: every deployment of the app has a
        running replica (Serve counts a replica running while its check_health passes)."""
        return await self._readiness()

    @http_api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def listing() -> Response:
            sizes = [f"{s}x{s}" for s in self.stages.served.sizes]
            models = [{"id": name, "object": "model", "created": self.started, "owned_by": "dalle2", "sizes": sizes} for name in MODEL_NAMES]
            return JSONResponse({"object": "list", "data": models})

        return await self._answer(request, listing)

    @http_api.get("/admin/stages")
    async def admin_stages(self, request: Request) -> Response:
        async def stages() -> Response:
            named = self.stages.named()
            described = await asyncio.gather(*(handle.describe.remote() for handle in named.values()))
            ingress = {"image_requests_in_flight": self.admission.in_flight, "settings": repr(self.settings)}
            return JSONResponse({"ingress": ingress, "stages": dict(zip(named, described))})

        return await self._answer(request, stages, authorize=False, admin=True)

    @http_api.post("/v1/images/generations")
    async def generations(self, request: Request) -> Response:
        async def parse() -> ImageRequest:
            body = await read_body(request, MAX_JSON_BYTES, "request body", self.settings.body_timeout_s)
            return parse_generation(body, request.headers.get("content-type", ""), self.stages.served)

        return await self._answer(request, lambda: self._images(request, parse))

    @http_api.post("/v1/images/variations")
    async def variations(self, request: Request) -> Response:
        async def parse() -> ImageRequest:
            form = await read_form(request, self.settings.body_timeout_s)
            return await asyncio.to_thread(parse_variation, form, self.stages.served)

        return await self._answer(request, lambda: self._images(request, parse))

    @http_api.post("/v1/images/edits")
    async def edits(self, request: Request) -> Response:
        async def parse() -> ImageRequest:
            form = await read_form(request, self.settings.body_timeout_s)
            return await asyncio.to_thread(parse_edit, form, self.stages.served)

        return await self._answer(request, lambda: self._images(request, parse))

    @http_api.get("/v1/images/files/{name}")
    async def image_file(self, request: Request, name: str) -> Response:
        async def fetch() -> Response:
            status, png, seconds_left = await self.stages.image_store.get.remote(name.removesuffix(".png"))
            if status == "gone":
                raise ApiError(410, "This image URL has expired", code="url_expired")
            if status == "missing":
                raise ApiError(404, "This image URL never existed", code="not_found")
            cache = f"private, max-age={max(0, int(seconds_left))}"
            return Response(png, media_type="image/png", headers={"Cache-Control": cache})

        # The URL's random token is the capability (as OpenAI's signed URLs): no API key needed.
        return await self._answer(request, fetch, authorize=False)

    # ------------------------------------------------------------------ work

    async def _answer(self, request: Request, work: Callable[[], Awaitable[Response]], authorize: bool = True,
                      admin: bool = False) -> Response:  # fmt: skip
        """Authorise, rate-limit, run, and turn any failure into an OpenAI-shaped error."""
        try:
            authorization = request.headers.get("authorization")
            if admin and (not self.admin_keys or bearer_key(authorization, self.admin_keys) is None):
                raise unauthorized()
            if authorize and not is_authorized(authorization, self.api_keys):
                raise unauthorized()
            if authorize and self.rate_limiter is not None:
                client = request.client.host if request.client else "unknown"
                self.rate_limiter.take(bearer_key(authorization, self.api_keys) or f"address:{client}")
            return await work()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            api_error = api_error_from(error)
            self.metrics.reject(_REJECTIONS.get(api_error.status, "invalid_request" if api_error.status < 500 else "error"))
            return _error_response(api_error)

    async def _readiness(self) -> Response:
        app = serve.get_replica_context().app_name
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), 5.0)
            deployments = status.applications[app].deployments
        except Exception as error:  # the controller is unreachable: not ready
            return JSONResponse({"status": "not_ready", "reason": type(error).__name__}, status_code=503)
        stages = {
            name: {"status": str(getattr(info.status, "value", info.status)), "running_replicas": info.replica_states.get("RUNNING", 0)}
            for name, info in deployments.items()
        }
        ready = all(stage["running_replicas"] > 0 for stage in stages.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "stages": stages}, status_code=200 if ready else 503)

    async def _images(self, request: Request, parse: Callable[[], Awaitable[ImageRequest]]) -> Response:
        self.admission.enter()
        self.metrics.in_flight.set(self.admission.in_flight)
        try:
            image_request = await parse()
            deadline = self.settings.deadline.deadline_s(self.stages.steps_of(image_request))
            try:
                return await asyncio.wait_for(self._generate(request, image_request), deadline)
            except asyncio.TimeoutError:
                raise deadline_exceeded(deadline) from None
        finally:
            self.admission.leave()
            self.metrics.in_flight.set(self.admission.in_flight)

    async def _generate(self, request: Request, image_request: ImageRequest) -> Response:
        pixels = await self._run_cascade(image_request)
        pngs = await asyncio.to_thread(_finish_images, image_request, pixels, self.stages.base_size)
        if image_request.response_format == "url":
            tokens = await self.stages.image_store.put.remote(pngs)
            base = str(request.base_url)
            data = [{"url": f"{base}v1/images/files/{token}.png"} for token in tokens]
        else:
            data = [{"b64_json": base64.b64encode(png).decode()} for png in pngs]
        self.metrics.generated(image_request.kind, len(pngs))
        body = {"created": int(time.time()), "data": data, "seed": image_request.options.seed}
        return JSONResponse(body, headers={"Server-Timing": _server_timing(pixels)})

    async def _run_cascade(self, request: ImageRequest) -> Pixels:
        stages, options = self.stages, request.options
        if request.kind != "variation" and stages.prior is None:
            raise ApiError(400, "This server has no prior bundle, so it cannot turn prompts into images; use /v1/images/variations")
        chain = []  # every stage's response, to cancel the rest when one fails or time runs out

        def then(response):
            chain.append(response)
            return response

        if request.kind == "generation":
            text = then(stages.text_encoder.encode.remote(request.prompt))
            latents = then(stages.prior.sample.remote(text, PriorJob(options.seed, options.prior, draws=options.n)))
        elif request.kind == "variation":
            latents = then(stages.image_encoder.encode.remote(request.image, copies=options.n))
        else:  # an edit paints toward one embedding of its prompt, as dalle2.cascade.edit
            text = then(stages.text_encoder.encode.remote(request.prompt))
            latents = then(stages.prior.sample.remote(text, PriorJob(options.seed, options.prior, draws=1, copies=options.n)))
        known = None
        if request.kind == "edit":  # the decoder gets them at its own size, not the output's
            base = stages.base_size
            known = (center_square(request.image, base), center_square(request.mask, base, resample=Image.Resampling.NEAREST))
        pixels = then(stages.decoder.decode.remote(latents, DiffusionJob(options.seed, options.decoder, known)))
        run_to = stages.served.run_to(request.size)
        for size, upsampler in stages.upsamplers:
            if size > run_to:
                break
            pixels = then(upsampler.upsample.remote(pixels, DiffusionJob(options.seed, options.upsampler)))
        try:
            return await pixels
        except BaseException:
            # A stage refused the request (its queue was full) or failed, the client left, or the
            # deadline passed: stop the stages still working on it.
            for response in chain:
                response.cancel()
            raise
