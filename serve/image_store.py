"""``response_format: url``: the PNGs, kept for a limited time and served by the app itself.

One small deployment holds them, so any ingress replica can answer for an image another one
made. A URL is a long random token (a capability, like OpenAI's signed URLs): it needs no API
key. It works for ``ttl_s`` (the response's ``Cache-Control`` says how much of it is left); when
the store needs room for new images it drops the oldest first, and a dropped or expired URL is
answered 410 Gone (not 404), so a client can tell "too late" from "never was".

Its methods are plain ``def`` (Ray runs them in a thread pool), so every one holds the lock.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from typing import Callable, Literal, Optional

from ray import serve

Found = tuple[Literal["ok", "gone", "missing"], Optional[bytes], float]  # status, png, seconds left
REMEMBERED_GONE = 100_000  # tokens of dropped images remembered (for 410), oldest forgotten first


class ImageStoreCore:
    """The store itself (no Ray): thread-safe, bounded in bytes, TTL per image."""

    def __init__(self, ttl_s: float = 3600.0, max_megabytes: float = 256.0, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_bytes = int(max_megabytes * 1024 * 1024)
        self.clock = clock
        self._images: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # token -> (expiry, png), oldest first
        self._gone: OrderedDict[str, None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.dropped_early = 0  # images dropped for room before their TTL (observability)

    def put(self, pngs: list[bytes]) -> list[str]:
        with self._lock:
            self._drop_expired()
            tokens = []
            for png in pngs:
                token = secrets.token_urlsafe(24)
                self._images[token] = (self.clock() + self.ttl_s, png)
                self._bytes += len(png)
                tokens.append(token)
            while self._bytes > self.max_bytes and len(self._images) > len(tokens):
                self._pop_oldest()
                self.dropped_early += 1
            return tokens

    def get(self, token: str) -> Found:
        with self._lock:
            self._drop_expired()
            entry = self._images.get(token)
            if entry is not None:
                return "ok", entry[1], entry[0] - self.clock()
            return ("gone" if token in self._gone else "missing"), None, 0.0

    def stats(self) -> dict:
        with self._lock:
            return {"images": len(self._images), "bytes": self._bytes, "dropped_early": self.dropped_early}

    def _pop_oldest(self) -> None:
        token, (_, png) = self._images.popitem(last=False)
        self._bytes -= len(png)
        self._gone[token] = None
        while len(self._gone) > REMEMBERED_GONE:
            self._gone.popitem(last=False)

    def _drop_expired(self) -> None:
        now = self.clock()
        while self._images and next(iter(self._images.values()))[0] <= now:
            self._pop_oldest()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=64)
class ImageStore(ImageStoreCore):
    def describe(self) -> dict:
        return {"ttl_s": self.ttl_s, "max_bytes": self.max_bytes, **self.stats()}
