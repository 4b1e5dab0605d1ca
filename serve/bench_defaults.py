"""``dalle2 bench serve --runs defaults``: the served cascade's latency at the API's default
samplers and steps against the defaults before issue 23 (DDIM: 32 prior, 25 decoder, 27
upsampler steps), one request at a time, the two kinds interleaved on the same app so that the
machine's drift falls on both alike. Split from :mod:`serve.bench` to keep each module small.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from serve.bench import percentile

# The fields a body sets to get the old defaults back; the new ones are what a body leaves out.
OLD_DEFAULTS = {
    "prior_sampler": "ddim", "prior_steps": 32, "decoder_sampler": "ddim", "decoder_steps": 25,
    "upsampler_sampler": "ddim", "upsampler_steps": 27,
}  # fmt: skip


def measure_defaults(requests: int, post: Callable[[dict], Any]) -> dict[str, Any]:
    """p50 and p95 HTTP seconds of ``requests`` requests of each kind; ``post(extra_fields)``
    sends one text -> image request with those fields added to the bench's body."""
    from dalle2.cascade import GenerationOptions

    post({}).raise_for_status()  # warm-up, both kinds
    post(OLD_DEFAULTS).raise_for_status()
    times: dict[str, list[float]] = {"new": [], "old": []}
    for index in range(2 * requests):
        kind = ("new", "old")[index % 2]
        started = time.perf_counter()
        post({} if kind == "new" else OLD_DEFAULTS).raise_for_status()
        times[kind].append(time.perf_counter() - started)
    new = GenerationOptions()
    return {
        "requests_each": requests,
        "new_defaults": {stage: f"{getattr(new, stage).sampler} {getattr(new, stage).steps}" for stage in ("prior", "decoder", "upsampler")},
        "old_defaults": {stage: f"{OLD_DEFAULTS[stage + '_sampler']} {OLD_DEFAULTS[stage + '_steps']}" for stage in ("prior", "decoder", "upsampler")},
        **{f"{kind}_p50_s": statistics.median(values) for kind, values in times.items()},
        **{f"{kind}_p95_s": percentile(values, 0.95) for kind, values in times.items()},
        "speedup_p50": statistics.median(times["old"]) / statistics.median(times["new"]),
    }  # fmt: skip


def summary_line(result: dict[str, Any]) -> str:
    new = ", ".join(f"{stage} {text}" for stage, text in result["new_defaults"].items())
    old = ", ".join(f"{stage} {text}" for stage, text in result["old_defaults"].items())
    return (
        f"defaults    p50 {result['new_p50_s'] * 1000:.0f} ms at the defaults ({new}) vs {result['old_p50_s'] * 1000:.0f} ms at the "
        f"old ({old}): {result['speedup_p50']:.2f}x, {result['requests_each']} requests each, interleaved"
    )
