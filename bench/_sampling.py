"""A background sampler for the benchmarks: ``sample`` runs on a thread every 0.2 s while the
``with`` block runs (memory peaks of a federation happen between the benchmark's own steps).
"""

from __future__ import annotations

import threading
from typing import Self


class Sampler:
    """Subclasses say what one sample records; this class owns the thread and its stop."""

    interval_s = 0.2
    sample_at_start = True
    """False: the first sample after one interval (a child caught between fork and exec
    shows its parent's pages)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        if self.sample_at_start:
            self.sample()
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
