"""The demo's time budget: measure each training stage's step rate, plan its steps, report.

``dalle2 demo --budget-minutes 30`` times a few bare steps of every training stage that is
still to run (:mod:`dalle2.train.step_timing`), turns them into the full job's time (a fixed
part: start, last checkpoint, export; and seconds per step) with the ratios measured on the
reference machine (:data:`REFERENCE`), and asks :func:`plan_steps` how many steps each stage
gets, keeping :data:`HEADROOM` of the budget free for the machine's noise. When the configured
steps fit nothing is cut; on a slower one every stage keeps its floor (``min_steps`` in the pipeline
config) and gives up the same share of the steps above it. Before each stage the plan is made
again from the time left and from how the finished stages' real times compared with their
estimates, so an estimate that was off is corrected by the stages that follow.

The cut is a smaller ``loop.max_steps``: the LR schedule's cosine ends at ``max_steps``
(:mod:`dalle2.train.schedule`), and :func:`loop_overrides` shrinks the validation and checkpoint
cadence with it, so a cut run validates and checkpoints as often, relative to its length, as
the configured one. The budget covers the training stages and the embed stage; building the
dataset, the quality check (``eval:``) and serving are outside it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

# The reference: `dalle2 demo` on the 2-core CPU machine (Intel Xeon, run with
# ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 so that its kernels are those of the slower
# AVX2-only kind), quiet, 2026-12-07 (run 4 in the README). A stage's wall time there is `fixed` +
# steps x `step`: `fixed` is what does not grow with the steps (Ray Train's start, the workers'
# DeepSpeed and data set-up, the last validation, sample grid and checkpoint, the export), `step`
# the loop's seconds per step with its periodic validation and checkpoints (their cadence follows
# the steps: loop_overrides). Both from each run's metrics.csv (`elapsed_s` at the last step)
# against the stage's wall time (CLIP 486 s for 1,200 steps, prior 119 s / 403, decoder 1,005 s /
# 1,235, upsampler 140 s / 250). `bare` is dalle2.train.step_timing.bare_step_seconds of the same
# job config at the start of the same run (fastest of 5 steps, 1 thread). On another machine a
# stage's times are the reference's x (bare measured there / bare here). The loop's step is 1.8-2.8x
# a bare one: the cheaper the step, the larger the share of the job's own per-step work. The
# bare step runs under the job's autocast (deepspeed.autocast), as its workers will; the reference
# ran float32. Run 10 (bf16 autocast decoder, bare 0.297 s) was estimated at 0.54 s per loop step
# from these float32 ratios and took 0.54.
@dataclass(frozen=True)
class Reference:
    step: float
    fixed: float
    bare: float


REFERENCE = {
    "clip": Reference(step=0.377, fixed=33.0, bare=0.183),
    "prior": Reference(step=0.184, fixed=45.0, bare=0.066),
    "decoder": Reference(step=0.789, fixed=31.0, bare=0.432),
    "upsampler": Reference(step=0.360, fixed=50.0, bare=0.166),
}
EMBED_REFERENCE_S = 44.0  # the embed stage there (8,192 rows); it runs CLIP, so it scales like the clip stage

# The share of the budget the plan leaves free. On the shared 2-core machine whole runs took
# 0.92-1.06x what this reference plans (runs 4-6 in the README), and the decoder, the last stage
# that can be cut, has nothing after it to absorb its error (+0-13% in those runs): run 6, planned
# to the whole 30 min, took 31.8.
HEADROOM = 0.06


@dataclass(frozen=True)
class StagePlan:
    stage: str
    configured: int  # the config's loop.max_steps
    floor: int  # fewest steps that still meet the quality targets (min_steps)
    planned: int
    seconds_per_step: float  # estimated for the full job on this machine
    fixed_s: float = 0.0  # estimated: the job's start, last validation, checkpoint and export

    @property
    def seconds(self) -> float:
        return self.fixed_s + self.planned * self.seconds_per_step


@dataclass(frozen=True)
class BudgetPlan:
    budget_s: float
    fixed_s: float  # time in the budget outside the training stages (the embed stage)
    stages: tuple[StagePlan, ...]
    fits: bool
    explanation: str

    @property
    def expected_s(self) -> float:
        return self.fixed_s + sum(stage.seconds for stage in self.stages)

    def steps(self, stage: str) -> int:
        return next(plan.planned for plan in self.stages if plan.stage == stage)


def plan_steps(budget_s: float, seconds_per_step: Mapping[str, float], configured: Mapping[str, int],
               floors: Mapping[str, int], fixed_s: float = 0.0, stage_fixed_s: Optional[Mapping[str, float]] = None,
               reserve_s: float = 0.0) -> BudgetPlan:  # fmt: skip
    """Steps per stage so that ``fixed_s`` + each stage's ``stage_fixed_s`` + sum(steps x seconds
    per step) fits ``budget_s`` less ``reserve_s`` (kept free for the estimates' error).

    No cut when the configured steps fit. Otherwise each stage keeps its floor and the same
    fraction of its steps above the floor, the largest fraction that fits (so no stage's quality
    is spent first). When even the floors do not fit, the plan is the floors, ``fits`` says
    whether they fit the whole budget and the explanation says how long they will take."""
    if budget_s <= 0:
        raise ValueError(f"the budget must be > 0 seconds, got {budget_s}")
    aim_s = budget_s - reserve_s
    names = list(configured)
    floor = {name: min(floors.get(name, configured[name]), configured[name]) for name in names}
    stage_fixed = {name: (stage_fixed_s or {}).get(name, 0.0) for name in names}

    def make(planned: Mapping[str, int], fits: bool, explanation: str) -> BudgetPlan:
        stages = tuple(StagePlan(name, configured[name], floor[name], planned[name], seconds_per_step[name], stage_fixed[name])
                       for name in names)  # fmt: skip
        return BudgetPlan(budget_s, fixed_s, stages, fits, explanation)

    unshortened_s = fixed_s + sum(stage_fixed.values())  # what no cut shortens
    full_s = unshortened_s + sum(seconds_per_step[name] * configured[name] for name in names)
    aim = f"the {_minutes(budget_s)} budget" + (f" less {_minutes(reserve_s)} of headroom" if reserve_s > 0 else "")
    if full_s <= aim_s:
        return make(configured, True, f"the configured steps fit: about {_minutes(full_s)} of {aim}, nothing cut")
    least_s = unshortened_s + sum(seconds_per_step[name] * floor[name] for name in names)
    if least_s > aim_s:
        # The headroom grows with the budget: the configured steps need full_s / (share kept for training).
        needed_s = full_s * budget_s / aim_s if aim_s > 0 else full_s + reserve_s
        keep_all = f"--budget-minutes {math.ceil(needed_s / 60)} keeps every configured step"
        if least_s <= budget_s:
            return make(floor, True, f"the floors ({_steps(floor)}) need about {_minutes(least_s)}, more than {aim}: "
                                     f"training at the floors ({keep_all})")  # fmt: skip
        return make(floor, False,
                    f"this machine is too slow for the {_minutes(budget_s)} budget: even the floors ({_steps(floor)}) need about "
                    f"{_minutes(least_s)}; training at the floors ({keep_all})")  # fmt: skip
    spare = sum(seconds_per_step[name] * (configured[name] - floor[name]) for name in names)
    fraction = (aim_s - least_s) / spare
    planned = {name: floor[name] + math.floor(fraction * (configured[name] - floor[name])) for name in names}
    cuts = ", ".join(f"{name} {configured[name]} -> {planned[name]}" for name in names if planned[name] < configured[name])
    return make(planned, True,
                f"the configured steps need about {_minutes(full_s)}, more than {aim}: "
                f"cutting {1 - fraction:.0%} of the steps above each floor ({cuts})")  # fmt: skip


def loop_overrides(loop, planned: int) -> dict:
    """``loop`` overrides that run ``planned`` steps instead of ``loop.max_steps``: validation and
    checkpoints as often relative to the run's length (multiples of ``log_every``, at least one
    log interval apart; 0, "only at the end", stays 0)."""
    if planned >= loop.max_steps:
        return {}
    scale = planned / loop.max_steps

    def cadence(every: int) -> int:
        if every == 0:
            return 0
        return max(loop.log_every, round(every * scale / loop.log_every) * loop.log_every)

    return {"max_steps": planned, "val_every": cadence(loop.val_every), "checkpoint_every": cadence(loop.checkpoint_every)}


def estimate_stage(stage: str, bare_s: float) -> tuple[float, float]:
    """(seconds per step, fixed seconds) of the full job on this machine from its bare step here."""
    reference = REFERENCE[stage]
    speed = bare_s / reference.bare
    return reference.step * speed, reference.fixed * speed


class Budget:
    """The plan of one pipeline run, made again before each stage, and the actual times."""

    def __init__(self, budget_s: float, seconds_per_step: Mapping[str, float], configured: Mapping[str, int],
                 floors: Mapping[str, int], embed_s: float = 0.0, stage_fixed_s: Optional[Mapping[str, float]] = None,
                 bare_s: Optional[Mapping[str, float]] = None, headroom: float = HEADROOM):  # fmt: skip
        if not 0 <= headroom < 1:
            raise ValueError(f"the headroom is a share of the budget in [0, 1), got {headroom}")
        self.budget_s = budget_s
        self.reserve_s = headroom * budget_s  # kept free in every plan, the first and the re-plans
        self.rates = dict(seconds_per_step)
        self.stage_fixed = dict(stage_fixed_s or {})
        self.bare = dict(bare_s or {})  # the timed warm-up's seconds per bare step, for the record
        self.configured, self.floors = dict(configured), dict(floors)
        self.embed_s = embed_s  # estimated; 0 when the embed stage is done or absent
        self.first = plan_steps(budget_s, self.rates, self.configured, self.floors, embed_s, self.stage_fixed, self.reserve_s)
        self.planned = {plan.stage: plan.planned for plan in self.first.stages}  # what each stage was given
        self.estimated = {plan.stage: plan.seconds for plan in self.first.stages} | ({"embed": embed_s} if embed_s else {})
        self.actual: dict[str, tuple[float, int]] = {}  # stage -> (seconds, steps)

    @property
    def spent_s(self) -> float:
        return sum(seconds for seconds, _ in self.actual.values())

    @property
    def slowdown(self) -> float:
        """Actual over estimated time of the finished stages (1.0 before any)."""
        done = [stage for stage in self.actual if stage in self.estimated]
        estimated = sum(self.estimated[stage] for stage in done)
        return sum(self.actual[stage][0] for stage in done) / estimated if estimated else 1.0

    def steps_for(self, stage: str, say: Callable[[str], None]) -> int:
        """The steps ``stage`` runs, planned again with the time left, every remaining estimate
        scaled by how the finished stages' times compared with theirs."""
        if stage not in self.configured:
            raise KeyError(f"{stage}: not in the budget's plan")
        left = [name for name in self.configured if name not in self.actual]
        if self.actual:
            slowdown = self.slowdown
            fixed = self.embed_s * slowdown if "embed" not in self.actual else 0.0
            rates = {name: self.rates[name] * slowdown for name in left}
            stage_fixed = {name: self.stage_fixed.get(name, 0.0) * slowdown for name in left}
            remaining = max(self.budget_s - self.spent_s, 1.0)
            plan = plan_steps(remaining, rates, {name: self.configured[name] for name in left}, self.floors, fixed, stage_fixed,
                              self.reserve_s)  # fmt: skip
            steps = plan.steps(stage)
            if steps != self.planned[stage]:
                say(f"budget: {stage} {self.planned[stage]} -> {steps} steps (the stages so far took {slowdown:.2f}x their "
                    f"estimate; {_minutes(remaining)} left): {plan.explanation}")  # fmt: skip
            # Every stage still to run takes this plan, so that the next re-plan compares with what
            # was last said (a stage cut here and given its steps back later says so) and the
            # closing lines set each stage against its latest estimate.
            for later in plan.stages:
                self.planned[later.stage], self.estimated[later.stage] = later.planned, later.seconds
        return self.planned[stage]

    def record(self, stage: str, seconds: float, steps: int = 0) -> None:
        self.actual[stage] = (seconds, steps)

    def opening_lines(self) -> list[str]:
        lines = [f"budget: {_minutes(self.budget_s)} of training; {self.first.explanation}"]
        if self.embed_s:
            lines.append(f"   embed      about {_minutes(self.embed_s)}")
        for plan in self.first.stages:
            cut = f" (configured {plan.configured}, floor {plan.floor})" if plan.planned < plan.configured else ""
            bare = f", bare step {self.bare[plan.stage]:.3f} s" if plan.stage in self.bare else ""
            lines.append(f"   {plan.stage:<10} {plan.planned} steps{cut}, about {_minutes(plan.seconds)} "
                         f"({_minutes(plan.fixed_s)} + {plan.seconds_per_step:.2f} s/step{bare})")  # fmt: skip
        lines.append(f"   expected   {_minutes(self.first.expected_s)} in all")
        if self.first.fits and all(plan.planned == plan.configured for plan in self.first.stages) and self.floors:
            lines.append(f"   if slower  each stage's steps are cut toward its floor ({_steps(self.floors)}), re-planned before each stage")
        return lines

    def closing_lines(self) -> list[str]:
        """Actual against planned, stage by stage, and the total against the budget."""
        lines = []
        for stage, (seconds, steps) in self.actual.items():
            planned = f"{self.planned[stage]} steps, " if stage in self.planned else ""
            ran = f"{steps} steps in " if steps else ""
            lines.append(f"   {stage:<10} planned {planned}{_minutes(self.estimated.get(stage, 0.0))}; ran {ran}{_minutes(seconds)}")
        verdict = "within" if self.spent_s <= self.budget_s else "over"
        lines.insert(0, f"budget: training took {_minutes(self.spent_s)}, {verdict} the {_minutes(self.budget_s)} budget "
                        f"(planned {_minutes(self.first.expected_s)})")  # fmt: skip
        return lines


