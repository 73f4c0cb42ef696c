"""Evaluation metrics over repeated samples: avg@k and the unbiased pass@k estimator.

For a problem with ``n`` samples of which ``c`` are correct, ``pass@k`` estimates the
probability that at least one of ``k`` samples drawn without replacement from those ``n``
is correct: ``1 - C(n - c, k) / C(n, k)`` (Chen et al., 2021). ``avg@n`` is ``c / n``.
Benchmark values are the means over problems. Their uncertainty from the finite problem set
is a percentile bootstrap over problems (:func:`bootstrap_ci`). Accuracies are printed as
percent with one decimal, as papers print them (:func:`format_percent`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

__all__ = ["pass_at_k", "mean_pass_at_k", "avg_at_k", "pass_ks", "bootstrap_ci", "seeds_problems_bootstrap_ci", "format_percent"]


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



def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (one value per problem).

    Draws ``resamples`` sets of ``n = len(values)`` problems with replacement (a seeded
    generator: the same inputs give the same interval) and returns the ``(1 - level) / 2``
    and ``(1 + level) / 2`` quantiles of their means. For a paired comparison of two stages on
    the same problems pass the per-problem differences.

    Args:
        values: float ``[n]``, ``n >= 1``.

    Returns:
        ``(lo, hi)`` with ``lo <= mean(values) <= hi`` up to the resampling noise.
    """
    if len(values) < 1:
        raise ValueError("bootstrap_ci: need at least one value")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"bootstrap_ci: need 0 < level < 1 and resamples >= 1; got level={level}, resamples={resamples}")
    x = torch.as_tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (resamples, len(x)), generator=gen)  # [R, n]
    means = x[idx].mean(dim=1)  # [R]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return lo, hi


def seeds_problems_bootstrap_ci(values, *, level: float = 0.95, resamples: int = 4000,
                                seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the grand mean of ``values[s, p]`` over runs and problems.

    For several training seeds evaluated on the same problems (seeds and problems crossed):
    each resample draws ``S`` seeds and, independently, ``n`` problems with replacement and
    averages ``values`` over the drawn rows and columns, so the interval includes seed-to-seed
    variation as well as the finite problem set. The seed indices are drawn first, exactly as
    :func:`bootstrap_ci` draws its indices (rows constant over problems give its interval).

    Args:
        values: float ``[S, n]``, e.g. each seed's paired per-problem RL − SFT differences.

    Returns:
        ``(lo, hi)``.
    """
    x = torch.as_tensor(values, dtype=torch.float64)
    if x.dim() != 2 or x.numel() < 1:
        raise ValueError(f"seeds_problems_bootstrap_ci: need a non-empty [seeds, problems] table, got shape {tuple(x.shape)}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"seeds_problems_bootstrap_ci: need 0 < level < 1 and resamples >= 1; got {level}, {resamples}")
    s, n = x.shape
    gen = torch.Generator().manual_seed(seed)
    seed_idx = torch.randint(0, s, (resamples, s), generator=gen)  # [R, S]
    prob_idx = torch.randint(0, n, (resamples, n), generator=gen)  # [R, n]
    # how often each seed / problem is drawn: the resample mean is w_s · x · w_p / (S n)
    w_s = torch.zeros(resamples, s, dtype=torch.float64).scatter_add_(1, seed_idx, torch.ones(resamples, s, dtype=torch.float64))
    w_p = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, prob_idx, torch.ones(resamples, n, dtype=torch.float64))
    means = ((w_s @ x) * w_p).sum(dim=1) / (s * n)  # [R]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return lo, hi


def format_percent(fraction: float) -> str:
    """A fraction in [0, 1] as percent with one decimal: ``0.4137 -> '41.4'`` (nan -> ``'-'``)."""
    return "-" if fraction is None or math.isnan(fraction) else f"{100 * fraction:.1f}"
