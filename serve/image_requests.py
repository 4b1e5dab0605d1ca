"""The three requests of OpenAI's Images API, parsed and checked before any model sees them.

    POST /v1/images/generations   JSON       prompt, n, size, response_format, user
    POST /v1/images/variations    multipart  image, n, size, response_format, user
    POST /v1/images/edits         multipart  image, mask, prompt, n, size, response_format, user

Our extras, in JSON or as form fields: ``seed`` and, per stage, ``prior_steps``,
``prior_guidance_scale``, ``prior_sampler``, ``decoder_steps``, ``decoder_guidance_scale``,
``decoder_sampler``, ``upsampler_steps``, ``upsampler_sampler`` (``dpmpp_2m``, ``ddim`` or ``ddpm``);
a stage's missing fields take ``dalle2.pipeline.GenerationOptions``' defaults.
Each check raises :class:`~serve.http_errors.ApiError` naming the offending field (``param``).

Documented handling, as the library's: images of any mode are converted to RGB; a non-square
image is resized on its shorter side and center-cropped (OpenAI asks for square PNGs; we accept
and crop rather than refuse). An edit without a mask uses the image's own transparency, as
OpenAI's edits endpoint does. Unknown fields are refused, so a typo (``steps``) is not ignored.
"""

from __future__ import annotations

import io
import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from PIL import Image

from dalle2.images import InvalidInput, open_image
from dalle2.pipeline import MAX_IMAGES, GenerationOptions, StageOptions, check_options
from serve.http_errors import ApiError, bad_request, too_large

ResponseFormat = Literal["b64_json", "url"]
RESPONSE_FORMATS: tuple[str, ...] = ("b64_json", "url")
MODEL_ID = "dalle2"
MODEL_NAMES = (MODEL_ID, "dall-e-2")  # clients written for OpenAI may name its model
MAX_PROMPT_CHARS = 1000  # OpenAI's limit for dall-e-2
MAX_UPLOAD_BYTES = 4 * 1024 * 1024  # OpenAI's limit per uploaded image
MAX_IMAGE_SIDE = 4096  # a 4 MB PNG of one colour can hold a huge image: refuse before decoding it
MAX_SEED = 2**63 - 1

COMMON_FIELDS = {"n", "size", "response_format", "user", "model", "seed"}
STAGE_FIELDS = {
    "prior_steps", "prior_guidance_scale", "prior_sampler", "decoder_steps", "decoder_guidance_scale", "decoder_sampler",
    "upsampler_steps", "upsampler_sampler",
}  # fmt: skip
FIELDS = {
    "generation": COMMON_FIELDS | STAGE_FIELDS | {"prompt"},
    "variation": COMMON_FIELDS | {"decoder_steps", "decoder_guidance_scale", "upsampler_steps", "decoder_sampler", "upsampler_sampler", "image"},
    "edit": COMMON_FIELDS | STAGE_FIELDS | {"prompt", "image", "mask"},
}
RequestKind = Literal["generation", "variation", "edit"]


