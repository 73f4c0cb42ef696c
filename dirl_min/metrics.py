"""Evaluation metrics over repeated samples: avg@k and the unbiased pass@k estimator.

For a problem with ``n`` samples of which ``c`` are correct, ``pass@k`` estimates the
probability that at least one of ``k`` samples drawn without replacement from those ``n``
is correct: ``1 - C(n - c, k) / C(n, k)`` (Chen et al., 2021). ``avg@n`` is ``c / n``.
Benchmark values are the means over problems.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["pass_at_k", "mean_pass_at_k", "avg_at_k", "pass_ks"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: ``1 - C(n - c, k) / C(n, k)``.

    Args:
        n: samples drawn (``n >= 1``); c: correct ones (``0 <= c <= n``); k: ``1 <= k <= n``.

    Raises:
        ValueError: arguments outside those ranges.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise ValueError(f"pass_at_k: n, c, k must be ints, got {n!r}, {c!r}, {k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # exact integers, one rounding


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given ``(n, c)`` per problem (0.0 for no problems)."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    return sum(values) / len(values) if values else 0.0


def avg_at_k(counts: Iterable[tuple[int, int]]) -> float:
    """Mean over problems of the fraction of correct samples, ``c / n`` (0.0 for no problems)."""
    values = [c / n for n, c in counts]
    return sum(values) / len(values) if values else 0.0


def pass_ks(samples: int) -> list[int]:
    """The k reported for ``samples`` draws: powers of two up to ``samples``, plus ``samples``."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    ks: list[int] = []
    k = 1
    while k <= samples:
        ks.append(k)
        k *= 2
    if ks[-1] != samples:
        ks.append(samples)
    return ks

