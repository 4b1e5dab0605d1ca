"""The evaluation suite: the pixel checker on real and damaged shapes images, golden values
of the metrics, the report of `dalle2 eval`, and an eval that tells trained from untrained."""

import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dalle2.bundle import save_bundle
from dalle2.cli import main as cli_main
from dalle2.clip import tokenize
from dalle2.clip_loss import ContrastiveLoss
from dalle2.data import shapes, storage
from dalle2.data.preprocess import in_validation, preprocess_batch, to_model_images
from dalle2.data.schema import read_dataset
from dalle2.eval import metrics
from dalle2.eval.run import EvalSettings, Samplers, Steps, read_held_out, rephrase, run_eval, stage_options
from dalle2.eval.shapes_checker import read_attributes
from dalle2.factory import create_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread (as tests/test_train_tasks.py): tiny models gain nothing from more,
    and OpenMP threads spin-waiting on a shared 2-core machine make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the shapes checker

CHECKED = ("shape", "color", "position", "size", "background")


def _rows(count: int, size: int, seed: int = 0) -> list[dict]:
    return shapes.shapes_table(0, count, image_size=size, seed=seed).to_pylist()


def _pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))


def with_generation_defects(image: np.ndarray, row: dict, rng: np.random.Generator) -> np.ndarray:
    """What generated images look like next to the renders: a background tinted by up to
    40/255 per channel, soft edges (Gaussian blur of 0.3-0.8 px at 64 px, scaled with the
    side), Gaussian noise of sigma 8/255, and a brightness shift of up to 15/255."""
    pixels = image.astype(np.float64)
    background = np.array(shapes.BACKGROUNDS[row["background"]], np.float64)
    contrast = np.array(shapes.COLORS[row["color"]], np.float64) - background
    coverage = np.clip((pixels - background) @ contrast / (contrast @ contrast), 0, 1)[..., None]  # renders blend linearly
    pixels += (1 - coverage) * rng.uniform(-40, 40, 3)  # tint the background only
    radius = rng.uniform(0.3, 0.8) * image.shape[0] / 64
    pixels = np.asarray(Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)), np.float64)
    pixels += rng.normal(0, 8, pixels.shape) + rng.uniform(-15, 15)
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def _accuracy(rows: list[dict], images: list[np.ndarray]) -> dict[str, float]:
    readings = [read_attributes(image) for image in images]
    return {name: float(np.mean([r[name] == row[name] for r, row in zip(readings, rows)])) for name in CHECKED}


@pytest.mark.parametrize("size", [64, 32])
def test_checker_reads_real_shapes_images(size):
    rows = _rows(300, size)
    accuracy = _accuracy(rows, [_pixels(row) for row in rows])
    # Measured: 1.00 on every attribute at 64 and at 32 px.
    assert all(value >= 0.98 for value in accuracy.values()), accuracy


@pytest.mark.parametrize("size", [64, 32])
def test_checker_reads_images_with_the_defects_of_generated_ones(size):
    rows = _rows(300, size, seed=1)
    rng = np.random.default_rng(0)
    accuracy = _accuracy(rows, [with_generation_defects(_pixels(row), row, rng) for row in rows])
    # Measured: 1.00 on every attribute at 64 and 32 px (stronger defects, 60/255 tint,
    # 1.6 px blur, sigma 16/255 noise: >= 0.97 at 32 px, >= 0.98 at 64 px).
    assert all(value >= 0.95 for value in accuracy.values()), accuracy


