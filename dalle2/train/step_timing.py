"""How long one bare training step of a job takes on this machine: a short timed warm-up.

The demo's time budget (:mod:`jobs.budget`) needs each stage's step rate before the stage
runs, so that its step count can be set at launch (the LR schedule and the validation cadence
follow ``loop.max_steps``; a step count changed mid-run would bend the schedule). Starting a
Ray Train job to time a few steps costs half a minute per stage; this times the same network,
batch size and optimizer in the driver's process instead, with the threads one worker gets,
and the caller scales by how the full job's rate related to this on a reference machine.

What is timed is forward, backward, gradient clipping and an AdamW step on one in-memory batch
of the job's shapes. The batch's CLIP encoding (prior, decoder) is done once before the clock
starts: in the demo those stages read precomputed embeddings and run no CLIP in their steps.
"""

from __future__ import annotations

import math
import time

import torch

from dalle2.train.config import JobConfig


def bare_step_seconds(job: JobConfig, steps: int = 3, warmup_steps: int = 1) -> float:
    """Seconds per bare training step of ``job``'s model at its per-worker batch size (the
    fastest of ``steps`` timed steps after ``warmup_steps``: on a shared machine the minimum is
    the machine's speed, the rest is other people's work)."""
    from dalle2.precision import training_autocast, training_autocast_dtype
    from dalle2.train.bench import bench_task
    from dalle2.train.loop import weight_decay_groups

    if steps < 1 or warmup_steps < 0:
        raise ValueError("steps must be >= 1 and warmup_steps >= 0")
    threads = torch.get_num_threads()
    # One worker's share: 0.5 CPU on the demo's 2 cores is one thread (torch threads are whole).
    torch.set_num_threads(max(1, math.ceil(job.scaling.cpus_per_worker)))
    try:
        task, batch = bench_task(job)
        torch.manual_seed(job.loop.seed)
        model = task.build_model()
        if task.needs_preparation:
            task.prepare(model, [batch])  # the prior's embedding statistics
        loss_module = task.loss_module(model)
        optimizer = torch.optim.AdamW(weight_decay_groups(loss_module, job.optim.weight_decay), lr=job.optim.lr)
        inputs = task.inputs(batch)  # CLIP runs here, once, outside the timed steps

        autocast = training_autocast_dtype(job.deepspeed.autocast.value, "cpu")

        def step() -> float:
            started = time.perf_counter()
            with training_autocast(autocast, "cpu"):  # as the job's workers will (deepspeed.autocast)
                loss = loss_module(**inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if job.deepspeed.gradient_clipping:
                torch.nn.utils.clip_grad_norm_(loss_module.parameters(), job.deepspeed.gradient_clipping)
            optimizer.step()
            loss.item()
            return time.perf_counter() - started

        for _ in range(warmup_steps):
            step()
        return min(step() for _ in range(steps))
    finally:
        torch.set_num_threads(threads)
