"""Shared benchmark helpers: interleaved A/B timing, medians, and ratio lines.

The machines are noisy, so nothing is judged on absolute time: each benchmark
alternates the baseline and the candidate within one run, many rounds, and
reports the ratio of their medians.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn()`` over ``repeat`` calls, in seconds."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    rounds: int,
    setup_candidate: Callable[[], object] = lambda: None,
    teardown_candidate: Callable[[], object] = lambda: None,
) -> tuple[float, float]:
    """Median seconds of baseline and candidate, alternating A, B, A, B..."""
    a, b = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        baseline()
        a.append(time.perf_counter() - start)
        setup_candidate()
        try:
            start = time.perf_counter()
            candidate()
            b.append(time.perf_counter() - start)
        finally:
            teardown_candidate()
    return statistics.median(a), statistics.median(b)


def line(name: str, base: float, cand: float, target: float | None = None) -> str:
    ratio = cand / base if base else float("inf")
    verdict = ""
    if target is not None:
        verdict = f"  (target <= {target:.2f}x: {'ok' if ratio <= target else 'MISSED'})"
    times = f"base {base * 1e3:9.3f} ms  forksafe {cand * 1e3:9.3f} ms"
    return f"{name:40} {times}  {ratio:6.3f}x{verdict}"


class IdleThreads:
    """Python threads that wait and do nothing, as many as asked, until ``stop()``."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def grow_to(self, n: int) -> None:
        while len(self._threads) < n:
            t = threading.Thread(target=self._stop.wait, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """End and join them all; the pool can grow again afterwards."""
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads.clear()
        self._stop.clear()
