"""The demo's time budget: the plan (a pure function), the cut it makes to a job config, the
re-plan between stages, the warm-up timing, and `dalle2 demo --budget-minutes` reaching the plan."""

from __future__ import annotations

import os

import pytest

from jobs.budget import EMBED_REFERENCE_S, HEADROOM, REFERENCE, Budget, loop_overrides, measure_budget, plan_steps

CONFIGURED = {"clip": 1200, "prior": 600, "decoder": 1600, "upsampler": 250}
FLOORS = {"clip": 800, "prior": 400, "decoder": 1200, "upsampler": 150}
# seconds per step of a machine whose configured steps take 28.4 min (the README's earlier demo run)
REFERENCE_RATES = {"clip": 356 / 1200, "prior": 127 / 600, "decoder": 1073 / 1600, "upsampler": 102 / 250}
DEMO = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "demo-tiny-cpu.yaml")


def test_a_machine_as_fast_as_the_reference_keeps_every_step():
    plan = plan_steps(30 * 60, REFERENCE_RATES, CONFIGURED, FLOORS, fixed_s=48)
    assert plan.fits
    assert {stage.stage: stage.planned for stage in plan.stages} == CONFIGURED
    assert plan.expected_s == pytest.approx(48 + 356 + 127 + 1073 + 102)
    assert "nothing cut" in plan.explanation


def test_a_machine_3x_slower_is_cut_to_fit_the_budget_above_the_floors():
    slow = {stage: 3 * rate for stage, rate in REFERENCE_RATES.items()}
    budget_s = 75 * 60  # the floors need 61 min at 3x; the configured steps 84 min
    plan = plan_steps(budget_s, slow, CONFIGURED, FLOORS, fixed_s=3 * 48)
    assert plan.fits
    assert plan.expected_s <= budget_s
    assert plan.expected_s > budget_s - 60  # the cut uses the budget, not much less
    for stage in plan.stages:
        assert FLOORS[stage.stage] <= stage.planned < CONFIGURED[stage.stage]
    # every stage gives up the same share of its steps above the floor
    shares = [(s.planned - s.floor) / (s.configured - s.floor) for s in plan.stages]
    assert max(shares) - min(shares) < 0.02
    assert "decoder 1600 -> " in plan.explanation


def test_each_stages_fixed_time_is_planned_and_never_cut():
    fixed = {"clip": 60.0, "prior": 40.0, "decoder": 70.0, "upsampler": 30.0}  # start-up, last checkpoint, export
    plan = plan_steps(30 * 60, REFERENCE_RATES, CONFIGURED, FLOORS, fixed_s=48, stage_fixed_s=fixed)
    assert plan.expected_s <= 30 * 60 < 48 + 200 + 356 + 127 + 1073 + 102  # without the cut it would not fit
    assert plan.expected_s == pytest.approx(48 + sum(s.fixed_s + s.planned * s.seconds_per_step for s in plan.stages))
    assert [s.fixed_s for s in plan.stages] == list(fixed.values()) and plan.steps("decoder") < 1600


def test_an_impossible_budget_trains_at_the_floors_and_says_how_long():
    slow = {stage: 3 * rate for stage, rate in REFERENCE_RATES.items()}
    plan = plan_steps(30 * 60, slow, CONFIGURED, FLOORS, fixed_s=3 * 48)
    assert not plan.fits
    assert {stage.stage: stage.planned for stage in plan.stages} == FLOORS
    assert "too slow for the 30.0 min budget" in plan.explanation
    assert f"about {plan.expected_s / 60:.1f} min" in plan.explanation
    with pytest.raises(ValueError, match="budget must be > 0"):
        plan_steps(0, slow, CONFIGURED, FLOORS)


def test_a_stage_without_a_floor_is_not_cut():
    slow = {stage: 3 * rate for stage, rate in REFERENCE_RATES.items()}
    plan = plan_steps(75 * 60, slow, CONFIGURED, {"decoder": 1200})
    assert plan.steps("clip") == 1200 and plan.steps("upsampler") == 250
    assert 1200 <= plan.steps("decoder") < 1600 or not plan.fits


