"""Scoring responses: accuracy through the bounded verifier, then the named rewards of a batch.

:func:`math_reward` compares the last boxed answer with the ground truth: what
:func:`dirl_min.core.answers.screen_answer` cannot decide goes to math-verify in a verifier
child (:mod:`dirl_min.engine.verifier`). :data:`REWARDS` are the rules of
:data:`dirl_min.core.rewards.REWARD_RULES` with the accuracy computed when a sample does not
carry it; :func:`compute_rewards` scores a batch with a weighted sum
(:func:`dirl_min.core.rewards.combine_rewards`) and always reports 0/1 accuracy as
``parts["correct"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from dirl_min.core.answers import screen_answer
from dirl_min.core.rewards import ACCURACY_REWARDS, REWARD_RULES, RewardInput, combine_rewards
from dirl_min.engine.verifier import _POOL, _clean_timeout, _count, _verify_bounded

__all__ = ["REWARDS", "compute_rewards", "math_reward", "math_rewards"]


def math_reward(
    response: str, ground_truth: str, *, truncated: bool = False, timeout: float = 5.0
) -> float:
    """Accuracy reward: 1.0 if the last boxed answer equals the ground truth, else 0.0.

    Args:
        response: the decoded response.
        ground_truth: the reference answer (LaTeX, without ``\\boxed``; a boxed one is
            unwrapped).
        truncated: the response hit the length limit; it scores 0.0 even when its box is
            right (SPEC section 5: an unfinished response is not rewarded).
        timeout: hard bound in seconds on the math-verify step of this call (see the
            :mod:`dirl_min.engine.verifier` docstring; starting a verifier child, once per
            concurrent caller, is bounded separately by
            :data:`dirl_min.engine.verifier.STARTUP_TIMEOUT`).

    Returns:
        1.0 or 0.0. Never raises an ``Exception`` (KeyboardInterrupt still propagates), and
        may be called from any thread.
    """
    try:
        screened = screen_answer(response, ground_truth, truncated)
        if screened.stage == "no_answer":
            return 0.0
        _count("calls")
        if screened.stage != "verify":  # "fast_path" or "guarded"
            _count(screened.stage)
            return screened.score
        ok = _verify_bounded(screened.pred, screened.gold, _clean_timeout(timeout))
        return 1.0 if ok else 0.0
    except Exception:
        return 0.0


def math_rewards(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    truncated: Sequence[bool] | bool | None = None,
    *,
    timeout: float = 5.0,
    num_workers: int = 0,
) -> list[float]:
    """Accuracy rewards of a batch (same values as :func:`math_reward` one by one).

    Args:
        responses: decoded responses.
        ground_truths: reference answers, one per response.
        truncated: per-response truncation flags, or one bool / None for all.
        timeout: hard bound per answer, in seconds.
        num_workers: 0 checks the answers one after another; ``n > 0`` checks ``n`` at a
            time, each in its own verifier child, so a hung or crashing answer costs at
            most ``timeout`` and scores 0.0 (counted in :func:`verifier_stats`).

    Returns:
        One 0.0/1.0 per response, in order.

    Raises:
        ValueError: the sequences have different lengths.
    """
    n = len(responses)
    if isinstance(truncated, bool) or truncated is None:
        flags = [bool(truncated)] * n
    else:
        flags = [bool(t) for t in truncated]
    if len(ground_truths) != n or len(flags) != n:
        raise ValueError(
            f"math_rewards: {n} responses, {len(ground_truths)} ground truths, "
            f"{len(flags)} truncation flags"
        )

    def one(i: int) -> float:
        return math_reward(responses[i], ground_truths[i], truncated=flags[i], timeout=timeout)

    if num_workers <= 0 or n <= 1:
        return [one(i) for i in range(n)]
    workers = min(int(num_workers), n)
    _POOL.reserve(workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="math_reward") as ex:
        return list(ex.map(one, range(n)))


def _with_accuracy(rule: Callable[[RewardInput], float]) -> Callable[[RewardInput], float]:
    """``rule`` for samples whose accuracy may be unknown: it is computed here first."""

    def named(s: RewardInput) -> float:
        if s.correct is None:
            verdict = math_reward(s.response, s.ground_truth, truncated=s.truncated)
            s = replace(s, correct=verdict == 1.0)
        return rule(s)

    return named


#: Named rewards, each ``fn(sample: RewardInput) -> float``.
REWARDS: dict[str, Callable[[RewardInput], float]] = {
    name: _with_accuracy(rule) if name in ACCURACY_REWARDS else rule
    for name, rule in REWARD_RULES.items()
}


def compute_rewards(
    samples: Sequence[RewardInput],
    weights: Mapping[str, float],
    *,
    num_workers: int = 0,
    timeout: float = 5.0,
) -> tuple[list[float], dict[str, list[float]]]:
    """Score a batch: weighted sum of named rewards from :data:`REWARDS`.

    Accuracy is computed once for the whole batch (with ``num_workers`` verifier children)
    and shared by every accuracy-based reward.

    Args:
        samples: one :class:`RewardInput` per response.
        weights: reward name -> weight, e.g. ``{"speed": 1.0}`` (DiRL) or
            ``{"accuracy": 1.0, "overlength": 1.0}``.
        num_workers: parallel accuracy checks (see :func:`math_rewards`).
        timeout: hard bound per accuracy check, in seconds.

    Returns:
        ``(total, parts)``: ``total[i]`` the weighted sum for sample ``i``; ``parts`` maps
        each weighted name to its unweighted values, plus ``parts["correct"]`` (0.0/1.0
        accuracy) always, for the metrics and ``rl.group_filter: accuracy`` (DAPO).

    Raises:
        ValueError: a weight names an unknown reward (the message lists the known ones).
    """
    unknown = [k for k in weights if k not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward name(s) {unknown}; known names: {sorted(REWARDS)}")
    samples = list(samples)
    todo = [i for i, s in enumerate(samples) if s.correct is None]
    if todo:
        acc = math_rewards(
            [samples[i].response for i in todo],
            [samples[i].ground_truth for i in todo],
            [samples[i].truncated for i in todo],
            timeout=timeout,
            num_workers=num_workers,
        )
        for i, a in zip(todo, acc):
            samples[i] = replace(samples[i], correct=a == 1.0)
    parts: dict[str, list[float]] = {"correct": [1.0 if s.correct else 0.0 for s in samples]}
    for name in weights:
        parts[name] = [float(REWARDS[name](s)) for s in samples]
    total = combine_rewards({k: parts[k] for k in weights}, weights) if weights else None
    if not isinstance(total, list):
        total = [0.0] * len(samples)
    return total, parts
