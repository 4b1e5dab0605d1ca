"""Model bundles: config + safetensors + stats; the bundle alone rebuilds the model."""

import json

import pytest
import torch

from dalle2.bundle import BundleError, load_bundle, save_bundle
from dalle2.factory import create_model, load_config


def _trained_prior():
    torch.manual_seed(0)
    prior = create_model("prior", "tiny")
    prior.fit_embedding_stats(torch.randn(32, prior.config.embed_dim) * 3 + 1)
    return prior.eval()


def _prior_output(prior):
    text = torch.randn(2, prior.config.embed_dim, generator=torch.Generator().manual_seed(0))
    return prior.sample(text, steps=4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scheme", ["path", "file"])
def test_prior_round_trip_gives_identical_outputs(tmp_path, scheme):
    prior = _trained_prior()
    uri = str(tmp_path / "prior") if scheme == "path" else f"file://{tmp_path}/prior"
    save_bundle(prior, "prior", uri, metadata={"run": "test"})
    bundle = load_bundle(uri)
    assert bundle.kind == "prior" and bundle.config == prior.config
    assert bundle.metadata["run"] == "test"
    torch.testing.assert_close(bundle.model.image_std, prior.image_std)  # the stats travel too
    assert torch.equal(_prior_output(bundle.model), _prior_output(prior))


def test_clip_round_trip_gives_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    clip = create_model("clip", "tiny").eval()
    save_bundle(clip, "clip", str(tmp_path / "clip"))
    loaded = load_bundle(str(tmp_path / "clip")).model
    tokens = clip.tokenize(["a red circle"])
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode_text(tokens).embed, clip.encode_text(tokens).embed)
    assert torch.equal(loaded.encode_image(images), clip.encode_image(images))


def test_round_trip_through_s3(s3_server):
    prior = _trained_prior()
    uri = s3_server.uri("bundles") + "/prior"
    save_bundle(prior, "prior", uri)
    assert torch.equal(_prior_output(load_bundle(uri).model), _prior_output(prior))


def test_missing_files_are_named(tmp_path):
    uri = str(tmp_path / "prior")
    save_bundle(_trained_prior(), "prior", uri)
    (tmp_path / "prior" / "stats.safetensors").unlink()
    with pytest.raises(BundleError, match="stats.safetensors: missing"):
        load_bundle(uri)
    (tmp_path / "prior" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors: missing"):
        load_bundle(uri)
    with pytest.raises(BundleError, match="config.json: missing"):
        load_bundle(str(tmp_path / "nowhere"))


def test_config_that_does_not_match_the_weights_is_explained(tmp_path):
    uri = tmp_path / "prior"
    save_bundle(_trained_prior(), "prior", str(uri))
    header = json.loads((uri / "config.json").read_text())
    header["config"]["width"] = 96  # the weights were trained at 128
    (uri / "config.json").write_text(json.dumps(header))
    with pytest.raises(BundleError, match="weights do not match the bundle's config: shape mismatch"):
        load_bundle(str(uri))


def test_unknown_kind_and_bad_config_keys_are_clear(tmp_path):
    uri = tmp_path / "prior"
    save_bundle(_trained_prior(), "prior", str(uri))
    header = json.loads((uri / "config.json").read_text())
    (uri / "config.json").write_text(json.dumps({**header, "kind": "vae"}))
    with pytest.raises(BundleError, match="unknown model kind 'vae'"):
        load_bundle(str(uri))
    header["config"]["depth"] = 3
    (uri / "config.json").write_text(json.dumps(header))
    with pytest.raises(BundleError, match="unknown config keys"):
        load_bundle(str(uri))


def test_bundle_config_is_the_models_own(tmp_path):
    prior = _trained_prior()
    save_bundle(prior, "prior", str(tmp_path / "p"))
    header = json.loads((tmp_path / "p" / "config.json").read_text())
    assert header["config"]["embed_dim"] == load_config("clip", "tiny").embed_dim
