"""Timing configurations side by side: warm up each, then time them interleaved."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

@dataclass
class Case:
    """One configuration to time: ``run()`` is timed, ``warm()`` (default: ``run``) is run first.

    ``times`` holds wall-clock seconds (``time.perf_counter``), ``cpu_times`` this process's
    CPU seconds (``time.process_time``); :attr:`median` uses the one named by ``clock``.
    """

    name: str
    run: Callable[[], Any]
    warm: Callable[[], Any] | None = None
    clock: str = "wall"
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.cpu_times if self.clock == "cpu" else self.times)


def time_cases(
    cases: list[Case],
    repeats: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
) -> list[Case]:
    """Warm every case up once, then time ``repeats`` rounds, interleaved.

    Round ``r`` runs the cases in an order rotated by ``r``, so slow phases of a shared
    machine fall on all cases alike. Each case keeps its wall and CPU times and its last result.
    """
    for c in cases:
        (c.warm or c.run)()
    for r in range(repeats):
        k = r % len(cases)
        for c in cases[k:] + cases[:k]:
            t0, c0 = clock(), cpu_clock()
            c.result = c.run()
            c.times.append(clock() - t0)
            c.cpu_times.append(cpu_clock() - c0)
    return cases
