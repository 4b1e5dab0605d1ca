"""The pipeline's console: our own lines on the terminal, everything else in log files.

A run of the pipeline prints a header per stage, our progress lines and a summary; Ray's,
DeepSpeed's and open_clip's output (the driver's own loggers, C++ logs, and every worker line
Ray forwards to the driver) goes to ``<log_dir>/<section>.log``. The redirection is done on
file descriptors 1 and 2, so output that never passes through Python (Ray's ``core_worker.cc``,
raylet warnings) lands in the log as well; the console keeps duplicates of the original
descriptors. With ``echo`` (``--verbose``) the logs are written all the same and a thread copies
what they get to the terminal as well. Opened without a log folder (a caller that runs stages in
its own process) the console redirects nothing and prints to ``sys.stdout``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import IO, Optional


class Console:
    def __init__(self, log_dir: Optional[str] = None, echo: bool = False, name: str = "pipeline"):
        self.log_dir = log_dir
        self.echo = echo  # the logs' lines on the terminal too (--verbose)
        self.name = name  # the program, in error lines
        self.log_path: Optional[str] = None  # the log the current section writes to
        self._out: Optional[IO[str]] = None  # the terminal's stdout, once redirected
        self._err: Optional[IO[str]] = None  # and its stderr
        self._saved: list[int] = []
        self._tee: Optional[_Tee] = None

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
            if self.echo:
                self._tee = _Tee(self._saved[0])
        return self

    def __exit__(self, *exc) -> None:
        if self._saved:
            sys.stdout.flush()
            sys.stderr.flush()
            if self._tee is not None:
                self._tee.sync()  # our own output copied before the descriptors go back
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            if self._tee is not None:
                self._tee.close()
                self._tee = None
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
        if self._tee is not None:
            self._tee.sync(fd)  # the tee owns fd now; 1 and 2 stay on its pipe
        else:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        self.log_path = path
        return path

    def say(self, message: str) -> None:
        """One of our lines, timestamped; also written to the current log, so that the log
        alone reads in order."""
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self._tee is None or self.log_path is None:
            print(line, file=self.stream, flush=True)
        if self.redirected and self.log_path is not None:
            print(line, flush=True)  # with a tee, this one reaches the terminal too, in order

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
        print(f"{self.name}: error: " + "\n".join(lines) + where, file=self._err or sys.stderr, flush=True)


class _Tee:
    """Descriptors 1 and 2 into a pipe; a thread writes what comes out to the current log and
    to the terminal. It owns its descriptors: Ray's processes started meanwhile inherit the
    pipe and may write to it after the console closes, so the thread lives as long as they do.

    A section's switch is synchronous: a marker written through the pipe tells the thread where
    the old log's bytes end, so each line lands in the section it was written in."""

    MARKER = b"\x00dalle2-console-switch\x00"  # NUL bytes: not in any text output

    def __init__(self, terminal_fd: int):
        self._terminal = os.dup(terminal_fd)
        self._log: Optional[int] = None
        self._next: Optional[int] = None  # the log to switch to at the marker
        self._switched = threading.Event()
        read, write = os.pipe()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self._read = read
        self._thread = threading.Thread(target=self._copy, name="console-tee", daemon=True)
        self._thread.start()

    def _write(self, data: bytes) -> None:
        for fd in (self._log, self._terminal):
            if fd is not None and data:
                try:
                    os.write(fd, data)
                except OSError:  # a closed terminal: the log still gets it
                    pass

    def _copy(self) -> None:
        held = b""  # the end of a read that may be the start of a marker
        while True:
            try:
                chunk = os.read(self._read, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            data = held + chunk
            while self.MARKER in data:
                before, data = data.split(self.MARKER, 1)
                self._write(before)
                if self._next is not None:
                    if self._log is not None:
                        os.close(self._log)
                    self._log, self._next = self._next, None
                self._switched.set()
            keep = next((n for n in range(len(self.MARKER) - 1, 0, -1) if data.endswith(self.MARKER[:n])), 0)
            held = data[len(data) - keep:] if keep else b""
            self._write(data[: len(data) - keep])
        self._write(held)
        for fd in (self._read, self._log, self._terminal):
            if fd is not None:
                os.close(fd)

    def sync(self, log_fd: Optional[int] = None) -> None:
        """Wait until all written so far is copied; then, with ``log_fd``, copy into it (the
        old log is closed). Python's streams must be flushed first."""
        self._switched.clear()
        self._next = log_fd
        os.write(1, self.MARKER)
        self._switched.wait(timeout=10)

    def close(self) -> None:
        """Called after descriptors 1 and 2 were restored (and a sync): waits briefly for the
        pipe's end (its last writers may be Ray's processes, which keep it open), then leaves
        the thread to copy whatever they still write."""
        self._thread.join(timeout=1.0)


def log_dir_of(workdir: str) -> str:
    """Where a pipeline's full logs go: ``<workdir>/logs``, or a local folder for a workdir in
    object storage (logs are written through file descriptors)."""
    from dalle2.data import storage

    if "://" in workdir and not workdir.startswith("file://"):
        return os.path.join(os.path.abspath("dalle2-logs"), workdir.split("://", 1)[1].strip("/").replace("/", "_"))
    return os.path.join(storage.path_of(workdir), "logs")
