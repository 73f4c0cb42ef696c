"""Progress lines for output that goes to a file (nohup, CI logs), where no progress bar shows.

``dirl_min.train`` prints one line per logged step (every ``run.log_every`` steps) when
stderr is not a terminal, e.g.::

    rl step 120/600 (20%) | reward 0.512 | accuracy 0.512 | elapsed 0:01:02 | remaining ~0:04:08

On a terminal a tqdm bar shows instead. The environment variable ``DIRL_PROGRESS``
overrides the choice: ``1`` = the bar, ``lines`` = the lines, ``0`` = neither.
"""

from __future__ import annotations

import math
import sys
import time

from dirl_min.infra.errors import SettingsError

__all__ = ["SHOWN", "progress_mode", "clock_text", "progress_line", "ProgressLines"]

#: logged values shown in a line, in this order, when present
SHOWN = ("loss", "reward", "accuracy", "kept_fraction")


def progress_mode(isatty: bool, env: str | None) -> str:
    """``"bar"``, ``"lines"`` or ``"off"``: from ``DIRL_PROGRESS`` (``env``) when set, else
    the bar on a terminal and lines otherwise."""
    choices = {"1": "bar", "lines": "lines", "0": "off"}
    if env:
        if env not in choices:
            raise SettingsError(f"DIRL_PROGRESS = {env!r}: expected 1 (progress bar), lines or 0 (neither)")
        return choices[env]
    return "bar" if isatty else "lines"


def clock_text(seconds: float) -> str:
    """``h:mm:ss``; ``?`` when unknown (not finite)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(stage: str, step: int, total: int, values: dict, elapsed: float, start: int = 0) -> str:
    """One progress line. ``elapsed``: seconds since step ``start`` (where this process began the
    stage, e.g. a resumed checkpoint); the remaining time assumes the same pace."""
    done = step - start
    remaining = elapsed / done * (total - step) if done > 0 else math.nan
    parts = [f"{stage} step {step}/{total} ({100 * step / max(1, total):.0f}%)"]
    parts += [f"{k} {values[k]:.3f}" for k in SHOWN if isinstance(values.get(k), (int, float))]
    parts += [f"elapsed {clock_text(elapsed)}", f"remaining ~{clock_text(remaining)}"]
    return " | ".join(parts)


class ProgressLines:
    """Prints :func:`progress_line` for each logged step of a stage begun with :meth:`begin`."""

    def __init__(self, stream=None, clock=time.perf_counter):
        self.stream, self.clock, self.stages = stream, clock, {}

    def begin(self, stage: str, start: int, total: int) -> None:
        self.stages[stage] = (start, total, self.clock())

    def show(self, stage: str, step: int, values: dict) -> None:
        if stage not in self.stages:
            return
        start, total, t0 = self.stages[stage]
        print(progress_line(stage, step, total, values, self.clock() - t0, start), file=self.stream or sys.stderr,
              flush=True)