def test_the_cut_shrinks_max_steps_and_the_validation_and_checkpoint_cadence():
    from jobs.stages import StageSpec, job_config_for, load_pipeline_config

    config = load_pipeline_config(DEMO)
    job = job_config_for(config, "decoder", config.decoder)
    assert (job.loop.max_steps, job.loop.val_every, job.loop.checkpoint_every, job.loop.log_every) == (1600, 250, 250, 20)
    assert loop_overrides(job.loop, 1600) == {}
    cut = job_config_for(config, "decoder", config.decoder, loop_overrides(job.loop, 1200))
    assert (cut.loop.max_steps, cut.loop.val_every, cut.loop.checkpoint_every) == (1200, 180, 180)  # 250 x 3/4, in log intervals
    assert cut.optim == job.optim  # the LR schedule follows max_steps (dalle2.train.schedule)
    with pytest.raises(ValueError, match="min_steps"):
        StageSpec(config="x.yaml", max_steps=100, min_steps=200)


def test_the_plan_is_made_again_when_a_stage_ran_slower_than_estimated():
    budget = Budget(30 * 60, REFERENCE_RATES, CONFIGURED, FLOORS)
    assert budget.steps_for("clip", print) == 1200  # fits: 27.6 min
    budget.record("clip", 2 * 356, 1200)  # CLIP took twice its estimate
    said = []
    decoder_steps = budget.steps_for("prior", said.append), budget.steps_for("decoder", said.append)
    assert decoder_steps[0] < 600 and said and "2.00x their estimate" in said[0]
    assert budget.steps_for("decoder", said.append) >= FLOORS["decoder"]
    budget.record("prior", 127, decoder_steps[0])
    closing = budget.closing_lines()
    assert closing[0].startswith("budget: training took ")
    assert any(line.split()[0] == "clip" and "planned 1200 steps" in line and "ran 1200 steps in 11.9 min" in line for line in closing)


def run_through(budget: Budget, took: dict) -> float:
    """Runs every stage of ``budget`` in order, each taking ``took[stage]`` x its latest estimate."""
    for stage in budget.configured:
        steps = budget.steps_for(stage, lambda line: None)
        budget.record(stage, took.get(stage, 1.0) * budget.estimated[stage], steps)
    return budget.spent_s


def test_the_plan_keeps_headroom_so_a_slow_last_stage_stays_within_the_budget():
    slower = {stage: 1.2 * rate for stage, rate in REFERENCE_RATES.items()}  # the configured steps need 33 min
    budget = Budget(30 * 60, slower, CONFIGURED, FLOORS)
    assert budget.reserve_s == pytest.approx(HEADROOM * 30 * 60)
    assert 30 * 60 * (1 - HEADROOM) - 60 < budget.first.expected_s <= 30 * 60 * (1 - HEADROOM)
    assert "less 1.8 min of headroom" in budget.first.explanation
    decoder_slow = {"decoder": 1.10}  # run 6: its decoder took 1.10x its estimate, the shared machine's noise
    assert run_through(budget, decoder_slow) <= 30 * 60
    assert run_through(Budget(30 * 60, slower, CONFIGURED, FLOORS, headroom=0.0), decoder_slow) > 30 * 60
    with pytest.raises(ValueError, match="headroom"):
        Budget(30 * 60, slower, CONFIGURED, FLOORS, headroom=1.0)


def test_floors_that_fit_the_budget_only_inside_its_headroom_are_trained_and_said_so():
    floors_s = sum(REFERENCE_RATES[stage] * FLOORS[stage] for stage in FLOORS)
    budget_s = floors_s / (1 - HEADROOM / 2)  # the floors take 97% of it: inside the 6% headroom
    plan = plan_steps(budget_s, REFERENCE_RATES, CONFIGURED, FLOORS, reserve_s=HEADROOM * budget_s)
    assert plan.fits and {stage.stage: stage.planned for stage in plan.stages} == FLOORS
    assert "more than the " in plan.explanation and "of headroom: training at the floors" in plan.explanation