def test_checker_finds_nothing_on_a_plain_or_noisy_background():
    plain = np.full((32, 32, 3), 128, np.uint8)
    assert read_attributes(plain) == {"shape": None, "color": None, "size": None, "position": None, "background": "gray"}
    noisy = np.clip(np.random.default_rng(0).normal(250, 6, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert read_attributes(noisy)["shape"] is None


# ------------------------------------------------------------------ metrics, golden values


def test_frechet_distance_of_identical_sets_is_zero():
    features = np.random.default_rng(0).normal(size=(50, 8))
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    # Sample statistics transform exactly: Y = X * scale + shift has mean(X)*scale + shift
    # and variances var(X) * scale^2, so the golden value holds for any sample X.
    x = np.random.default_rng(1).normal(size=(200, 3))
    x = (x - x.mean(0)) / x.std(0, ddof=1)  # mean 0, variance 1 per dimension
    y = x * np.array([2.0, 1.0, 0.5]) + np.array([3.0, 4.0, 0.0])
    # |mu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 = 25 + (1-2)^2 + 0 + (1-0.5)^2
    assert metrics.frechet_distance(x, y) == pytest.approx(26.25, rel=1e-9)


def test_frechet_distance_matches_the_closed_form_for_correlated_gaussians():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 2)) @ np.array([[1.0, 0.6], [0.0, 0.8]]), rng.normal(size=(300, 2)) @ np.array([[0.5, -0.3], [0.2, 1.5]]) + 1
    mean_a, mean_b, cov_a, cov_b = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    # For 2x2: eigenvalues l1, l2 of cov_a @ cov_b (not symmetric: these covariances do not
    # commute) give tr sqrt = sqrt(l1) + sqrt(l2) = sqrt(tr + 2 sqrt(det)).
    product = cov_a @ cov_b
    trace_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    golden = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    assert metrics.frechet_distance(x, y) == pytest.approx(golden, rel=1e-9)
    assert metrics.frechet_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(golden, rel=1e-9)


def test_clip_score_prior_cosine_and_retrieval_golden():
    e = torch.eye(4)
    assert metrics.clip_score(e, e) == pytest.approx(1.0)
    assert metrics.clip_score(e, e.roll(1, dims=0)) == pytest.approx(0.0)
    true = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    result = metrics.prior_cosine(
        predicted=torch.tensor([[2.0, 0.0], [1.0, 1.0]]), true=true, text_embeds=torch.tensor([[0.0, 1.0], [0.0, 1.0]]),
        mean_image_embed=torch.tensor([1.0, 1.0]),
    )  # fmt: skip
    assert result["cosine"] == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert result["baseline_text_embedding"] == pytest.approx(0.5)
    assert result["baseline_mean_image_embedding"] == pytest.approx(math.sqrt(0.5))
    assert result["beats_baselines"] is True
    # Rows 0 and 1 are twins (same labels): text 1 picks image 0, a miss by row, a hit by labels.
    images = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    scores = metrics.retrieval(images, texts, labels=[("red",), ("red",), ("blue",)])
    assert scores["text_to_image_top1"] == pytest.approx(2 / 3)
    assert scores["text_to_image_top1_same_labels"] == 1.0
    assert scores["chance_top1"] == pytest.approx(1 / 3)
    # Zero-shot: image 0 is nearest its candidate 1, image 1 its candidate 0.
    choices = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.2]]])
    assert metrics.zero_shot_accuracy(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), choices, truth=[1, 1]) == 0.5


def test_samplers_parse_and_stage_options_fall_back_to_generates_defaults():
    from dalle2.cascade import GenerationOptions

    assert Samplers.parse("") == Samplers()
    assert Samplers.parse("ddim") == Samplers("ddim", "ddim", "ddim")
    assert Samplers.parse("prior=ddpm, decoder=dpmpp_2m") == Samplers(prior="ddpm", decoder="dpmpp_2m")
    with pytest.raises(ValueError, match="bad sampler"):
        Samplers.parse("decoder=euler")
    defaults = GenerationOptions()
    assert stage_options("decoder", Steps(), Samplers(), 3.0) == defaults.decoder
    assert stage_options("prior", Steps(prior=7), Samplers(prior="ddim"), 1.0).__dict__ == {"steps": 7, "guidance_scale": 1.0, "sampler": "ddim"}


def test_steps_parse():
    assert Steps.parse("") == Steps()
    assert Steps.parse("12") == Steps(12, 12, 12)
    assert Steps.parse("prior=4, decoder=8") == Steps(prior=4, decoder=8)
    with pytest.raises(ValueError, match="bad steps"):
        Steps.parse("decoder=fast")


# ------------------------------------------------------------------ dalle2 eval


@pytest.fixture(scope="module")
def cascade(tmp_path_factory) -> str:
    """Untrained tiny bundles of every stage: clip, prior, decoder, and the 32->64 upsampler."""
    folder = tmp_path_factory.mktemp("eval-cascade")
    torch.manual_seed(0)
    for kind in ("clip", "prior", "decoder", "upsampler_256"):
        save_bundle(create_model(kind, "tiny"), kind, str(folder / kind), metadata={"step": 0})
    return str(folder)