def measure_budget(budget_s: float, jobs: Mapping[str, object], floors: Mapping[str, int], embed_pending: bool,
                   time_step: Optional[Callable[[object], float]] = None) -> Budget:  # fmt: skip
    """A :class:`Budget` for the training ``jobs`` still to run (stage -> JobConfig), from a timed
    warm-up of each (``time_step``: job -> bare seconds per step; the real one by default)."""
    if time_step is None:
        from dalle2.train.step_timing import bare_step_seconds

        time_step = functools.partial(bare_step_seconds, steps=5)  # about 10 s for the demo's four stages
    bare = {stage: time_step(job) for stage, job in jobs.items()}
    estimates = {stage: estimate_stage(stage, seconds) for stage, seconds in bare.items()}
    rates = {stage: rate for stage, (rate, _) in estimates.items()}
    # The embed stage runs CLIP's forward: it scales like the clip stage (the reference's speed
    # when CLIP is not trained here, e.g. a resumed run).
    clip_speed = bare["clip"] / REFERENCE["clip"].bare if "clip" in bare else 1.0
    embed_s = EMBED_REFERENCE_S * clip_speed if embed_pending else 0.0
    configured = {stage: job.loop.max_steps for stage, job in jobs.items()}
    return Budget(budget_s, rates, configured, {stage: floors[stage] for stage in jobs if stage in floors}, embed_s,
                  {stage: fixed for stage, (_, fixed) in estimates.items()}, bare)  # fmt: skip


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _steps(steps: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in steps.items())