@dataclass(frozen=True)
class Upload:
    """A file field of a multipart form, already read."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class ImageRequest:
    kind: RequestKind
    options: GenerationOptions  # seed and size always set
    response_format: ResponseFormat
    prompt: Optional[str] = None
    image: Optional[Image.Image] = None  # variations, edits (RGB or RGBA as uploaded)
    mask: Optional[Image.Image] = None  # edits: transparent = repaint
    user: Optional[str] = None

    @property
    def size(self) -> int:
        return self.options.size


@dataclass(frozen=True)
class _Sizes:
    """What :func:`dalle2.pipeline.check_options` needs of a cascade: the sizes it reaches."""

    sizes: Sequence[int]


class _Fields:
    """Typed access to request fields. Form fields arrive as strings and are converted; JSON
    values must already have the right type (``"2"`` is not a number in JSON)."""

    def __init__(self, values: dict[str, Any], from_form: bool, kind: RequestKind):
        unknown = sorted(set(values) - FIELDS[kind])
        if unknown:
            raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
        self.values, self.from_form = values, from_form

    def _raw(self, name: str) -> Any:
        value = self.values.get(name)
        if isinstance(value, Upload):
            raise bad_request(f"'{name}' must be a form field, not a file", name)
        return None if value is None or (self.from_form and value == "") else value

    def text(self, name: str) -> Optional[str]:
        value = self._raw(name)
        if value is not None and not isinstance(value, str):
            raise bad_request(f"'{name}' must be a string", name)
        return value

    def integer(self, name: str, low: int, high: int) -> Optional[int]:
        value = self._raw(name)
        if value is None:
            return None
        if self.from_form and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise bad_request(f"'{name}' must be an integer, got {value!r}", name) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"'{name}' must be an integer", name)
        if not low <= value <= high:
            raise bad_request(f"'{name}' must be between {low} and {high}, got {value}", name)
        return value

    def number(self, name: str) -> Optional[float]:
        value = self._raw(name)
        if value is None:
            return None
        if self.from_form and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad_request(f"'{name}' must be a number, got {value!r}", name) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_request(f"'{name}' must be a number", name)
        return float(value)

    def upload(self, name: str, required: bool) -> Optional[Upload]:
        value = self.values.get(name)
        if value is None or value == "":
            if required:
                raise bad_request(f"'{name}' is a required file", name)
            return None
        if not isinstance(value, Upload):
            raise bad_request(f"'{name}' must be a file upload (multipart/form-data)", name)
        return value


def parse_prompt(value: Optional[str]) -> str:
    if value is None:
        raise bad_request("'prompt' is a required property", "prompt")
    if not value.strip():
        raise bad_request("'prompt' must be a non-empty string", "prompt")
    if len(value) > MAX_PROMPT_CHARS:
        raise bad_request(f"'prompt' is too long: {len(value)} characters, at most {MAX_PROMPT_CHARS}", "prompt", "string_above_max_length")
    return value


def parse_size(value: Optional[str], sizes: Sequence[int]) -> Optional[int]:
    """``"WxH"`` -> W (square only). None = the largest the cascade reaches."""
    if value is None:
        return None
    choices = ", ".join(f"{s}x{s}" for s in sizes)
    width, _, height = value.lower().partition("x")
    if not (width.isdigit() and height.isdigit()) or width != height or int(width) not in sizes:
        raise bad_request(f"'{value}' is not one of the sizes served: {choices}", "size")
    return int(width)


def read_image(upload: Upload, name: str) -> Image.Image:
    """Decode an uploaded image, refusing oversized files and images before decoding them."""
    if len(upload.data) > MAX_UPLOAD_BYTES:
        raise too_large(f"'{name}' is {len(upload.data)} bytes; images must be less than 4 MB", name)
    try:
        with Image.open(io.BytesIO(upload.data)) as header:  # reads the header only
            width, height = header.size
    except Exception:
        raise bad_request(f"'{name}' is not an image: send a PNG, JPEG or WebP file", name) from None
    if max(width, height) > MAX_IMAGE_SIDE:
        raise bad_request(f"'{name}' is {width}x{height}; sides of at most {MAX_IMAGE_SIDE} pixels are accepted", name)
    try:
        return open_image(upload.data, name)
    except InvalidInput as error:
        raise bad_request(str(error), name) from None


def _options(fields: _Fields, sizes: Sequence[int]) -> GenerationOptions:
    defaults = GenerationOptions()

    def stage(name: str, default: StageOptions) -> StageOptions:
        steps = fields.integer(f"{name}_steps", 1, 1000)
        guidance = fields.number(f"{name}_guidance_scale") if f"{name}_guidance_scale" in STAGE_FIELDS else None
        sampler = fields.text(f"{name}_sampler")
        return StageOptions(
            default.steps if steps is None else steps, default.guidance_scale if guidance is None else guidance, sampler or default.sampler
        )

    n = fields.integer("n", 1, MAX_IMAGES)
    seed = fields.integer("seed", 0, MAX_SEED)
    options = GenerationOptions(
        n=1 if n is None else n,
        # Every request gets a seed, so each one can be replayed (the response says which).
        seed=secrets.randbelow(2**31) if seed is None else seed,
        size=parse_size(fields.text("size"), sizes),
        prior=stage("prior", defaults.prior),
        decoder=stage("decoder", defaults.decoder),
        upsampler=stage("upsampler", defaults.upsampler),
    )
    try:
        size = check_options(_Sizes(sizes), options)
    except InvalidInput as error:
        raise bad_request(str(error), error.param) from None
    return GenerationOptions(**{**options.__dict__, "size": size})


def _common(fields: _Fields, sizes: Sequence[int]) -> dict[str, Any]:
    model = fields.text("model")
    if model is not None and model not in MODEL_NAMES:
        raise bad_request(f"The model '{model}' does not exist; this server serves {MODEL_ID}", "model", "model_not_found")
    response_format = fields.text("response_format") or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise bad_request(f"'{response_format}' is not one of {list(RESPONSE_FORMATS)} - 'response_format'", "response_format")
    return {"options": _options(fields, sizes), "response_format": response_format, "user": fields.text("user")}


def parse_generation(body: bytes, content_type: str, sizes: Sequence[int]) -> ImageRequest:
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise bad_request(f"Invalid Content-Type header ({content_type or 'none'}), expected application/json")
    try:
        values = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON") from None
    if not isinstance(values, dict):
        raise bad_request("The request body must be a JSON object")
    fields = _Fields(values, from_form=False, kind="generation")
    prompt = parse_prompt(fields.text("prompt"))
    return ImageRequest("generation", prompt=prompt, **_common(fields, sizes))


def parse_variation(form: dict[str, Any], sizes: Sequence[int]) -> ImageRequest:
    fields = _Fields(form, from_form=True, kind="variation")
    image = read_image(fields.upload("image", required=True), "image")
    return ImageRequest("variation", image=image, **_common(fields, sizes))


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)


def parse_edit(form: dict[str, Any], sizes: Sequence[int]) -> ImageRequest:
    fields = _Fields(form, from_form=True, kind="edit")
    image = read_image(fields.upload("image", required=True), "image")
    mask_upload = fields.upload("mask", required=False)
    if mask_upload is not None:
        mask = read_image(mask_upload, "mask")
    elif _has_alpha(image):
        mask = image  # OpenAI: without a mask, the image's own transparency marks what to repaint
    else:
        raise bad_request("Send a 'mask', or an 'image' with transparency (transparent = the area to repaint)", "mask")
    if mask.size != image.size:
        raise bad_request(f"The mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}; they must match", "mask")
    prompt = parse_prompt(fields.text("prompt"))
    return ImageRequest("edit", prompt=prompt, image=image, mask=mask, **_common(fields, sizes))


def is_multipart(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "multipart/form-data"


def require_multipart(content_type: str) -> None:
    if not is_multipart(content_type):
        raise ApiError(400, f"Invalid Content-Type header ({content_type or 'none'}), expected multipart/form-data")