def test_held_out_rows_are_the_training_validation_split(train_shapes):
    held = read_held_out(train_shapes, count=1000, validation_fraction=0.2, image_size=32, context_length=32)
    table = read_dataset(train_shapes, ["key", "caption", "image"])
    keys = table.column("key").to_numpy(zero_copy_only=False)
    assert held.keys == [str(k) for k in keys[in_validation(keys, 0.2)]]  # all of them, in file order
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    trained, _ = preprocess_batch(batch, image_size=32, context_length=32, split="train", validation_fraction=0.2)
    assert not set(held.keys) & set(trained["key"])
    assert held.labels[0].keys() == set(shapes.LABEL_COLUMNS) and held.images.shape[1:] == (32, 32, 3)
    # --split train: the other rows, for comparing generalisation with memorisation
    seen = read_held_out(train_shapes, count=1000, validation_fraction=0.2, image_size=32, context_length=32, split="train")
    assert seen.keys == [str(k) for k in trained["key"]]


def test_seed_spread_reads_copies_as_zero_and_the_datas_own_spread_as_one():
    torch.manual_seed(0)
    first = torch.rand(4, 3, 8, 8) * 2 - 1
    copies = metrics.seed_spread(first, first.clone(), (first, first + 0.2))
    assert copies["seeds"] == 0.0 and copies["ratio"] == 0.0 and copies["data"] == pytest.approx(0.1) and copies["pairs"] == 4
    assert copies["different_captions"] == pytest.approx(((first - first.roll(1, 0)).abs().mean() / 2).item())
    shifted = metrics.seed_spread(first, first + 0.2, (first, first - 0.2))
    assert shifted["seeds"] == pytest.approx(0.1) and shifted["ratio"] == pytest.approx(1.0)
    assert metrics.seed_spread(first, first + 0.4)["ratio"] is None  # no dataset yardstick given
    with pytest.raises(ValueError, match="two image sets"):
        metrics.seed_spread(first, first[:2])


def test_the_dataset_draws_a_caption_twice_with_its_own_jitter():
    labels = [dict(shape="square", color="red", size="large", position="top left", background="white"),
              dict(shape="circle", color="blue", size="large", position="center", background="black")]  # fmt: skip
    one, two = shapes.draw_twice(labels, 32)
    assert one.shape == two.shape == (2, 32, 32, 3) and one.dtype == np.uint8
    assert not np.array_equal(one, two)  # the jitter differs between draws...
    same = shapes.draw_twice(labels, 32)
    assert np.array_equal(same[0], one) and np.array_equal(same[1], two)  # ...and is a function of the seed
    # ...while the checker reads both draws as the labels (only the jitter moved)
    for draws in (one, two):
        read = [read_attributes(d) for d in draws]
        assert [(r["shape"], r["position"]) for r in read] == [("square", "top left"), ("circle", "center")]