def test_a_stage_cut_by_one_re_plan_and_given_steps_back_by_the_next_says_so():
    budget = Budget(30 * 60, REFERENCE_RATES, CONFIGURED, FLOORS)
    budget.steps_for("clip", print)
    budget.record("clip", 1.3 * 356, 1200)  # CLIP slower than estimated: the prior and the decoder are cut
    said = []
    prior = budget.steps_for("prior", said.append)
    cut = budget.planned["decoder"]
    assert prior < CONFIGURED["prior"] and FLOORS["decoder"] <= cut < CONFIGURED["decoder"]
    budget.record("prior", 20, prior)  # then the prior much faster: the decoder gets its steps back
    decoder = budget.steps_for("decoder", said.append)
    assert decoder > cut and said[-1].startswith(f"budget: decoder {cut} -> {decoder} steps")
    budget.record("decoder", 1073, decoder)
    closing = budget.closing_lines()
    assert any(line.split()[0] == "decoder" and f"planned {decoder} steps, " in line and f"ran {decoder} steps in 17.9 min" in line for line in closing)


def test_measure_budget_scales_the_warm_up_by_the_reference_ratio():
    from dalle2.train.config import load_job_config

    jobs = {"prior": load_job_config("prior", os.path.join(os.path.dirname(DEMO), "prior-tiny-cpu.yaml"), {"data": {"path": "x"}})}
    budget = measure_budget(10 * 60, jobs, {"prior": 400}, embed_pending=True, time_step=lambda job: 2 * REFERENCE["prior"].bare)
    assert budget.rates["prior"] == pytest.approx(2 * REFERENCE["prior"].step)  # twice the reference's times
    assert budget.stage_fixed["prior"] == pytest.approx(2 * REFERENCE["prior"].fixed)
    assert budget.embed_s == EMBED_REFERENCE_S  # CLIP not timed: the reference's embed time
    aim_s = 600 * (1 - HEADROOM)  # the YAML's 2,000 steps do not fit
    assert budget.first.steps("prior") == int((aim_s - EMBED_REFERENCE_S - budget.stage_fixed["prior"]) / budget.rates["prior"])


def test_the_warm_up_times_a_real_training_step():
    from dalle2.train.config import load_job_config
    from dalle2.train.step_timing import bare_step_seconds

    job = load_job_config("prior", os.path.join(os.path.dirname(DEMO), "prior-tiny-cpu.yaml"), {"data": {"path": "x"}})
    seconds = bare_step_seconds(job, steps=2)
    assert 0 < seconds < 10


def test_dalle2_demo_budget_minutes_reaches_the_plan(tmp_path, monkeypatch, capfd):
    import jobs.stages
    from dalle2 import cli

    assert cli.build_parser().parse_args(["demo"]).budget_minutes == 30
    assert cli.build_parser().parse_args(["pipeline"]).budget_minutes is None
    # A machine 3x slower than the reference, timed without running a step; stop before Ray.
    monkeypatch.setattr("dalle2.train.step_timing.bare_step_seconds", lambda job, steps=5: 3 * REFERENCE[job.job].bare)
    monkeypatch.setattr(jobs.stages, "stage_data", lambda config: None)

    def stop(*_):
        raise RuntimeError("stopped before Ray")

    monkeypatch.setattr(jobs.stages, "start_ray", stop)
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    # There the configured steps need 3x the reference's time and the floors too; 95 min lies between.
    def minutes(steps: dict) -> float:
        return 3 * (EMBED_REFERENCE_S + sum(REFERENCE[s].fixed + n * REFERENCE[s].step for s, n in steps.items())) / 60

    assert minutes(FLOORS | {"upsampler": 250}) < 95 < minutes(CONFIGURED)
    assert cli.main(["demo", "--budget-minutes", "95", "--workdir", str(tmp_path)]) == 1
    out = capfd.readouterr().out
    assert f"budget: 95.0 min of training; the configured steps need about {minutes(CONFIGURED):.1f} min, more than the 95.0 min budget less 5.7 min of headroom" in out
    assert "decoder    " in out and "(configured 1600, floor 1200)" in out
    assert "upsampler  250 steps, about" in out  # its floor is its configured steps: never cut
