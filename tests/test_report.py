"""The bootstrap interval, the shared percent formatting and the main job's table."""

import itertools
import math

import pytest

from dirl_min.evaluation.stats import bootstrap_ci, format_percent, seeds_problems_bootstrap_ci
from dirl_min.evaluation.train_report import print_table, running_mean


def _exact_bootstrap_quantile(values, q):
    """Brute force: every one of the n^n equally likely resamples; the q-quantile atom of their means
    (smallest mean whose cumulative probability reaches q), with the distance of the CDF from q."""
    n = len(values)
    means = sorted(sum(c) / n for c in itertools.product(values, repeat=n))
    total = len(means)
    for i, m in enumerate(means):
        if (i + 1) / total >= q:
            below = sum(x < m for x in means) / total  # CDF just below the atom
            upto = sum(x <= m for x in means) / total
            return m, min(abs(below - q), abs(upto - q))
    raise AssertionError


@pytest.mark.parametrize("values", [[0.0, 0.0, 1.0, 1.0, 0.5], [0.0, 1.0, 0.5, 0.25, 0.75, 0.5]])
def test_bootstrap_interval_matches_the_exact_bootstrap_distribution(values):
    """With many resamples the percentile interval lands on the exact bootstrap quantiles, which a
    brute-force enumeration of all n^n resamples gives (atoms chosen away from the 2.5/97.5% edges)."""
    lo, hi = bootstrap_ci(values, resamples=40000, seed=1)
    for got, q in ((lo, 0.025), (hi, 0.975)):
        atom, margin = _exact_bootstrap_quantile(values, q)
        assert margin > 0.004  # the Monte-Carlo quantile cannot straddle two atoms at 40000 draws
        assert got == pytest.approx(atom, abs=1e-12)


def test_bootstrap_interval_by_hand():
    """[0, 1]: the 4 resamples have means 0, 0.5, 0.5, 1, so the 95% interval is the whole [0, 1];
    a constant has a zero-width interval; the interval holds the mean and narrows as n grows."""
    lo, hi = bootstrap_ci([0.0, 1.0], resamples=20000)
    assert (lo, hi) == (0.0, 1.0)
    assert bootstrap_ci([0.3] * 7) == pytest.approx((0.3, 0.3))
    small = bootstrap_ci([0.0, 1.0] * 5)
    large = bootstrap_ci([0.0, 1.0] * 200)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 4  # ~ 1/sqrt(n): 20x the problems, ~4.5x narrower
    assert bootstrap_ci([0.0, 1.0, 1.0], seed=3) == bootstrap_ci([0.0, 1.0, 1.0], seed=3)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_percent_formatting_is_one_decimal():
    assert format_percent(0.41369) == "41.4"
    assert format_percent(0.0) == "0.0"
    assert format_percent(1.0) == "100.0"
    assert format_percent(0.00049) == "0.0"
    assert format_percent(float("nan")) == "-"


def test_running_mean_is_a_trailing_window():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0, 9.0], 5) == [2.0, 3.0, 5.0]
    assert running_mean([2.0, 4.0], 1) == [2.0, 4.0]


def test_train_table_prints_percent_with_the_interval_and_the_paired_gain():
    stage = {"accuracy": 0.4137, "accuracy_ci": [0.35, 0.4791], "greedy_accuracy": 0.625, "pass@16": 0.9,
             "tokens_per_step": 2.613, "mean_length": 6.04, "truncation_rate": 0.0}
    table = print_table({"samples": 16, "sft": stage, "rl": {**stage, "accuracy": 0.5},
                         "rl_minus_sft": {"mean": 0.0863, "ci": [0.041, 0.132]}})
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["stage", "avg@16", "[95%"]
    assert lines[1].split() == ["sft", "41.4", "[35.0,", "47.9]", "62.5", "90.0", "2.61", "6.0", "0.0"]
    assert lines[2].split()[1] == "50.0"
    assert "+8.6 points [+4.1, +13.2]" in lines[3]
    assert not any(math.isnan(float(c)) for c in lines[1].replace("[", "").replace("]", "").replace(",", "").split()[1:])


