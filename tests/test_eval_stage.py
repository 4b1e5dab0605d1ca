"""The pipeline's quality check (jobs/eval_stage.py): `dalle2 eval` per phrasing, printed beside
the targets, and read back instead of run again on a rerun."""

import os

import pytest
import torch

from dalle2.bundle import save_bundle
from dalle2.data import shapes
from dalle2.factory import create_model
from dalle2.console import Console
from jobs.eval_stage import TARGETS, EvalSpec, quality_lines, stage_eval
from jobs.stages import PipelineConfig, StageSpec


def _report(shape: float, clip_score: float = 0.9) -> dict:
    accuracy = {"color": 1.0, "shape": shape, "position": 0.95, "size": 1.0, "background": 1.0, "shape_color_position": shape * 0.95}
    zero_shot = {"color": 1.0, "shape": 0.97, "position": 0.49, "size": 1.0, "background": 1.0}
    spread = {"pairs": 32, "seeds": 0.02, "different_captions": 0.2, "data": 0.025, "ratio": 0.8}
    generation = {"clip_score": clip_score, "seed_spread": spread}
    return {"shapes_checker": {"generated": accuracy}, "generation": generation, "clip": {"zero_shot": zero_shot}}


def test_quality_lines_put_each_phrasing_beside_the_targets():
    lines = quality_lines({"dataset": _report(0.85), "held-out": _report(0.55, 0.8)})
    assert "seen phrasings" in lines[0] and "held-out phrasings" in lines[0] and "target" in lines[0]
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert by_name["color"].split()[1:3] == ["1.00", "1.00"] and by_name["color"].endswith(f">= {TARGETS['color']:.2f} met")
    assert by_name["shape"].split()[1:3] == ["0.85", "0.55"] and by_name["shape"].endswith("NOT MET")  # one phrasing below
    assert "0.800" in by_name["CLIP"] and "all three right" in lines[4]
    assert by_name["zero-shot"].split()[2:5] == ["1.00", "0.97", "0.49"]  # what CLIP tells apart: color, shape, position
    assert by_name["seeds"].split()[3:5] == ["0.80", "0.80"]  # a caption's seeds differ 0.8x as much as the data's draws


def test_eval_stage_scores_each_phrasing_and_reads_it_back(tmp_path, capsys):
    workdir = tmp_path / "work"
    shapes.write_shapes_dataset(str(workdir / "data"), count=160, image_size=32, rows_per_file=80)
    torch.manual_seed(0)
    for kind in ("clip", "prior", "decoder"):
        save_bundle(create_model(kind, "tiny"), kind, str(workdir / "bundles" / kind), metadata={"step": 0})
    config = PipelineConfig(workdir=str(workdir), clip=StageSpec(config="c.yaml"), prior=StageSpec(config="p.yaml"),
                            decoder=StageSpec(config="d.yaml"), eval=EvalSpec(count=4, batch_size=4, steps="2"))  # fmt: skip
    console = Console()  # no log folder: our lines on stdout
    folder = stage_eval(config, config.eval, 0.2, console)
    text = capsys.readouterr().out
    assert "== eval: dalle2 eval on 4 held-out rows per phrasing (dataset, held-out)" in text
    assert "seen phrasings" in text and "held-out phrasings" in text and ">= 0.80" in text
    reports = [os.path.join(folder, phrasing, "report.json") for phrasing in ("dataset", "held-out")]
    stamps = [os.stat(path).st_mtime_ns for path in reports]
    stage_eval(config, config.eval, 0.2, console)  # a rerun reads the reports: nothing generated again
    assert [os.stat(path).st_mtime_ns for path in reports] == stamps
    with pytest.raises(ValueError, match="phrasings"):
        EvalSpec(phrasings=("sung",))
