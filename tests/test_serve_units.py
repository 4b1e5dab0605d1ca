"""The serving pieces that need no cluster: request parsing, API keys, error mapping, and the
lockstep batching that lets requests with different seeds, steps and guidance share forwards."""

import asyncio
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2.clip import TextEncoding
from dalle2.factory import create_model
from dalle2.images import InvalidInput
from dalle2.cascade import DEFAULT_DECODER, DEFAULT_PRIOR, StageOptions, decode, encode_prompts, sample_image_embeds, upsample
from dalle2.precision import inference_precision
from serve.api_keys import API_KEYS_ENV, is_authorized, load_api_keys
from serve.diffusion_stages import _PriorOnSharedNet
from serve.http_errors import INTERNAL_ERROR_MESSAGE, ApiError, api_error_from
from serve.image_requests import MAX_UPLOAD_BYTES, ServedSizes, Upload, parse_edit, parse_generation, parse_variation
from serve.lockstep import run_in_lockstep

SIZES = ServedSizes((32, 64, 128), clip_input=32)


def _png(size=(40, 40), mode="RGB", alpha_left=False) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    if alpha_left:
        alpha = np.full((size[1], size[0]), 255, np.uint8)
        alpha[:, : size[0] // 2] = 0
        image.putalpha(Image.fromarray(alpha))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(data: bytes) -> Upload:
    return Upload("image.png", "image/png", data)


def _generation(**fields) -> bytes:
    return json.dumps({"prompt": "a red circle", **fields}).encode()


def test_a_generation_request_becomes_options():
    request = parse_generation(
        _generation(n=3, size="64x64", seed=5, decoder_steps=7, decoder_guidance_scale=2.5, response_format="url"),
        "application/json; charset=utf-8",
        SIZES,
    )
    options = request.options
    assert (request.prompt, request.response_format, options.n, options.size, options.seed) == ("a red circle", "url", 3, 64, 5)
    assert options.decoder == StageOptions(7, 2.5, DEFAULT_DECODER.sampler) and options.prior == DEFAULT_PRIOR
    chosen = parse_generation(_generation(prior_sampler="ddim", upsampler_sampler="ddpm"), "application/json", SIZES).options
    assert (chosen.prior.sampler, chosen.decoder.sampler, chosen.upsampler.sampler) == ("ddim", DEFAULT_DECODER.sampler, "ddpm")
    defaults = parse_generation(_generation(), "application/json", SIZES)
    assert defaults.options.size == 128 and defaults.options.n == 1 and defaults.response_format == "url"  # OpenAI's default
    assert isinstance(defaults.options.seed, int)  # drawn, so that the response can say which


@pytest.mark.parametrize(
    "body, content_type, param",
    [
        (json.dumps({"n": 1}).encode(), "application/json", "prompt"),
        (_generation(prompt=""), "application/json", "prompt"),
        (_generation(prompt="   "), "application/json", "prompt"),
        (_generation(prompt="x" * 1001), "application/json", "prompt"),
        (_generation(n=0), "application/json", "n"),
        (_generation(n=11), "application/json", "n"),
        (_generation(n="2"), "application/json", "n"),
        (_generation(n=True), "application/json", "n"),
        (_generation(size="256x256"), "application/json", "size"),
        (_generation(size="64x32"), "application/json", "size"),
        (_generation(size="big"), "application/json", "size"),
        (_generation(response_format="jpeg"), "application/json", "response_format"),
        (_generation(decoder_steps=0), "application/json", "decoder_steps"),
        (_generation(prior_guidance_scale=99), "application/json", "prior_guidance_scale"),
        (_generation(decoder_sampler="euler"), "application/json", "decoder_sampler"),
        (_generation(steps=5), "application/json", "steps"),
        (_generation(model="dall-e-3"), "application/json", "model"),
        (_generation(seed=-1), "application/json", "seed"),
        (b"{not json", "application/json", None),
        (b"[1, 2]", "application/json", None),
        (_generation(), "text/plain", None),
    ],
)
def test_bad_generation_requests_name_their_field(body, content_type, param):
    with pytest.raises(ApiError) as error:
        parse_generation(body, content_type, SIZES)
    assert error.value.status == 400 and error.value.param == param
    assert set(error.value.body()["error"]) == {"message", "type", "param", "code"}


def test_variation_and_edit_forms():
    variation = parse_variation({"image": _upload(_png((50, 30))), "n": "2", "size": "32x32"}, SIZES)
    # non-square: accepted, cropped; brought down to CLIP's input size at the ingress
    assert variation.image.size == (32, 32) and variation.image.mode == "RGB" and variation.options.n == 2
    edit = parse_edit({"image": _upload(_png()), "mask": _upload(_png(alpha_left=True, mode="RGBA")), "prompt": "a cat", "size": "64x64"}, SIZES)
    # image and mask at the size the cascade runs to, the mask as "L" (0 = repaint)
    assert edit.image.size == edit.mask.size == (64, 64) and edit.mask.mode == "L" and edit.prompt == "a cat"
    keep = np.asarray(edit.mask)
    assert (keep[:, :30] == 0).all() and (keep[:, 34:] == 255).all()
    own_alpha = parse_edit({"image": _upload(_png(alpha_left=True, mode="RGBA")), "prompt": "a cat"}, SIZES)
    own_keep = np.asarray(own_alpha.mask)  # OpenAI: the image's transparency is the mask
    assert own_alpha.mask.size == (128, 128) and (own_keep[:, :60] == 0).all() and (own_keep[:, 68:] == 255).all()


@pytest.mark.parametrize(
    "parse, form, status, param",
    [
        (parse_variation, {"image": _upload(b"not an image")}, 400, "image"),
        (parse_variation, {"image": "a string, not a file"}, 400, "image"),
        (parse_variation, {}, 400, "image"),
        (parse_variation, {"image": _upload(b"\x89PNG" + bytes(MAX_UPLOAD_BYTES))}, 400, "image"),  # OpenAI: 400
        (parse_variation, {"image": _upload(_png()), "n": "many"}, 400, "n"),
        (parse_variation, {"image": _upload(_png()), "prompt": "variations take no prompt"}, 400, "prompt"),
        (parse_edit, {"image": _upload(_png()), "mask": _upload(_png((20, 20), "RGBA")), "prompt": "x"}, 400, "mask"),
        (parse_edit, {"image": _upload(_png()), "prompt": "x"}, 400, "mask"),  # no mask, no alpha
        (parse_edit, {"image": _upload(_png()), "mask": _upload(_png(mode="RGBA"))}, 400, "prompt"),
    ],
)
def test_bad_uploads(parse, form, status, param):
    with pytest.raises(ApiError) as error:
        parse(form, SIZES)
    assert (error.value.status, error.value.param) == (status, param)


def test_api_keys_from_file_and_environment(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("alpha  # the first\n\nbeta\n")
    keys = load_api_keys(str(keys_file), {API_KEYS_ENV: "gamma, ,delta"})
    assert keys == {"alpha", "beta", "gamma", "delta"}
    assert is_authorized("Bearer beta", keys) and is_authorized("bearer  gamma ", keys)
    assert not is_authorized(None, keys) and not is_authorized("Bearer wrong", keys) and not is_authorized("Basic alpha", keys)
    assert is_authorized(None, load_api_keys(None, {}))  # no keys configured: open (where allowed)


def test_errors_map_to_statuses_without_leaking_internals():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    assert api_error_from(InvalidInput("bad size", "size")).status == 400
    queue_full = api_error_from(BackPressureError(num_queued_requests=3, max_queued_requests=2, status_code=429, retry_after_s=2.5))
    assert queue_full.status == 429 and queue_full.headers == {"Retry-After": "3"}
    assert api_error_from(ActorDiedError()).status == 503
    internal = api_error_from(RuntimeError("/secret/path/model.py line 12: CUDA out of memory"))
    assert internal.status == 500 and internal.body()["error"]["message"] == INTERNAL_ERROR_MESSAGE


# --------------------------------------------------------------------------- lockstep batching


@pytest.fixture(scope="module")
def tiny():
    # One intra-op thread, as in a Serve replica (Ray sets OMP_NUM_THREADS to a replica's CPUs,
    # at least 1): several sampler threads each opening OpenMP teams on a busy 2-core machine
    # spin against each other (20x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _tiny_models()
    torch.set_num_threads(threads)


def _tiny_models():
    torch.manual_seed(0)
    clip = create_model("clip", "tiny").eval()
    return {
        "clip": clip,
        "prior": create_model("prior", "tiny").eval(),
        "decoder": create_model("decoder", "tiny").eval(),
        "upsampler": create_model("upsampler_256", "tiny").eval(),
        "text": encode_prompts(clip, ["a red circle", "a blue square", "a green triangle"]),
    }


# (seed, options): different seeds, step counts, guidance on and off, in one batch
JOBS = [(0, StageOptions(3, 3.0)), (1, StageOptions(4, 1.0)), (2, StageOptions(2, 2.0))]


def _alone_and_together(network, run_one):
    """Each job run alone, and all run together through one shared forward."""
    alone = [run_one(network, i) for i in range(len(JOBS))]
    together, forwards = asyncio.run(run_in_lockstep(network, list(range(len(JOBS))), run_one))
    for a, b in zip(alone, together):
        assert not isinstance(b, Exception), b
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    return forwards


def test_a_batch_of_decodes_shares_forwards_and_matches_each_alone(tiny):
    (_, tokens), embeds = tiny["text"], torch.randn(3, tiny["decoder"].config.embed_dim)

    def run_one(decoder, i):
        seed, options = JOBS[i]
        return decode(decoder, embeds[i : i + 1], tokens[i : i + 1], options, torch.Generator().manual_seed(seed))

    forwards = _alone_and_together(tiny["decoder"], run_one)
    # Per round, the guided jobs (0, 2) share one forward and the unguided job (1) has its own:
    # rounds 1-2: 2 forwards, round 3: jobs 0 and 1, round 4: job 1 alone. Alone: 3 + 4 + 2 = 9.
    assert forwards == 2 + 2 + 2 + 1


def test_a_batch_of_prior_samples_and_upsamples_match_each_alone(tiny):
    text, _ = tiny["text"]

    def prior_one(net, i):
        seed, options = JOBS[i]
        rows = TextEncoding(text.embed[i : i + 1], text.hidden[i : i + 1], text.mask[i : i + 1])
        prior = tiny["prior"] if net is tiny["prior"].net else _PriorOnSharedNet(tiny["prior"], net)
        return sample_image_embeds(prior, rows, options, torch.Generator().manual_seed(seed))

    _alone_and_together(tiny["prior"].net, prior_one)
    low_res = torch.rand(3, 3, 32, 32) * 2 - 1

    def upsample_one(upsampler, i):
        seed, options = JOBS[i]
        return upsample([upsampler], low_res[i : i + 1], 64, options, torch.Generator().manual_seed(seed))

    assert _alone_and_together(tiny["upsampler"], upsample_one) == 4  # upsamplers take no guidance: one forward per round


def test_a_failing_request_fails_alone(tiny):
    (_, tokens), embeds = tiny["text"], torch.randn(3, tiny["decoder"].config.embed_dim)

    def run_one(decoder, i):
        if i == 1:
            raise InvalidInput("bad request", "n")
        return decode(decoder, embeds[i : i + 1], tokens[i : i + 1], StageOptions(2, 1.0), torch.Generator().manual_seed(i))

    results, _ = asyncio.run(run_in_lockstep(tiny["decoder"], [0, 1, 2], run_one))
    assert isinstance(results[1], InvalidInput)
    assert results[0].shape == results[2].shape == (1, 3, 32, 32)


class _AutocastRecorder:
    """The decoder, noting at each forward whether CPU autocast was on and in which dtype."""

    def __init__(self, network):
        self.network, self.seen = network, []

    def __getattr__(self, name):
        return getattr(self.network, name)

    def __call__(self, *args, **kwargs):
        self.seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return self.network(*args, **kwargs)


def test_a_stage_precision_holds_in_every_thread_that_runs_the_shared_forward(tiny):
    # Autocast is per thread and the shared forward runs in whichever loop completes a round
    # (job 1's last round: from its own call after the others' finished()): every forward is in
    # the stage's precision, and each request's images are those it gets alone in that precision.
    (_, tokens), embeds = tiny["text"], torch.randn(3, tiny["decoder"].config.embed_dim)
    recorder = _AutocastRecorder(tiny["decoder"])

    def run_one(decoder, i):
        seed, options = JOBS[i]
        return decode(decoder, embeds[i : i + 1], tokens[i : i + 1], options, torch.Generator().manual_seed(seed))

    bf16 = lambda: inference_precision("bf16", "cpu")  # noqa: E731
    together, _ = asyncio.run(run_in_lockstep(recorder, [0, 1, 2], run_one, thread_context=bf16))
    assert recorder.seen and set(recorder.seen) == {torch.bfloat16}
    for i, images in enumerate(together):
        with bf16():
            alone = run_one(tiny["decoder"], i)
        assert images.dtype == torch.float32
        torch.testing.assert_close(images, alone, rtol=0, atol=2e-2)  # bf16 rounding of a larger batch


def test_stage_settings_take_a_precision_and_refuse_unknown_ones():
    from serve.model_stage import StageSettings

    assert StageSettings.from_user_config("Decoder", {"precision": "bf16"}).precision == "bf16"
    assert StageSettings.from_user_config("Decoder", None).precision == "auto"
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        StageSettings.from_user_config("Decoder", {"precision": "fp8"})


# --------------------------------------------------------------------------- dalle2 serve


def _serve_command(argv):
    import argparse

    from dalle2.serve_cli import add_serve_commands

    parser = argparse.ArgumentParser(prog="dalle2")
    add_serve_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_serve_command_refuses_bad_bundles_and_taken_ports_before_starting_ray(tmp_path):
    import socket

    with pytest.raises(FileNotFoundError, match="does not exist"):
        _serve_command(["serve", "--bundles", str(tmp_path / "absent")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no clip or decoder bundle"):
        _serve_command(["serve", "--bundles", str(tmp_path / "empty")])
    for kind in ("clip", "decoder"):
        torch.manual_seed(0)
        from dalle2.bundle import save_bundle

        save_bundle(create_model(kind, "tiny"), kind, str(tmp_path / "bundles" / kind))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot serve on 127.0.0.1:{port}"):
            _serve_command(["serve", "--bundles", str(tmp_path / "bundles"), "--port", str(port)])


def test_the_app_reads_its_graph_from_the_bundles(tmp_path):
    from dalle2.bundle import save_bundle
    from serve.app import AppArgs, app_from_config, bundle_uris, cascade_sizes, read_serve_config

    torch.manual_seed(0)
    for kind in ("clip", "decoder", "upsampler_256"):  # no prior, no 1024 upsampler
        save_bundle(create_model(kind, "tiny"), kind, str(tmp_path / "cascade" / kind))
    uris = bundle_uris(AppArgs(bundles=str(tmp_path / "cascade")))
    assert sorted(uris) == ["clip", "decoder", "upsampler_256"]
    assert cascade_sizes(uris) == (32, [("upsampler_256", 64)])
    app_from_config(read_serve_config(), {"bundles": str(tmp_path / "cascade")})  # its Prior, Upsampler1024 entries skipped
    # A bundle named alone overrides the folder's; a 64->128 upsampler cannot follow a 32px decoder.
    save_bundle(create_model("upsampler_1024", "tiny"), "upsampler_1024", str(tmp_path / "other" / "u1024"))
    save_bundle(create_model("decoder", "tiny"), "decoder", str(tmp_path / "other" / "decoder"))
    uris = bundle_uris(AppArgs(clip=str(tmp_path / "cascade" / "clip"), decoder=str(tmp_path / "other" / "decoder"),
                               upsampler_1024=str(tmp_path / "other" / "u1024")))  # fmt: skip
    with pytest.raises(ValueError, match="does not follow a 32px stage"):
        cascade_sizes(uris)


def test_bench_serve_measures_the_ceiling_of_batching(tmp_path):
    from serve.bench import batching_ceiling, write_tiny_bundles

    ceiling = batching_ceiling(write_tiny_bundles(str(tmp_path)), clients=4, repeats=1)
    assert ceiling["per_image_batch_1_s"] > 0 and ceiling["per_image_batch_4_s"] > 0
    assert ceiling["ratio"] == pytest.approx(ceiling["per_image_batch_1_s"] / ceiling["per_image_batch_4_s"])