def test_eval_cli_shares_the_main_jobs_evaluation_defaults():
    """Where the two can agree they come from one place (max_new_tokens cannot: 8192 for benchmarks)."""
    from dirl_min import eval as E
    from dirl_min.settings.config import Config

    ev, cfg = E.parse_config([]), Config()
    assert (ev.eval.samples, ev.eval.temperature, ev.eval.top_k, ev.eval.top_p) == (
        cfg.eval.samples, cfg.eval.temperature, cfg.eval.top_k, cfg.eval.top_p)
    assert (ev.decode.strategy, ev.decode.evaluated) == (cfg.decode.strategy, [cfg.decode.threshold])


def test_eval_table_uses_the_same_percent_format():
    from dirl_min import eval as E

    run = {"benchmark": "embedded", "threshold": 0.9, "problems": 88, "samples": 16, "accuracy": 0.41369,
           "accuracy_ci": [0.3501, 0.48], "pass@k": {"1": 0.41369, "16": 0.90909}, "tokens_per_step": 2.6,
           "mean_length": 6.0, "truncation_rate": 0.0125, "runtime": {"tokens_per_second": None}}
    row = E.summarize({"runs": [run]}).splitlines()[2].split()
    assert row[3:8] == ["41.4", "[35.0,", "48.0]", "90.9", "2.60"]
    assert row[9] == "1.2"


def _exact_crossed_quantile(table, q):
    """Brute force: every equally likely draw of S rows and n columns with replacement; the
    q-quantile atom of the grand means, with the distance of the CDF from q."""
    s, n = len(table), len(table[0])
    means = sorted(sum(table[i][j] for i in rows for j in cols) / (s * n)
                   for rows in itertools.product(range(s), repeat=s) for cols in itertools.product(range(n), repeat=n))
    total = len(means)
    for i, m in enumerate(means):
        if (i + 1) / total >= q:
            below, upto = sum(x < m for x in means) / total, sum(x <= m for x in means) / total
            return m, min(abs(below - q), abs(upto - q))
    raise AssertionError


def test_seeds_problems_interval_matches_the_exact_crossed_bootstrap():
    """Seeds and problems resampled independently: the percentile interval lands on the exact
    quantiles of all S^S · n^n resamples (a resampler ignoring either factor would not)."""
    table = [[0.0, 1.0, 0.5, 0.0], [1.0, 1.0, 0.75, 0.25], [0.25, 0.0, 0.0, 0.5]]
    lo, hi = seeds_problems_bootstrap_ci(table, resamples=40000, seed=1)
    for got, q in ((lo, 0.025), (hi, 0.975)):
        atom, margin = _exact_crossed_quantile(table, q)
        assert margin > 0.002
        assert got == pytest.approx(atom, abs=1e-12)


def test_seeds_problems_interval_includes_seed_to_seed_variation():
    """Each seed constant over problems: only seeds vary, and the interval is the bootstrap over seeds;
    one seed: the problem bootstrap's width (a resampler of problems alone would give zero width above)."""
    shifts = [0.02, 0.09, 0.05, 0.07, 0.04]
    table = [[c] * 50 for c in shifts]
    assert seeds_problems_bootstrap_ci(table, resamples=3000, seed=2) == pytest.approx(
        bootstrap_ci(shifts, resamples=3000, seed=2), abs=1e-12)
    row = [0.0, 1.0, 0.5, 0.25] * 25
    lo, hi = seeds_problems_bootstrap_ci([row], resamples=20000)
    blo, bhi = bootstrap_ci(row, resamples=20000)
    assert hi - lo == pytest.approx(bhi - blo, rel=0.05)
    with pytest.raises(ValueError):
        seeds_problems_bootstrap_ci([0.1, 0.2])
