"""Sampler and step-count sweep: ``dalle2 eval`` at each setting, one table and one plot.

    python -m dalle2.eval.sweep --bundles runs/demo/bundles --data runs/demo/data --out docs/sampler-sweep \\
        --count 64 --setting ddim:32,25,27 --setting dpmpp_2m:10,10,10 ... [--seeds 0 1]

Each setting is ``SAMPLER:PRIOR,DECODER,UPSAMPLER`` steps; every setting is scored with the same
held-out rows and the same seeds, so the only differences are the sampler and the steps. The noise of
a score is read off the baseline (the first setting) scored with each seed: two seeds of one setting
differ only by sampling noise, and a setting is "equal" to the baseline when its score lies within
that spread. Writes ``sweep.json``, ``sweep.md`` (a Markdown table) and ``sweep.png`` (the
all-three-right rate and the CLIP score against network evaluations per image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Optional, Sequence

from PIL import Image, ImageDraw

from dalle2.data import storage
from dalle2.eval.run import EvalSettings, Samplers, Steps, run_eval


def parse_setting(text: str) -> tuple[str, tuple[int, int, int]]:
    sampler, _, steps = text.partition(":")
    numbers = tuple(int(n) for n in steps.split(","))
    if len(numbers) != 3:
        raise ValueError(f"bad setting {text!r}: give SAMPLER:PRIOR,DECODER,UPSAMPLER")
    return sampler, numbers  # type: ignore[return-value]


def evaluations(steps: tuple[int, int, int], stages: set[str]) -> int:
    """Network evaluations per image of the decoder and upsampler (the prior's are ~100x cheaper),
    or of the prior when it is the only diffusion stage."""
    if "decoder" not in stages:
        return steps[0]
    return steps[1] + (steps[2] if "upsampler" in stages else 0)


def scores(report: dict[str, Any]) -> dict[str, Optional[float]]:
    generation, checker = report["generation"] or {}, report["shapes_checker"]
    return {
        "all_three_right": checker["generated"]["shape_color_position"] if checker else None,
        "clip_score": generation.get("clip_score"),
        "clip_score_std": generation.get("clip_score_std"),
        "clip_fid": generation.get("clip_fid"),
        "prior_cosine": report["prior"]["cosine"] if report["prior"] else None,
        "seconds": report["wall_time_s"].get("generate", 0.0) + report["wall_time_s"].get("prior", 0.0),
    }


# The scores a setting must keep, and which way is better (FID: lower).
SCORES = {"all_three_right": 1, "clip_score": 1, "clip_fid": -1}


def mark_noise(rows: list[dict[str, Any]], count: int) -> dict[str, dict[str, float]]:
    """Mark each row ``equal`` when none of its scores is worse than the baseline's mean by more
    than 2 noise units, and return each score's baseline mean and noise. A score's noise is the
    larger of the baseline seeds' standard deviation (sampling noise, measured; two or three seeds
    can understate it) and its standard error on ``count`` captions where that is known: binomial
    for the all-three-right rate, the per-image spread / sqrt(count) for the CLIP score (reports
    carry ``clip_score_std``). The difference of two independent such scores has sqrt(2) of it, so
    2 units is about a 1.4-sigma bound: a setting called equal is not measurably worse at this count."""
    import statistics

    noise: dict[str, dict[str, float]] = {}
    for name in SCORES:
        baseline_rows = [r for r in rows if r["baseline"] and r.get(name) is not None]
        if not baseline_rows:
            continue
        values = [r[name] for r in baseline_rows]
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        floor = 0.0
        if name == "all_three_right":
            floor = math.sqrt(max(mean * (1 - mean), 1e-6) / count)
        elif name == "clip_score" and all(r.get("clip_score_std") is not None for r in baseline_rows):
            floor = statistics.fmean(r["clip_score_std"] for r in baseline_rows) / math.sqrt(count)
        noise[name] = {"baseline_mean": mean, "seed_std": spread, "standard_error": floor, "noise": max(spread, floor)}
    for r in rows:
        r["equal"] = all(SCORES[name] * (n["baseline_mean"] - r[name]) <= 2 * n["noise"] for name, n in noise.items() if r.get(name) is not None)
    return noise


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """All-three-right rate (left) and CLIP score (right) against evaluations per image, one
    polyline per sampler, the baseline's seed spread as a band. Drawn with PIL (no plotting library)."""
    width, height, margin = 900, 360, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    colors = {"ddim": (200, 60, 40), "dpmpp_2m": (40, 90, 200), "ddpm": (60, 150, 60)}
    max_x = max(r["evaluations"] for r in rows) * 1.05
    metrics = ("all_three_right", "clip_score") if any(r["clip_score"] is not None for r in rows) else ("prior_cosine",)
    for panel, metric in enumerate(metrics):
        values = [r[metric] for r in rows if r[metric] is not None]
        if not values:
            continue
        low, high = min(values) - 0.02, max(values) + 0.02
        left, right = margin + panel * width // 2, (panel + 1) * width // 2 - 20
        top, bottom = 30, height - margin

        def xy(x: float, y: float) -> tuple[float, float]:
            return left + (right - left) * x / max_x, bottom - (bottom - top) * (y - low) / (high - low)

        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 8), f"{metric} vs evaluations per image", fill="black")
        draw.text((left - 40, top), f"{high:.2f}", fill="black")
        draw.text((left - 40, bottom - 10), f"{low:.2f}", fill="black")
        draw.text((right - 30, bottom + 5), f"{max_x:.0f}", fill="black")
        baseline = [r[metric] for r in rows if r["baseline"]]
        if len(baseline) > 1:
            (_, y0), (_, y1) = xy(0, max(baseline)), xy(0, min(baseline))
            draw.rectangle([left + 1, y0, right - 1, y1], fill=(235, 235, 235))
        for sampler, color in colors.items():
            points = sorted((r["evaluations"], r[metric]) for r in rows if r["sampler"] == sampler and r[metric] is not None)
            if not points:
                continue
            draw.line([xy(*p) for p in points], fill=color, width=2)
            for p in points:
                x, y = xy(*p)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            draw.text((right - 70, top + 10 + 14 * list(colors).index(sampler)), sampler, fill=color)
    image.save(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundles")
    parser.add_argument("--data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=None, help="held-out captions per setting (default 64; with --table: the sweep's)")
    parser.add_argument("--setting", action="append", help="SAMPLER:PRIOR,DECODER,UPSAMPLER; the first is the baseline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the baseline runs with each; the others with the first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--table", action="store_true", help="no scoring: the table, plot and marks again from OUT/sweep.json")
    args = parser.parse_args(argv)
    if args.table:
        saved = json.loads(storage.read_bytes(storage.join(args.out, "sweep.json")))
        write_outputs(saved["rows"], args.out, args.count or saved.get("count") or 64)
        return 0
    if not (args.bundles and args.data and args.setting):
        parser.error("--bundles, --data and at least one --setting are needed (or --table)")
    args.count = args.count or 64
    rows = []
    for index, text in enumerate(args.setting):
        sampler, steps = parse_setting(text)
        for seed in args.seeds if index == 0 else args.seeds[:1]:
            settings = EvalSettings(
                bundles=args.bundles, data=args.data, out=os.path.join(args.out, f"{sampler}-{'-'.join(map(str, steps))}-seed{seed}"),
                count=args.count, steps=Steps(*steps), samplers=Samplers(sampler, sampler, sampler), seed=seed, batch_size=args.batch_size,
            )  # fmt: skip
            report = run_eval(settings)
            stages = {b["kind"].split("_")[0] for b in report["bundles"]}
            row = {"sampler": sampler, "steps": steps, "seed": seed, "baseline": index == 0,
                   "evaluations": evaluations(steps, stages), **scores(report)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_outputs(rows, args.out, args.count)
    return 0


def write_outputs(rows: list[dict[str, Any]], out: str, count: int) -> None:
    """sweep.json, sweep.md and sweep.png from the scored rows (also from a sweep.json again:
    ``--table``, when the rule or the table changes and the scores do not)."""
    noise = mark_noise(rows, count)
    storage.write_bytes(storage.join(out, "sweep.json"), json.dumps({"rows": rows, "noise": noise, "count": count}, indent=2).encode())
    lines = [
        "| sampler | steps (prior, decoder, upsampler) | seed | evaluations / image | all three right | CLIP score | CLIP-feature FID | prior cosine | s | within noise |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        shown = {k: ("" if r[k] is None else f"{r[k]:.{digits}f}") for k, digits in
                 (("all_three_right", 3), ("clip_score", 3), ("clip_fid", 4), ("prior_cosine", 4))}  # fmt: skip
        lines.append(
            f"| {r['sampler']} | {', '.join(map(str, r['steps']))} | {r['seed']} | {r['evaluations']} | {shown['all_three_right']} | "
            f"{shown['clip_score']} | {shown['clip_fid']} | {shown['prior_cosine']} | {r['seconds']:.0f} | {'yes' if r['equal'] else 'no'} |"
        )
    lines.append("")
    for name, n in noise.items():
        lines.append(f"- {name}: baseline {n['baseline_mean']:.4f}, noise {n['noise']:.4f} (seed std {n['seed_std']:.4f}, "
                     f"standard error at {count} captions {n['standard_error']:.4f})")  # fmt: skip
    lines.append("- within noise: no score more than 2 noise units worse than the baseline's mean")
    storage.write_bytes(storage.join(out, "sweep.md"), ("\n".join(lines) + "\n").encode())
    plot(rows, os.path.join(out, "sweep.png"))
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
