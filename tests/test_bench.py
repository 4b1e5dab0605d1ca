"""`dalle2 bench models`: the report's shape and the peers' sizes. No timed assertions: timings
depend on the machine; these tests only check that every figure is produced and positive."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from dalle2.bench import BENCH_KINDS
from dalle2.bench.cli import add_bench_commands, add_models_command

FAST = ["--repeats", "1", "--warmup", "0", "--steps", "1", "--batch", "2", "--sample-batch", "1", "--threads", "1", "--quiet"]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dalle2")
    add_bench_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_bench_models_json_without_peers(capsys):
    assert run_cli(["bench", "models", "--preset", "tiny", "--json", "--no-peers", *FAST]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"machine", "settings", "models"}  # no comparisons without peers
    assert result["settings"]["preset"] == "tiny"
    assert list(result["models"]) == list(BENCH_KINDS)
    for kind, entry in result["models"].items():
        assert entry["parameters"] > 0, kind
        assert entry["config"], kind
        assert entry["train"]["items_per_s"] > 0 and entry["train"]["batch"] == 2, kind
        assert entry["train"]["unit"] == ("embeddings/s" if kind == "prior" else "images/s")
        assert entry["inference"]["latency_s"] > 0, kind
    assert result["models"]["decoder"]["config"]["image_size"] == 32  # the preset's own config is reported


def test_missing_peers_say_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dalle2_pytorch", None)  # makes `import dalle2_pytorch` fail
    assert run_cli(["bench", "models", "--preset", "tiny", "--models", "prior", *FAST]) == 2
    message = capsys.readouterr().err
    assert "pip install" in message and ".[bench]" in message and "--no-peers" in message


def test_bench_group_takes_more_subcommands():
    def add_data_benchmark(bench_commands):
        bench_commands.add_parser("data").set_defaults(func=lambda args: "data ran")

    parser = argparse.ArgumentParser(prog="dalle2")
    bench_commands = add_bench_commands(parser.add_subparsers(dest="command"), registrars=[add_models_command, add_data_benchmark])
    assert parser.parse_args(["bench", "data"]).func(None) == "data ran"
    assert parser.parse_args(["bench", "models", "--no-peers"]).preset == "tiny"
    bench_commands.add_parser("serve")  # modules that come later register on the returned group
    assert parser.parse_args(["bench", "serve"]).bench_command == "serve"


def test_peers_match_our_parameter_counts():
    pytest.importorskip("dalle2_pytorch")
    pytest.importorskip("diffusers")
    from dalle2.bench.comparisons import comparison_decoder_config
    from dalle2.bench.peers import PARAM_TOLERANCE, diffusers_unclip, lucidrains_decoder, parameter_count
    from dalle2.factory import create_model, load_config

    clip, prior = load_config("clip", "tiny"), load_config("prior", "tiny")
    decoder = comparison_decoder_config(load_config("decoder", "tiny"))
    assert decoder.image_size == 64 and decoder.unet.attention_resolutions == (32, 16)  # same attended levels at 64px
    ours = {"text_encoder": 0, "prior": parameter_count(create_model("prior", prior)), "decoder": parameter_count(create_model("decoder", decoder))}
    peer, _ = lucidrains_decoder(decoder, clip.text_width, clip.context_length, "params", ours["decoder"])
    assert abs(parameter_count(peer) - ours["decoder"]) <= PARAM_TOLERANCE * ours["decoder"]

    ours["text_encoder"] = sum(
        p.numel() for n, p in create_model("clip", clip).model.named_parameters() if not n.startswith(("visual.", "logit_"))
    )
    pipeline, configs, counts = diffusers_unclip(clip, prior, decoder, "params", ours)
    for stage, count in counts.items():
        assert abs(count - ours[stage]) <= PARAM_TOLERANCE * ours[stage], stage
    assert pipeline.decoder.config.sample_size == 64
    assert pipeline.tokenizer(["a red cube"]).input_ids[0][:3] == [49406, 320, 736]  # open_clip's BPE ids
