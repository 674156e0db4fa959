"""What the demo shows: the terminal writer, the demo's error, and durations and URLs written for people.

While Airflow runs, file descriptors 1 and 2 go to ``demo.log`` (:func:`.airflow_setup.output_to`); the
:class:`Console` keeps its own copy of the terminal, so progress and the summary still reach it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and where to look."""


class Console:
    """The terminal (a duplicate of stdout, made at start), and the summary's lines (:attr:`report`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the progress thread writes too
        self._terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self.report: list[str] = []  # the summary, also written to $ASTRA_HOME/demo-summary.txt

    def say(self, text: str = "", *, report: bool = False) -> None:
        with self._lock:
            self._terminal.write(text + "\n")
            self._terminal.flush()
            if report:
                self.report.append(text)

    def report_line(self, text: str = "") -> None:
        """Write a line of the summary: to the terminal, and to :attr:`report`."""
        self.say(text, report=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._terminal.close()


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"
