"""Timing helpers shared by the benchmarks: interleaved repetitions, medians, machine facts.

On a machine shared with other work the load drifts over seconds, so competing implementations
are timed in alternating rounds (A B, B A, A B, ...) and compared by their medians: a burst of
load then slows both, not one.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch


@dataclass(frozen=True)
class Sample:
    """One timed call: wall-clock seconds, and CPU seconds of this process (all its threads).

    On a machine whose cores other work shares, wall time swings with their load while CPU time
    barely does (with one torch thread it is the time the work itself took), so both are kept.
    """

    wall_s: float
    cpu_s: float


@dataclass(frozen=True)
class Excluded:
    """What a timed function returns to have part of its time not counted: the time it spent on
    work outside the comparison (e.g. a peer pipeline's mandatory super-resolution stage)."""

    wall_s: float
    cpu_s: float


class Stopwatch:
    """Wall and CPU time since the last :meth:`restart`."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> Sample:
        return Sample(time.perf_counter() - self.wall, time.process_time() - self.cpu)


def time_call(fn: Callable[[], object]) -> Sample:
    """Wall and CPU time of one call, less what it reports as :class:`Excluded`."""
    watch = Stopwatch()
    result = fn()
    elapsed = watch.read()
    if isinstance(result, Excluded):
        return Sample(elapsed.wall_s - result.wall_s, elapsed.cpu_s - result.cpu_s)
    return elapsed


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[Sample]]:
    """``repeats`` timed calls of each function, taken in alternating order.

    Every round calls each function once; odd rounds run them in reverse order so that neither
    always follows the other. ``warmup`` untimed rounds come first (allocator, oneDNN kernels).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            samples[name].append(time_call(fns[name]))
    return samples


def summary(samples: list[Sample]) -> dict[str, float]:
    """Medians (the figures we report) of wall and CPU time, and the wall-time range."""
    walls = [s.wall_s for s in samples]
    return {
        "median_s": statistics.median(walls),
        "cpu_median_s": statistics.median(s.cpu_s for s in samples),
        "min_s": min(walls),
        "max_s": max(walls),
        "repeats": len(samples),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    """What the figures depend on: CPU, cores, torch threads and versions, load when measured."""
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info
