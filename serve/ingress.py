"""The HTTP ingress: OpenAI's Images API in front of the deployment graph.

A request is checked here (serve.image_requests), then the stages are chained by passing each
stage's ``DeploymentResponse`` into the next stage's call: the ingress only awaits the last one,
so the tensors go from replica to replica and the ingress's event loop never blocks.

    generations  TextEncoder -> Prior(n draws)            -> Decoder -> Upsampler.. (up to size)
    variations   ImageEncoder(n copies)                   -> Decoder -> Upsampler..
    edits        TextEncoder -> Prior(1 draw, n copies)   -> Decoder(known pixels) -> Upsampler..

Routes: ``POST /v1/images/{generations,variations,edits}``, ``GET /v1/images/files/<token>.png``
(``response_format: url``), ``GET /v1/models`` (the live bundles of every stage),
``GET /healthz``, ``GET /`` (a page to try it).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures (Request)
# of Serve's class-based view at run time, and string annotations make it see query parameters.

import asyncio
import base64
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from dalle2.images import edit_mask, image_to_tensor, png_bytes, tensor_to_images
from serve.api_keys import is_authorized, load_api_keys
from serve.http_errors import ApiError, api_error_from, bad_request, too_large, unauthorized
from serve.image_requests import (
    MAX_UPLOAD_BYTES,
    MODEL_ID,
    ImageRequest,
    Upload,
    parse_edit,
    parse_generation,
    parse_variation,
    require_multipart,
)
from serve.messages import DiffusionJob, Pixels, PriorJob
from serve.web import PAGE

logger = logging.getLogger("ray.serve")

MAX_JSON_BYTES = 1024 * 1024
MAX_FORM_BYTES = 2 * MAX_UPLOAD_BYTES + 256 * 1024  # image + mask + the small fields


@dataclass
class Stages:
    """Handles of the model deployments (bound by serve.app) and the sizes the cascade reaches."""

    text_encoder: DeploymentHandle
    image_encoder: DeploymentHandle
    prior: Optional[DeploymentHandle]  # None: a cascade without a prior serves no text-to-image
    decoder: DeploymentHandle
    upsamplers: list[tuple[int, DeploymentHandle]]  # (output size, handle), in cascade order
    image_store: DeploymentHandle
    base_size: int  # the decoder's

    @property
    def sizes(self) -> list[int]:
        return [self.base_size] + [size for size, _ in self.upsamplers]

    def named(self) -> dict[str, DeploymentHandle]:
        named = {"text_encoder": self.text_encoder, "image_encoder": self.image_encoder, "decoder": self.decoder}
        if self.prior is not None:
            named["prior"] = self.prior
        named.update({f"upsampler_{size}": handle for size, handle in self.upsamplers})
        return named


@dataclass(frozen=True)
class IngressSettings:
    api_keys_file: Optional[str] = None  # plus DALLE2_API_KEYS from the environment


http_api = FastAPI(title="dalle2", docs_url=None, redoc_url=None, openapi_url=None)


@http_api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and methods, in OpenAI's error shape too.
    message = "Unknown request URL" if error.status_code == 404 else str(error.detail)
    return _error_response(ApiError(error.status_code, f"{message}: {request.method} {request.url.path}"))


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refusing (413) anything over ``limit`` without reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"The {what} is {int(declared)} bytes; the limit is {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(f"The {what} is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request) -> dict[str, Any]:
    """A multipart form as {name: str | Upload}, the body size capped before parsing."""
    require_multipart(request.headers.get("content-type", ""))
    body = await read_body(request, MAX_FORM_BYTES, "upload")

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=32)
    except Exception:
        raise bad_request("The multipart/form-data body could not be parsed") from None
    try:
        values: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name in values:
                raise bad_request(f"'{name}' was sent more than once", name)
            if isinstance(value, str):
                values[name] = value
            else:
                values[name] = Upload(value.filename or "", value.content_type or "", await value.read())
        return values
    finally:
        await form.close()


def _server_timing(pixels: Pixels) -> str:
    """Each stage's time and replica, for browsers' devtools and for checking the composition."""
    return ", ".join(
        f'{t.stage};dur={t.seconds * 1000:.1f};desc="{t.replica} batch={t.batch_requests} forwards={t.forwards}"'
        for t in pixels.timings
    )


def _finish_images(request: ImageRequest, pixels: Pixels, base_size: int) -> list[bytes]:
    """PNGs of the final images (run in a thread: encoding is CPU work)."""
    images = pixels.images
    if request.kind == "edit" and images.shape[-1] != base_size:
        # As dalle2.pipeline.edit: the kept pixels are restored exactly at the output size.
        keep = edit_mask(request.mask, request.image, images.shape[-1]).to(images)
        images = keep * image_to_tensor(request.image, images.shape[-1]).to(images) + (1 - keep) * images
    return [png_bytes(image) for image in tensor_to_images(images)]


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
@serve.ingress(http_api)
class Ingress:
    def __init__(self, stages: Stages, settings: IngressSettings = IngressSettings()):
        self.stages = stages
        self.settings = settings
        self.api_keys = load_api_keys(settings.api_keys_file)
        self.started = int(time.time())
        logger.info("dalle2 ingress: sizes %s, API keys %s", stages.sizes, "on" if self.api_keys else "off")

    # ------------------------------------------------------------------ routes

    @http_api.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE)

    @http_api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @http_api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._answer(request, self._models)

    @http_api.post("/v1/images/generations")
    async def generations(self, request: Request) -> Response:
        async def parse() -> ImageRequest:
            body = await read_body(request, MAX_JSON_BYTES, "request body")
            return parse_generation(body, request.headers.get("content-type", ""), self.stages.sizes)

        return await self._answer(request, lambda: self._images(request, parse))

    @http_api.post("/v1/images/variations")
    async def variations(self, request: Request) -> Response:
        async def parse() -> ImageRequest:
            return parse_variation(await read_form(request), self.stages.sizes)

        return await self._answer(request, lambda: self._images(request, parse))

    @http_api.post("/v1/images/edits")
    async def edits(self, request: Request) -> Response:
        async def parse() -> ImageRequest:
            return parse_edit(await read_form(request), self.stages.sizes)

        return await self._answer(request, lambda: self._images(request, parse))

    @http_api.get("/v1/images/files/{name}")
    async def image_file(self, request: Request, name: str) -> Response:
        async def fetch() -> Response:
            png = await self.stages.image_store.get.remote(name.removesuffix(".png"))
            if png is None:
                raise ApiError(404, "This image URL has expired or never existed", code="not_found")
            return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

        # The URL's random token is the capability (as OpenAI's signed URLs): no API key needed.
        return await self._answer(request, fetch, authorize=False)

    # ------------------------------------------------------------------ work

    async def _answer(self, request: Request, work: Callable[[], Awaitable[Response]], authorize: bool = True) -> Response:
        """Authorise, run, and turn any failure into an OpenAI-shaped error."""
        try:
            if authorize and not is_authorized(request.headers.get("authorization"), self.api_keys):
                raise unauthorized()
            return await work()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            return _error_response(api_error_from(error))

    async def _models(self) -> Response:
        named = self.stages.named()
        described = await asyncio.gather(*(handle.describe.remote() for handle in named.values()))
        model = {
            "id": MODEL_ID,
            "object": "model",
            "created": self.started,
            "owned_by": "dalle2",
            "sizes": [f"{s}x{s}" for s in self.stages.sizes],
            "stages": dict(zip(named, described)),
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def _images(self, request: Request, parse: Callable[[], Awaitable[ImageRequest]]) -> Response:
        image_request = await parse()
        pixels = await self._run_cascade(image_request)
        pngs = await asyncio.to_thread(_finish_images, image_request, pixels, self.stages.base_size)
        if image_request.response_format == "url":
            tokens = await self.stages.image_store.put.remote(pngs)
            base = str(request.base_url)
            data = [{"url": f"{base}v1/images/files/{token}.png"} for token in tokens]
        else:
            data = [{"b64_json": base64.b64encode(png).decode()} for png in pngs]
        body = {"created": int(time.time()), "data": data, "seed": image_request.options.seed}
        return JSONResponse(body, headers={"Server-Timing": _server_timing(pixels)})

    async def _run_cascade(self, request: ImageRequest) -> Pixels:
        stages, options = self.stages, request.options
        if request.kind != "variation" and stages.prior is None:
            raise bad_request("This server has no prior bundle, so it cannot turn prompts into images; use /v1/images/variations")
        chain = []  # every stage's response, to cancel the rest when one fails

        def then(response):
            chain.append(response)
            return response

        if request.kind == "generation":
            text = then(stages.text_encoder.encode.remote(request.prompt))
            latents = then(stages.prior.sample.remote(text, PriorJob(options.seed, options.prior, draws=options.n)))
        elif request.kind == "variation":
            latents = then(stages.image_encoder.encode.remote(request.image, copies=options.n))
        else:  # an edit paints toward one embedding of its prompt, as dalle2.pipeline.edit
            text = then(stages.text_encoder.encode.remote(request.prompt))
            latents = then(stages.prior.sample.remote(text, PriorJob(options.seed, options.prior, draws=1, copies=options.n)))
        known = (request.image, request.mask) if request.kind == "edit" else None
        pixels = then(stages.decoder.decode.remote(latents, DiffusionJob(options.seed, options.decoder, known)))
        for size, upsampler in stages.upsamplers:
            if size > options.size:
                break
            pixels = then(upsampler.upsample.remote(pixels, DiffusionJob(options.seed, options.upsampler)))
        try:
            return await pixels
        except BaseException:
            # A stage refused the request (its queue was full) or failed, or the client left:
            # stop the stages still working on it.
            for response in chain:
                response.cancel()
            raise
