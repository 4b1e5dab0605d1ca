"""Progress where people wait (dataset build, import, embed, eval, the demo's generation): a tqdm
bar with rate and ETA on a terminal, and a plain line every ``every_s`` seconds elsewhere (a log
file, CI), because a bar's carriage returns make one unreadable line of a file.

    with Bar(total=len(rows), desc="eval: generating", unit="img") as bar:
        for part in parts:
            ...
            bar.update(len(part))

Bars go to :data:`STREAM` when a caller owns the terminal (the pipeline's console sends its
bars to the terminal while the rest of the output goes to log files), else to ``sys.stderr``.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Optional

STREAM: Optional[IO[str]] = None


def set_stream(stream: Optional[IO[str]]) -> None:
    global STREAM
    STREAM = stream


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Bar:
    def __init__(self, total: Optional[int], desc: str, unit: str = "it", every_s: float = 10.0, stream: Optional[IO[str]] = None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or STREAM or sys.stderr
        self.done = 0
        self._started = self._printed = time.monotonic()
        self._bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=True)

    def update(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif time.monotonic() - self._printed >= self.every_s:
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.done}" + (f"/{self.total} ({100 * self.done // max(self.total, 1)}%)" if self.total else f" {self.unit}")]
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"eta {_duration((self.total - self.done) / rate)}")
        print(f"[{time.strftime('%H:%M:%S')}] " + " | ".join(parts), file=self.stream, flush=True)
        self._printed = time.monotonic()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.done:
            self._line()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
