"""The three requests of OpenAI's Images API, parsed and checked before any model sees them.

    POST /v1/images/generations   JSON       prompt, n, size, response_format, user
    POST /v1/images/variations    multipart  image, n, size, response_format, user
    POST /v1/images/edits         multipart  image, mask, prompt, n, size, response_format, user

OpenAI's ``quality: "standard"`` is accepted (``hd`` is a dall-e-3 option, refused as OpenAI does
for dall-e-2, and so is ``style``). The default ``response_format`` is ``url``, as OpenAI's.

Uploads: PNG, JPEG or WebP only (``dalle2.images.UPLOAD_FORMATS``; EPS, TIFF, GIF... are refused
before any decoder runs), at most 4 MB (400 ``image_too_large``, as OpenAI) and 4096 pixels a side
(read from the header, before decoding). They are brought down here, at the ingress, to the size
the cascade uses them at, so the stages are never sent a full-size upload.

Our extras, in JSON or as form fields: ``seed`` and, per stage, ``prior_steps``,
``prior_guidance_scale``, ``prior_sampler``, ``decoder_steps``, ``decoder_guidance_scale``,
``decoder_sampler``, ``upsampler_steps``, ``upsampler_sampler`` (``dpmpp_2m``, ``ddim`` or ``ddpm``);
a stage's missing fields take ``dalle2.cascade.GenerationOptions``' defaults.
Each check raises :class:`~serve.http_errors.ApiError` naming the offending field (``param``).

Documented handling, as the library's: images of any mode are converted to RGB; a non-square
image is resized on its shorter side and center-cropped (OpenAI asks for square PNGs; we accept
and crop rather than refuse). An edit without a mask uses the image's own transparency, as
OpenAI's edits endpoint does. Unknown fields are refused, so a typo (``steps``) is not ignored.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from PIL import Image

from dalle2.images import MAX_IMAGE_SIDE, InvalidInput, center_square, open_image, to_rgb
from dalle2.cascade import MAX_IMAGES, GenerationOptions, StageOptions, check_options
from serve.http_errors import ApiError, bad_request

ResponseFormat = Literal["b64_json", "url"]
RESPONSE_FORMATS: tuple[str, ...] = ("b64_json", "url")
MODEL_ID = "dalle2"
MODEL_NAMES = (MODEL_ID, "dall-e-2")  # clients written for OpenAI may name its model
MAX_PROMPT_CHARS = 1000  # OpenAI's limit for dall-e-2
MAX_UPLOAD_BYTES = 4 * 1024 * 1024  # OpenAI's limit per uploaded image
MAX_SEED = 2**63 - 1

COMMON_FIELDS = {"n", "size", "response_format", "user", "model", "seed", "quality", "style"}
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
    # variations: RGB at CLIP's input size; edits: square at the size the cascade runs to
    image: Optional[Image.Image] = None
    mask: Optional[Image.Image] = None  # edits: "L" at the image's size, 0 = repaint
    user: Optional[str] = None

    @property
    def size(self) -> int:
        return self.options.size


@dataclass(frozen=True)
class ServedSizes:
    """The sizes a cascade reaches and the sizes it serves: those, plus 512 when it reaches 1024
    (OpenAI's dall-e-2 sizes are 256, 512 and 1024; 512 is the 1024 image brought down)."""

    cascade: tuple[int, ...]
    clip_input: int  # the CLIP image size (variations' uploads are reduced to it)

    @property
    def sizes(self) -> list[int]:  # what dalle2.cascade.check_options reads
        extra = [512] if 1024 in self.cascade and 512 not in self.cascade else []
        return sorted(set(self.cascade) | set(extra))

    def run_to(self, size: int) -> int:
        """The cascade size a request for ``size`` runs to (the smallest at least as large)."""
        return min(s for s in self.cascade if s >= size)


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


def image_too_large(name: str, size: int) -> ApiError:
    # OpenAI answers an oversize upload 400 (its clients raise BadRequestError), not 413.
    return bad_request(f"Uploaded image must be a PNG and less than 4 MB ('{name}' is {size} bytes).", name, "image_too_large")


def read_image(upload: Upload, name: str) -> Image.Image:
    """Decode an uploaded image of an accepted format, refusing oversized files and images
    before decoding them."""
    if len(upload.data) > MAX_UPLOAD_BYTES:
        raise image_too_large(name, len(upload.data))
    try:
        return open_image(upload.data, name, max_side=MAX_IMAGE_SIDE)
    except InvalidInput as error:
        raise bad_request(f"'{name}': {error}", name) from None


def _options(fields: _Fields, served: ServedSizes) -> GenerationOptions:
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
        size=parse_size(fields.text("size"), served.sizes),
        prior=stage("prior", defaults.prior),
        decoder=stage("decoder", defaults.decoder),
        upsampler=stage("upsampler", defaults.upsampler),
    )
    try:
        size = check_options(served, options)
    except InvalidInput as error:
        raise bad_request(str(error), error.param) from None
    return GenerationOptions(**{**options.__dict__, "size": size})


def _common(fields: _Fields, served: ServedSizes) -> dict[str, Any]:
    model = fields.text("model")
    if model is not None and model not in MODEL_NAMES:
        raise bad_request(f"The model '{model}' does not exist; this server serves {MODEL_ID}", "model", "model_not_found")
    quality = fields.text("quality")
    if quality not in (None, "standard", "auto"):
        raise bad_request(f"Invalid quality '{quality}': dall-e-2 only supports 'standard'.", "quality", "invalid_value")
    if fields.text("style") is not None:
        raise bad_request("The 'style' parameter is only supported for dall-e-3.", "style", "invalid_value")
    response_format = fields.text("response_format") or "url"
    if response_format not in RESPONSE_FORMATS:
        raise bad_request(f"'{response_format}' is not one of {list(RESPONSE_FORMATS)} - 'response_format'", "response_format")
    return {"options": _options(fields, served), "response_format": response_format, "user": fields.text("user")}


def parse_generation(body: bytes, content_type: str, served: ServedSizes) -> ImageRequest:
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
    return ImageRequest("generation", prompt=prompt, **_common(fields, served))


def parse_variation(form: dict[str, Any], served: ServedSizes) -> ImageRequest:
    """Decodes the upload: call it off the event loop."""
    fields = _Fields(form, from_form=True, kind="variation")
    common = _common(fields, served)  # cheap checks first, the decode last
    image = read_image(fields.upload("image", required=True), "image")
    return ImageRequest("variation", image=center_square(to_rgb(image), served.clip_input), **common)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)


def parse_edit(form: dict[str, Any], served: ServedSizes) -> ImageRequest:
    """Decodes the uploads: call it off the event loop."""
    fields = _Fields(form, from_form=True, kind="edit")
    prompt = parse_prompt(fields.text("prompt"))
    common = _common(fields, served)
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
    # Down to the size the cascade runs to (the kept pixels are restored there): the mask as
    # "L" (0 = repaint, OpenAI's alpha-0 rule) cut with nearest, so a kept pixel stays kept.
    size = served.run_to(common["options"].size)
    keep = mask.convert("RGBA").getchannel("A") if _has_alpha(mask) else mask.convert("L")
    return ImageRequest("edit", prompt=prompt, image=center_square(to_rgb(image), size),
                        mask=center_square(keep, size, resample=Image.Resampling.NEAREST), **common)  # fmt: skip


def is_multipart(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "multipart/form-data"


def require_multipart(content_type: str) -> None:
    if not is_multipart(content_type):
        raise ApiError(400, f"Invalid Content-Type header ({content_type or 'none'}), expected multipart/form-data")
