"""One forward pass per diffusion step for a whole batch of requests, each keeping its own sampler.

A batch that ``@serve.batch`` hands a model deployment holds requests that may differ in seed,
number of steps, guidance scale and, for edits, the known pixels. Rather than forcing them into
one tensor (which would need one seed, one step count, one guidance scale), each request runs the
library's own stage function (``dalle2.cascade.decode``, ``upsample``, ``sample_image_embeds``)
with its own generator, in its own thread, against a :class:`SharedForward` stand-in for the
network. At every step each loop calls the stand-in; when every loop still running has called,
the stand-in runs ONE forward on the concatenated rows and hands each loop its rows back.

Why this is exact: the networks treat rows independently (per-row timestep embedding, attention
within a sample, GroupNorm per sample), so the rows of a request come out as they would alone, up
to float rounding of a larger batch; different timesteps per row are fine, since ``t`` is [N].
Requests with different step counts simply leave the round early. Classifier-free guidance
(Ho & Salimans 2022) doubles each request's rows before the call, so guided and unguided requests
also share the pass as long as their conditioning has the same keys; calls whose conditioning
differs in keys or row shapes (a caption vs none) get one forward each per round.

Cancellation: a request cancelled while its batch runs (its deadline passed, its client left)
stops at its next forward call (:class:`RequestCancelled`), leaves the round, and the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Hashable, Optional, Sequence, TypeVar

import torch
from torch import Tensor

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Call:
    x: Tensor
    t: Tensor
    cond: dict[str, Any]
    output: Optional[Tensor] = None
    error: Optional[BaseException] = None
    done: bool = field(default=False)


def _is_rows(value: Any, rows: int) -> bool:
    # The convention of ClassifierFreeGuidance: a tensor whose leading dim is the batch is per row.
    return isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == rows


def _signature(call: _Call) -> Hashable:
    """Calls with equal signatures can be concatenated into one forward."""
    rows = call.x.shape[0]
    parts: list[Hashable] = [("x", tuple(call.x.shape[1:]), call.x.dtype, str(call.x.device))]
    for key in sorted(call.cond):
        value = call.cond[key]
        if value is None:
            parts.append((key, None))
        elif _is_rows(value, rows):
            parts.append((key, "rows", tuple(value.shape[1:]), value.dtype))
        elif isinstance(value, Hashable) and not isinstance(value, Tensor):
            parts.append((key, "value", value))
        else:  # a shared non-row tensor: only calls passing this very object go together
            parts.append((key, "object", id(value)))
    return tuple(parts)


class RequestCancelled(Exception):
    """Raised in a sampling loop whose request was cancelled."""


class _LoopForward:
    """One loop's view of the shared forward: checks its request's cancellation before each call."""

    def __init__(self, shared: "SharedForward", cancelled: Callable[[], bool]):
        self._shared, self._cancelled = shared, cancelled

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._shared, name)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if self._cancelled():
            raise RequestCancelled("the request was cancelled")
        return self._shared(x, t, **cond)


class SharedForward:
    """Stands in for ``network`` in ``loops`` sampling loops that run in threads at the same time.

    Attribute access (``config``, ``drop_keys``...) goes to the network, so the stand-in can be
    passed wherever the library expects the module. Every loop must call :meth:`finished` when it
    ends, normally or not (:func:`run_in_lockstep` does), or the others wait for it forever."""

    def __init__(self, network: Callable[..., Tensor], loops: int, on_forward: Optional[Callable[[], None]] = None):
        self.network = network
        self.on_forward = on_forward  # told after every forward (the replica's health clock)
        self.forwards = 0  # forward passes run, for observability and tests
        self._active = loops
        self._waiting: list[_Call] = []
        self._condition = threading.Condition()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("network", "forwards", "on_forward"):
            raise AttributeError(name)
        return getattr(self.network, name)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        call = _Call(x, t, cond)
        with self._condition:
            self._waiting.append(call)
            self._run_round_if_complete()
            while not call.done:
                self._condition.wait()
        if call.error is not None:
            raise call.error
        return call.output

    def finished(self) -> None:
        with self._condition:
            self._active -= 1
            self._run_round_if_complete()

    def _run_round_if_complete(self) -> None:
        # Called with the lock held. When it runs the forward, every other live loop is waiting.
        if not self._waiting or len(self._waiting) < self._active:
            return
        calls, self._waiting = self._waiting, []
        groups: dict[Hashable, list[_Call]] = {}
        for call in calls:
            groups.setdefault(_signature(call), []).append(call)
        for group in groups.values():
            self._forward(group)
        self._condition.notify_all()

    def _forward(self, group: list[_Call]) -> None:
        sizes = [call.x.shape[0] for call in group]
        try:
            if len(group) == 1:
                outputs = [self.network(group[0].x, group[0].t, **group[0].cond)]
            else:
                cond = {
                    key: torch.cat([call.cond[key] for call in group]) if _is_rows(value, sizes[0]) else value
                    for key, value in group[0].cond.items()
                }
                merged = self.network(torch.cat([c.x for c in group]), torch.cat([c.t for c in group]), **cond)
                outputs = list(torch.split(merged, sizes))
            for call, output in zip(group, outputs):
                call.output = output
        except Exception as error:  # every request of this forward fails with it; others go on
            for call in group:
                call.error = error
        finally:
            self.forwards += 1
            for call in group:
                call.done = True
            if self.on_forward is not None:
                self.on_forward()


async def run_in_lockstep(
    network: Callable[..., Tensor],
    items: Sequence[Item],
    sample: Callable[[SharedForward, Item], Result],
    on_forward: Optional[Callable[[], None]] = None,
    cancelled: Optional[Callable[[Item], bool]] = None,
    thread_context: Callable[[], ContextManager] = contextlib.nullcontext,
) -> tuple[list[Result | Exception], int]:
    """Run ``sample(shared, item)`` for every item, each in its own thread, sharing the forward
    passes of ``network``. Returns each item's result, or the exception it raised (a bad request,
    a cancelled one, fails alone), and the number of forward passes run.

    ``thread_context`` is entered in every loop's thread for the whole loop, its last
    ``finished()`` included: the shared forward runs in whichever thread completes a round, and
    thread-local state such as autocast (the stage's precision) must hold in all of them."""
    shared = SharedForward(network, loops=len(items), on_forward=on_forward)

    def run(item: Item) -> Result | Exception:
        with thread_context():
            try:
                view = shared if cancelled is None else _LoopForward(shared, lambda: cancelled(item))
                return sample(view, item)
            except Exception as error:
                return error
            finally:
                shared.finished()

    loop = asyncio.get_running_loop()
    # One thread per loop, never a shared pool: loops wait for each other, so a pool smaller
    # than the batch (asyncio's default has min(32, cpus + 4) threads) would deadlock.
    with ThreadPoolExecutor(max_workers=max(1, len(items)), thread_name_prefix="lockstep") as threads:
        results = await asyncio.gather(*(loop.run_in_executor(threads, run, item) for item in items))
    return list(results), shared.forwards
