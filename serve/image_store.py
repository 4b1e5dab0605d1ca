"""``response_format: url``: the PNGs, kept for a limited time and served by the app itself.

One small deployment holds them, so any ingress replica can answer for an image another one
made. A URL is a long random token (a capability, like OpenAI's signed URLs): it needs no API
key, and it stops working after ``ttl_s`` or when the store needs the room (oldest first).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Optional

from ray import serve


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=64)
class ImageStore:
    def __init__(self, ttl_s: float = 3600.0, max_megabytes: float = 256.0):
        self.ttl_s = ttl_s
        self.max_bytes = int(max_megabytes * 1024 * 1024)
        self._images: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # token -> (expiry, png)
        self._bytes = 0

    def put(self, pngs: list[bytes]) -> list[str]:
        self._drop_expired()
        tokens = []
        for png in pngs:
            token = secrets.token_urlsafe(24)
            self._images[token] = (time.monotonic() + self.ttl_s, png)
            self._bytes += len(png)
            tokens.append(token)
        while self._bytes > self.max_bytes and len(self._images) > len(tokens):
            self._pop_oldest()
        return tokens

    def get(self, token: str) -> Optional[bytes]:
        self._drop_expired()
        entry = self._images.get(token)
        return None if entry is None else entry[1]

    def _pop_oldest(self) -> None:
        _, (_, png) = self._images.popitem(last=False)
        self._bytes -= len(png)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        while self._images and next(iter(self._images.values()))[0] <= now:
            self._pop_oldest()
