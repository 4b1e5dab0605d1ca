"""Every preset builds (meta device for the big ones) and lands on its parameter budget."""

import json

import pytest
import torch

from dalle2.cli import main as cli_main
from dalle2.config import PRESETS, PriorConfig, from_dict, to_dict
from dalle2.factory import available_kinds, create_model, load_config, parameter_counts

# Ramesh et al. 2022, Table 3 (and section 2): the paper's model sizes.
PAPER_SIZES = {"prior": 1.0e9, "decoder": 3.5e9, "upsampler_256": 700e6, "upsampler_1024": 300e6}
TINY_LIMIT = 5_000_000  # each tiny model trains on a 2-core CPU


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_on_meta(preset):
    counts = parameter_counts(preset, device="meta")
    assert {"clip", "prior"} <= set(counts)
    assert all(n > 0 for n in counts.values())


def test_tiny_models_are_tiny_and_build_for_real():
    for kind in available_kinds("tiny"):
        model = create_model(kind, "tiny")
        n = sum(p.numel() for p in model.parameters())
        assert n < TINY_LIMIT, f"tiny {kind} has {n:,} parameters"
        assert next(model.parameters()).device.type == "cpu"


def test_paper_preset_matches_the_paper_within_15_percent():
    counts = parameter_counts("paper", device="meta")
    for kind, size in PAPER_SIZES.items():
        if kind in counts:
            assert abs(counts[kind] - size) / size <= 0.15, f"{kind}: {counts[kind]:,} vs paper {size:,.0f}"


def test_presets_grow():
    sizes = [parameter_counts(p)["prior"] for p in PRESETS]
    assert sizes == sorted(sizes)


def test_prior_inherits_clip_sizes_written_once():
    clip, prior = load_config("clip", "tiny"), load_config("prior", "tiny")
    assert (prior.embed_dim, prior.text_width, prior.context_length) == (clip.embed_dim, clip.text_width, clip.context_length)


def test_config_round_trips_through_json():
    prior = load_config("prior", "small")
    assert from_dict(PriorConfig, json.loads(json.dumps(to_dict(prior)))) == prior


def test_unknown_preset_and_key_are_clear_errors():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_config("prior", "huge")
    with pytest.raises(ValueError, match="unknown config keys \\['depth'\\]"):
        from_dict(PriorConfig, {"width": 8, "layers": 1, "heads": 1, "depth": 3})


def test_info_command_prints_counts_as_json(capsys):
    assert cli_main(["info", "--preset", "paper", "--compact"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["prior"] == parameter_counts("paper")["prior"]
    assert counts["clip"] > 900_000_000  # ViT-H/16, the CLIP the paper's models use


def test_meta_models_hold_no_memory():
    model = create_model("prior", "paper", device="meta")
    assert all(p.device == torch.device("meta") for p in model.parameters())
