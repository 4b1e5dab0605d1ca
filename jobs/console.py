"""The pipeline's console: our own lines on the terminal, everything else in log files.

A run of the pipeline prints a header per stage, our progress lines and a summary; Ray's,
DeepSpeed's and open_clip's output (the driver's own loggers, C++ logs, and every worker line
Ray forwards to the driver) goes to ``<log_dir>/<section>.log``. The redirection is done on
file descriptors 1 and 2, so output that never passes through Python (Ray's ``core_worker.cc``,
raylet warnings) lands in the log as well; the console keeps duplicates of the original
descriptors. Opened without a log folder (``--verbose``, or a caller that runs stages in its
own process) the console redirects nothing and prints to ``sys.stdout``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import IO, Optional


class Console:
    def __init__(self, log_dir: Optional[str] = None):
        self.log_dir = log_dir
        self.log_path: Optional[str] = None  # the log the current section writes to
        self._out: Optional[IO[str]] = None  # the terminal's stdout, once redirected
        self._err: Optional[IO[str]] = None  # and its stderr
        self._saved: list[int] = []

    @property
    def stream(self) -> IO[str]:
        """Where our lines go: the terminal (progress bars too)."""
        return self._out or sys.stdout

    @property
    def redirected(self) -> bool:
        return self._out is not None

    def __enter__(self) -> "Console":
        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
            sys.stdout.flush()
            sys.stderr.flush()
            self._saved = [os.dup(1), os.dup(2)]
            self._out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
            self._err = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self._saved = []
            self._out.close()
            self._err.close()
            self._out = self._err = None

    def section(self, name: str) -> Optional[str]:
        """Send everything that is not ours to ``<log_dir>/<name>.log`` from now on; returns its
        path (None when nothing is redirected)."""
        if not self.redirected:
            return None
        path = os.path.join(self.log_dir, f"{name}.log")
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.log_path = path
        return path

    def say(self, message: str) -> None:
        """One of our lines, timestamped; also written to the current log, so that the log
        alone reads in order."""
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, file=self.stream, flush=True)
        if self.redirected:
            print(line, flush=True)

    def header(self, title: str, **rows: Optional[str]) -> None:
        """A stage's header: a title line, then one aligned line per row (what, data, run, log)."""
        self.say(f"== {title}")
        for name, value in rows.items():
            if value:
                self.say(f"   {name:<6} {value}")

    def error(self, error: BaseException) -> None:
        """An error always reaches the terminal, with the path of the full log (which gets the
        traceback)."""
        if self.redirected:
            traceback.print_exception(error)
            sys.stderr.flush()
        lines = (str(error) or type(error).__name__).strip().splitlines()
        if len(lines) > 6:  # a worker's traceback inside a Ray error: its first line and its end
            lines = lines[:1] + ["..."] + lines[-4:]
        where = f"\nfull log: {self.log_path}" if self.log_path else ""
        print("pipeline: error: " + "\n".join(lines) + where, file=self._err or sys.stderr, flush=True)


def log_dir_of(workdir: str) -> str:
    """Where a pipeline's full logs go: ``<workdir>/logs``, or a local folder for a workdir in
    object storage (logs are written through file descriptors)."""
    from dalle2.data import storage

    if "://" in workdir and not workdir.startswith("file://"):
        return os.path.join(os.path.abspath("dalle2-logs"), workdir.split("://", 1)[1].strip("/").replace("/", "_"))
    return os.path.join(storage.path_of(workdir), "logs")
