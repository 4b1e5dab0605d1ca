"""`dalle2 clip bundle`: a stock open_clip architecture (ViT-S-32, built randomly and saved as an
open_clip checkpoint file, as a downloaded one would be) becomes a CLIP bundle whose embeddings
are open_clip's own for that file; the prior and decoder jobs train on it."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from dalle2.bundle import load_bundle, read_bundle_header
from dalle2.cli import main
from dalle2.clip import IMAGE_MEAN, IMAGE_STD, tokenize

MODEL = "ViT-S-32"  # the smallest stock ViT of open_clip (63M parameters)


@pytest.fixture(scope="module")
def pretrained_bundle(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("open-clip")
    torch.manual_seed(0)
    reference = open_clip.create_model(MODEL).eval()
    checkpoint = folder / "ViT-S-32-random.pt"
    torch.save({"state_dict": reference.state_dict()}, checkpoint)  # open_clip's checkpoint layout
    out = str(folder / "bundle")
    assert main(["clip", "bundle", "--model", MODEL, "--pretrained", str(checkpoint), "--out", out]) == 0
    return out, reference


def test_the_bundles_embeddings_are_open_clips_own(pretrained_bundle, capsys):
    out, reference = pretrained_bundle
    header = read_bundle_header(out)
    assert header["kind"] == "clip" and header["config"]["pretrained"] is None  # the weights are in the bundle
    assert header["metadata"]["open_clip_model"] == MODEL
    clip = load_bundle(out).model.eval()
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [-1, 1]
    tokens = tokenize(["a red circle", "a photo of a cat"], 77)
    with torch.inference_mode():
        expected_image = reference.encode_image(((images + 1) / 2 - IMAGE_MEAN) / IMAGE_STD)
        expected_text = reference.encode_text(tokens)
        torch.testing.assert_close(clip.encode_image(images), expected_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clip.encode_text(tokens).embed, expected_text, atol=1e-5, rtol=1e-5)


def test_clip_bundle_errors(tmp_path, capsys):
    assert main(["clip", "bundle", "--model", MODEL, "--pretrained", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert main(["clip", "bundle", "--model", "ViT-Nope", "--pretrained", "x", "--out", str(tmp_path / "b")]) == 2


@pytest.mark.slow
def test_prior_and_decoder_train_on_the_pretrained_clip(pretrained_bundle, ray_cluster, train_shapes, tmp_path):
    from dalle2.train.config import load_job_config
    from dalle2.train.launch import run_job

    out, _ = pretrained_bundle
    for job in ("prior", "decoder"):
        config = load_job_config(job, overrides={
            "clip": out, "data": {"path": train_shapes},
            "run": {"storage": str(tmp_path / "runs"), "name": job},
            "loop": {"max_steps": 2, "batch_size": 4, "log_every": 1, "val_batches": 0, "checkpoint_every": 0,
                     "sample_count": 0, "prior_stats_batches": 1},
            "scaling": {"workers": 1, "cpus_per_worker": 0.5},
        })  # fmt: skip
        result = run_job(config)
        assert result.metrics["step"] == 2 and result.metrics["loss"] == result.metrics["loss"]  # finite, not NaN
        run_config = json.loads(open(f"{result.checkpoint_uri}/job.json").read())
        assert run_config["model_config"]["embed_dim"] == 384  # sized by the pretrained CLIP
