"""Quiet long jobs: one line per stage on the terminal, everything else in a log file.

Building a pack runs torch, optimum, onnxruntime and llama.cpp, which print tracer warnings,
progress bars and C++ messages. `quiet_output` sends file descriptors 1 and 2 (so Python,
C libraries and child processes alike) to a log file and hands back a stream to the real
terminal; `Stages` writes one line per stage there: "[2/5] ARM 'positive' ... 12 s".
With verbose, nothing is redirected and the stage lines sit among everything else.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def quiet_output(log_path: Path, verbose: bool = False) -> Iterator[TextIO]:
    """Within: fds 1 and 2 write to `log_path` (appended) unless `verbose`. Yields the terminal."""
    if verbose:
        yield sys.stderr
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


class Stages:
    """Numbered stage lines on `out`; on a terminal the line counts seconds while it runs."""

    def __init__(self, names: list[str], out: TextIO, prefix: str = ""):
        self.names, self.out, self.prefix = names, out, prefix
        self.tty = out.isatty()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        i = self.names.index(name) + 1 if name in self.names else len(self.names)
        head = f"{self.prefix}[{i}/{len(self.names)}] {name} ..."
        self.out.write(head)
        self.out.flush()
        t0, done = time.monotonic(), threading.Event()
        ticker = threading.Thread(target=self._tick, args=(head, t0, done), daemon=True)
        if self.tty:
            ticker.start()
        try:
            yield
        except BaseException:
            done.set()
            if self.tty:
                ticker.join()
            self.out.write(
                f"\r{head} failed after {time.monotonic() - t0:.0f} s\n" if self.tty else " failed\n"
            )
            self.out.flush()
            raise
        done.set()
        if self.tty:
            ticker.join()
        end = f" {time.monotonic() - t0:.0f} s\n"
        self.out.write(f"\r{head}{end}" if self.tty else end)
        self.out.flush()

    def _tick(self, head: str, t0: float, done: threading.Event) -> None:
        while not done.wait(1.0):
            self.out.write(f"\r{head} {time.monotonic() - t0:.0f} s")
            self.out.flush()
