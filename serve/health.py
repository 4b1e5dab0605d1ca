"""Whether a model replica can still serve: what its ``check_health`` asks (Serve calls it every
``health_check_period_s``; a replica that fails it, or does not answer within
``health_check_timeout_s``, is stopped and replaced).

A replica is healthy when its model is loaded and either

- it is running batches and the last forward pass was less than ``stall_s`` ago (a lockstep
  round that never completes, a forward stuck in a driver, leaves this clock still), or
- it is idle and a tiny forward (the stage's own code at one step, one image) ran within the last
  ``probe_every_s``, or runs now within ``probe_budget_s``.

Plain Python with a clock argument, so tests drive it without Ray.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable


class Unhealthy(RuntimeError):
    pass


class StageHealth:
    def __init__(self, probe: Callable[[], object], stall_s: float = 60.0, probe_every_s: float = 60.0,
                 probe_budget_s: float = 10.0, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.probe, self.clock = probe, clock
        self.stall_s, self.probe_every_s, self.probe_budget_s = stall_s, probe_every_s, probe_budget_s
        self.batches_running = 0
        self.last_forward = clock()  # a replica has just loaded its model (and Serve runs a check first)
        self.last_error: str = ""

    def forward_done(self) -> None:
        """Called after every forward pass of a batch (from any thread: a float store is atomic)."""
        self.last_forward = self.clock()

    def batch_started(self) -> None:
        if self.batches_running == 0:
            self.last_forward = self.clock()  # the stall clock starts with the batch
        self.batches_running += 1

    def batch_ended(self) -> None:
        self.batches_running -= 1

    async def check(self) -> None:
        """Raise :class:`Unhealthy` with the reason, or return."""
        since = self.clock() - self.last_forward
        if self.batches_running:
            if since > self.stall_s:
                self.last_error = f"wedged: {self.batches_running} batch(es) running and no forward pass for {since:.0f} s"
                raise Unhealthy(self.last_error)
            return
        if since <= self.probe_every_s:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(self.probe), self.probe_budget_s)
        except asyncio.TimeoutError:
            self.last_error = f"the probe forward took longer than {self.probe_budget_s} s"
            raise Unhealthy(self.last_error) from None
        except Exception as error:
            self.last_error = f"the probe forward failed: {type(error).__name__}: {error}"
            raise Unhealthy(self.last_error) from None
        self.forward_done()
        self.last_error = ""
