"""The pipeline's quality check: ``dalle2 eval`` on the trained bundles, printed beside the targets.

Runs after the training stages (outside their time budget) on the held-out rows, once with the
rows' own captions and once with captions said in word orders and phrasings no training row
uses (``dalle2 eval --phrasing held-out``), so a run shows whether its models read a caption
or memorised its forms. Each phrasing's report lands in ``<workdir>/eval/<phrasing>/``; a
rerun reads it instead of generating again. Split from :mod:`jobs.stages` like the serve stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dalle2.data import storage
from dalle2.console import Console

# The quality issue's targets for the independent checker on images generated from held-out
# captions (issue 8; shape is aimed at 0.8 so that a stricter reader still finds 0.7).
TARGETS = {"color": 0.9, "shape": 0.8, "position": 0.7}


@dataclass(frozen=True)
class EvalSpec:
    count: int = 64  # held-out rows per phrasing
    phrasings: tuple[str, ...] = ("dataset", "held-out")
    batch_size: int = 32
    steps: str = ""  # sampling steps as `dalle2 eval --steps` takes them; "" = dalle2 generate's defaults

    def __post_init__(self) -> None:
        from dalle2.data.shapes import PHRASINGS

        if self.count < 2 or not self.phrasings or not set(self.phrasings) <= set(PHRASINGS):
            raise ValueError(f"eval: need count >= 2 and phrasings among {', '.join(PHRASINGS)}, got {self.count}, {self.phrasings}")


def _report(config, spec: EvalSpec, phrasing: str, validation_fraction: float) -> dict[str, Any]:
    from dalle2.eval.run import EvalSettings, Steps, run_eval

    out = storage.join(config.workdir, "eval", phrasing)
    done = storage.join(out, "report.json")
    if storage.exists(done):
        return json.loads(storage.read_bytes(done))
    settings = EvalSettings(
        bundles=storage.join(config.workdir, "bundles"), data=config.data_uri, out=out, count=spec.count,
        validation_fraction=validation_fraction, batch_size=spec.batch_size, phrasing=phrasing, steps=Steps.parse(spec.steps),
    )  # fmt: skip
    return run_eval(settings)


def _cell(report: dict[str, Any], name: str) -> str:
    checker = report.get("shapes_checker")
    return f"{checker['generated'][name]:.2f}" if checker else "-"


def quality_lines(reports: dict[str, dict[str, Any]]) -> list[str]:
    """The checker's accuracy per phrasing beside the targets, one attribute per line."""
    names = {"dataset": "seen phrasings", "plain": "plain captions", "held-out": "held-out phrasings"}
    columns = [names[p] for p in reports]
    lines = ["".join(f"{c:>20}" for c in ["", *columns, "target"])]
    for name, target in [*TARGETS.items(), ("shape_color_position", None)]:
        cells = [_cell(r, name) for r in reports.values()]
        verdict = ""
        if target is not None:
            met = all(c != "-" and float(c) >= target for c in cells)
            verdict = f">= {target:.2f} {'met' if met else 'NOT MET'}"
        label = "all three right" if name == "shape_color_position" else name
        lines.append("".join(f"{c:>20}" for c in [label, *cells, verdict]))
    scores = [f"{r['generation']['clip_score']:.3f}" if r.get("generation") else "-" for r in reports.values()]
    lines.append("".join(f"{c:>20}" for c in ["CLIP score", *scores, ""]))
    # Do a caption's seeds differ? Their mean pixel difference over the dataset's own for one caption.
    spreads = [(r.get("generation") or {}).get("seed_spread") or {} for r in reports.values()]
    ratios = [f"{s['ratio']:.2f}" if s.get("ratio") is not None else "-" for s in spreads]
    lines.append("".join(f"{c:>20}" for c in ["seeds vs data", *ratios, "1 = as varied"]))
    # What CLIP itself tells apart: the decoder draws from CLIP's image embedding (and the caption),
    # and an attribute CLIP has not learned yet (position, after too few CLIP steps) it drew badly.
    known = [" ".join(f"{r['clip']['zero_shot'][n]:.2f}" for n in ("color", "shape", "position")) if "zero_shot" in r.get("clip", {}) else "-"
             for r in reports.values()]  # fmt: skip
    lines.append("".join(f"{c:>20}" for c in ["zero-shot c/s/p", *known, "CLIP alone"]))
    return lines


def stage_eval(config, spec: EvalSpec, validation_fraction: float, console: Console) -> str:
    """Score the bundles per phrasing and print the table; returns the eval folder."""
    folder = storage.join(config.workdir, "eval")
    console.header(
        f"eval: dalle2 eval on {spec.count} held-out rows per phrasing ({', '.join(spec.phrasings)})",
        what="the independent shapes checker reads each generated image back (dalle2/eval/shapes_checker.py)",
        out=folder, log=console.section("eval"),
    )  # fmt: skip
    reports = {phrasing: _report(config, spec, phrasing, validation_fraction) for phrasing in spec.phrasings}
    for line in quality_lines(reports):
        console.say(line)
    return folder