def test_eval_command_reports_every_field(tmp_path, cascade, train_shapes):
    out = tmp_path / "eval"
    argv = ["eval", "--bundles", cascade, "--data", train_shapes, "--out", str(out), "--count", "8", "--steps", "2",
            "--validation-fraction", "0.2", "--batch-size", "4", "--json", "--quiet"]  # fmt: skip
    assert cli_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["held_out_rows"] == 8 and report["data"]["label_columns"] == list(shapes.LABEL_COLUMNS)
    assert [b["kind"] for b in report["bundles"]] == ["clip", "prior", "decoder", "upsampler_256"]
    retrieval = {f"{d}_top{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5)}
    assert set(report["clip"]) == retrieval | {"chance_top1", "text_to_image_top1_same_labels", "zero_shot"}
    assert set(report["clip"]["zero_shot"]) == set(shapes.LABEL_COLUMNS)
    assert set(report["prior"]) == {"cosine", "baseline_text_embedding", "baseline_mean_image_embedding", "beats_baselines"}
    generation = report["generation"]
    assert generation["conditioning"] == "prior" and generation["image_size"] == 64 and generation["images"] == 8
    for name in ("clip_score", "clip_score_real", "clip_fid", "clip_fid_real_halves"):
        assert isinstance(generation[name], float) and math.isfinite(generation[name]), name
    assert "Inception" in generation["fid_features"] and len(generation["captions_in_samples"]) == 8
    spread = generation["seed_spread"]  # the first 8 rows (all of them here) drawn again with another seed
    assert spread["pairs"] == 8 and spread["seeds"] > 0 and spread["data"] > 0 and spread["ratio"] == pytest.approx(spread["seeds"] / spread["data"])
    for which in ("generated", "real"):
        assert set(report["shapes_checker"][which]) == {*shapes.LABEL_COLUMNS, "shape_color_position"}
    assert report["shapes_checker"]["real"]["shape_color_position"] == 1.0  # the checker itself is right
    assert report["settings"]["steps"] == {"prior": 2, "decoder": 2, "upsampler": 2}
    assert {"load_bundles", "read_data", "clip", "prior", "generate", "score_images", "total"} <= set(report["wall_time_s"])
    for name in ("report.json", "samples.png", "clip_similarity.png"):
        assert (out / name).stat().st_size > 0
    assert Image.open(out / "samples.png").size[1] > 2 * 64  # a generated row above a real row


def test_eval_can_decode_from_the_images_own_embeddings(tmp_path, cascade, train_shapes):
    # The prior is still scored, but the decoder draws from the held-out images' CLIP embeddings:
    # what tells a prior that loses an attribute from a decoder that cannot draw it.
    settings = EvalSettings(bundles=cascade, data=train_shapes, out=str(tmp_path / "out"), count=4, steps=Steps.parse("2"),
                            validation_fraction=0.2, batch_size=4, decode_from="image")  # fmt: skip
    report = run_eval(settings)
    assert report["prior"]["cosine"] is not None and report["settings"]["decode_from"] == "image"
    assert report["generation"]["conditioning"] == "true_image_embeddings" and report["generation"]["images"] == 4
    with pytest.raises(ValueError, match="decode_from"):
        EvalSettings(bundles=cascade, data=train_shapes, decode_from="text")


def test_eval_rewrites_the_captions_in_held_out_phrasings(tmp_path, cascade, train_shapes):
    rows = read_held_out(train_shapes, count=6, validation_fraction=0.2, image_size=32, context_length=32)
    plain, held_out = rephrase(rows, "plain", 32), rephrase(rows, "held-out", 32)
    assert plain.captions == [shapes.caption(labels) for labels in rows.labels] and plain.keys == rows.keys
    assert held_out.captions == [shapes.held_out_caption(labels, key) for key, labels in zip(rows.keys, rows.labels)]
    assert torch.equal(held_out.tokens[0], tokenize([held_out.captions[0]], 32)[0]) and torch.equal(held_out.images, rows.images)
    settings = EvalSettings(bundles=cascade, data=train_shapes, out=str(tmp_path / "out"), count=4, steps=Steps.parse("2"),
                            validation_fraction=0.2, batch_size=4, phrasing="held-out")  # fmt: skip
    report = run_eval(settings)
    assert report["data"]["phrasing"] == "held-out" and report["generation"]["captions_in_samples"] == held_out.captions[:4]
    with pytest.raises(ValueError, match="phrasing"):
        EvalSettings(bundles=cascade, data=train_shapes, phrasing="poetic")


def test_eval_scores_whatever_stages_exist(tmp_path, tiny_clip_bundle, train_shapes):
    folder = os.path.dirname(tiny_clip_bundle)  # a folder with a clip bundle only
    report = run_eval(EvalSettings(bundles=folder, data=train_shapes, out=str(tmp_path / "out"), count=16, validation_fraction=0.2))
    assert report["clip"]["chance_top1"] == 1 / 16
    assert report["prior"] is None and report["generation"] is None and report["shapes_checker"] is None
    assert not (tmp_path / "out" / "samples.png").exists()
    with pytest.raises(FileNotFoundError, match="no clip bundle"):
        run_eval(EvalSettings(bundles=str(tmp_path / "out"), data=train_shapes, out=str(tmp_path / "x")))


def test_eval_reads_and_writes_object_storage(s3_server, tiny_clip_bundle):
    data, out = s3_server.uri("eval-data"), s3_server.uri("eval-out")
    shapes.write_shapes_dataset(data, count=120, image_size=32, rows_per_file=60)
    report = run_eval(EvalSettings(bundles=os.path.dirname(tiny_clip_bundle), data=data, out=out, count=8, validation_fraction=0.2))
    assert report["data"]["held_out_rows"] == 8
    assert json.loads(storage.read_bytes(storage.join(out, "report.json")))["clip"] == report["clip"]


def _train_clip(data_uri: str, steps: int) -> torch.nn.Module:
    """The tiny CLIP trained on the training split in-process (plain torch, as tests/test_clip.py)."""
    torch.manual_seed(0)
    clip = create_model("clip", "tiny")
    table = read_dataset(data_uri, ["key", "caption", "image"])
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    rows, _ = preprocess_batch(batch, image_size=32, context_length=clip.config.context_length, split="train", validation_fraction=0.1)
    images, tokens = to_model_images(torch.from_numpy(rows["image"])), torch.from_numpy(rows["tokens"])
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.1)
    loss_fn, generator = ContrastiveLoss(), torch.Generator().manual_seed(0)
    for _ in range(steps):
        picked = torch.randint(len(images), (32,), generator=generator)
        image_features, text_features = clip(images[picked], tokens[picked])
        loss = loss_fn(image_features, text_features, clip.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return clip.eval()


@pytest.mark.slow
def test_eval_tells_a_trained_clip_from_an_untrained_one(tmp_path):
    data = str(tmp_path / "shapes")
    shapes.write_shapes_dataset(data, count=800, image_size=32)
    torch.manual_seed(0)
    untrained = create_model("clip", "tiny")  # the initialisation the trained one starts from
    trained = _train_clip(data, steps=100)  # ~20 s
    scores = {}
    for name, model in (("untrained", untrained), ("trained", trained)):
        save_bundle(model, "clip", str(tmp_path / name / "clip"))
        report = run_eval(EvalSettings(bundles=str(tmp_path / name), data=data, out=str(tmp_path / f"{name}-eval"), count=64, validation_fraction=0.1))
        scores[name] = (report["clip"]["text_to_image_top5"] + report["clip"]["image_to_text_top5"]) / 2
    # Measured: trained ~0.49, untrained ~0.05 (chance 5/64 = 0.08).
    assert scores["trained"] >= 0.3 and scores["trained"] >= 3 * scores["untrained"], scores


def test_sweep_scores_each_setting_and_calls_equal_what_is_within_the_noise(tmp_path, cascade, train_shapes):
    from dalle2.eval import sweep

    out = tmp_path / "sweep"
    argv = ["--bundles", cascade, "--data", train_shapes, "--out", str(out), "--count", "4", "--batch-size", "4",
            "--setting", "ddim:2,3,2", "--setting", "dpmpp_2m:2,2,2", "--seeds", "0", "1"]  # fmt: skip
    assert sweep.main(argv) == 0
    result = json.loads((out / "sweep.json").read_text())
    rows = result["rows"]
    assert [(r["sampler"], r["seed"], r["baseline"], r["evaluations"]) for r in rows] == [
        ("ddim", 0, True, 5), ("ddim", 1, True, 5), ("dpmpp_2m", 0, False, 4)]  # the baseline with each seed
    assert all(isinstance(r["equal"], bool) for r in rows) and result["noise"]["all_three_right"]["noise"] > 0
    assert result["noise"]["clip_score"]["standard_error"] > 0  # the per-image spread of the report / sqrt(count)
    assert "within noise" in (out / "sweep.md").read_text() and Image.open(out / "sweep.png").size == (900, 360)
    (out / "sweep.md").unlink()
    assert sweep.main(["--out", str(out), "--table"]) == 0 and (out / "sweep.md").exists()  # the table again, from sweep.json
    # the rule: no score more than 2 noise units worse than the baseline's mean (FID: higher is worse)
    synthetic = [{"all_three_right": 0.80, "clip_score": 0.84, "baseline": True}, {"all_three_right": 0.84, "clip_score": 0.84, "baseline": True},
                 {"all_three_right": 0.77, "clip_score": 0.84, "baseline": False}, {"all_three_right": 0.70, "clip_score": 0.84, "baseline": False},
                 {"all_three_right": 0.82, "clip_score": 0.80, "baseline": False}]  # fmt: skip
    for row in synthetic:
        row.update(clip_score_std=0.05, clip_fid=0.03)
    synthetic[-1]["clip_fid"] = 0.05
    noise = sweep.mark_noise(synthetic, count=400)
    rate = noise["all_three_right"]
    assert rate["seed_std"] == pytest.approx(0.0283, abs=1e-4) and rate["standard_error"] == pytest.approx(0.0192, abs=1e-4)
    assert rate["noise"] == rate["seed_std"]  # the larger of the two
    assert noise["clip_score"]["noise"] == pytest.approx(0.05 / 20)  # the seeds agree: the standard error
    # 0.82 - 0.77 <= 2 x 0.0283 < 0.82 - 0.70; the last is as right but its CLIP score and FID are worse
    assert [r["equal"] for r in synthetic] == [True, True, True, False, False]
