"""Rewards for DiPO (SPEC section 5): DiRL speed, the auxiliary shaping terms, and their sum.

:func:`speed_reward` is DiRL's cosine speed reward (it already contains accuracy);
:func:`format_reward`, :func:`boxed_present_reward`, :func:`repetition_reward`,
:func:`overlength_reward` (DAPO) and :func:`cosine_length_reward` are optional shaping
terms. :data:`REWARD_RULES` maps names to functions of one :class:`RewardInput`;
:func:`combine_rewards` is their weighted sum. The accuracy itself (math-verify in bounded
processes) is decided in :mod:`dirl_min.engine.grading`, which also scores whole batches.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dirl_min.core.answers import _BOX_OPEN, _last_box_span, extract_boxed

__all__ = [
    "ACCURACY_REWARDS",
    "FORMAT_TAIL_CHARS",
    "REWARD_RULES",
    "RewardInput",
    "boxed_present_reward",
    "combine_rewards",
    "cosine_length_reward",
    "format_reward",
    "overlength_reward",
    "repetition_reward",
    "speed_reward",
]

# --------------------------------------------------------------------------------------
# Speed and shaping rewards
# --------------------------------------------------------------------------------------


def speed_reward(num_tokens: int, num_steps: int, block_size: int, correct: bool) -> float:
    """DiRL speed reward (SPEC section 5), which already contains the accuracy signal.

    ``v = num_tokens / num_steps`` (tokens committed per distinct decoding step),
    ``s = clamp(v - 1, 0, B - 1)``, ``c = (1 - cos(pi s / (B - 1))) / 2`` (0 when B = 1).
    Correct answers get ``0.5 + 0.5 c`` (0.5 when decoding one token per step, 1.0 at a
    whole block per step); wrong answers get ``-0.5 c``, so decoding a wrong answer fast is
    penalised rather than rewarded.

    Args:
        num_tokens: response length ``|o|``.
        num_steps: number of distinct decoding steps; ``<= 0`` (nothing decoded) gives
            ``c = 0``, i.e. the accuracy-only value.
        block_size: block size ``B``.
        correct: whether the answer is right.

    Returns:
        A float in [0.5, 1.0] when correct, in [-0.5, 0.0] when wrong.
    """
    B = int(block_size)
    if num_steps <= 0 or B <= 1:
        c = 0.0
    else:
        v = num_tokens / num_steps
        s = min(max(v - 1.0, 0.0), B - 1.0)
        c = (1.0 - math.cos(math.pi * s / (B - 1))) / 2.0
    return 0.5 + 0.5 * c if correct else -0.5 * c


#: Characters allowed after the final box for :func:`format_reward` (``$``, ``.``, ``\\]`` ...).
FORMAT_TAIL_CHARS = 32


def format_reward(response: str) -> float:
    """1.0 for a well-formed final answer, else 0.0.

    Well-formed means: exactly one ``\\boxed``/``\\fbox`` in the response, it is complete
    with non-blank content, every brace of the response is balanced, and at most
    :data:`FORMAT_TAIL_CHARS` non-whitespace characters follow it (the answer is at the end,
    not followed by more reasoning). Stricter than :func:`boxed_present_reward`, which only
    asks for some complete box.
    """
    if not isinstance(response, str):
        return 0.0
    if sum(1 for _ in zip(range(2), _BOX_OPEN.finditer(response))) != 1:
        return 0.0
    span = _last_box_span(response)
    if span is None or not response[span[1] : span[2]].strip():
        return 0.0
    depth = 0
    for m in re.finditer(r"[{}]", response):
        depth += 1 if m.group() == "{" else -1
        if depth < 0:
            return 0.0
    if depth != 0:
        return 0.0
    tail = "".join(response[span[2] + 1 :].split())
    return 1.0 if len(tail) <= FORMAT_TAIL_CHARS else 0.0


def boxed_present_reward(response: str) -> float:
    """1.0 if the response has a complete box with non-blank content, else 0.0."""
    box = extract_boxed(response)
    return 1.0 if box is not None and box.strip() else 0.0


def repetition_reward(response: str, *, ngram: int = 3, unit: str = "word") -> float:
    """Minus the fraction of repeated n-grams, in [-1, 0].

    ``-(total - distinct) / total`` over the response's n-grams, so a response without a
    repeated n-gram scores 0 and one that loops the same n-gram approaches -1. Responses
    with fewer than ``ngram`` units score 0.

    Args:
        response: the decoded response.
        ngram: n-gram length, >= 1.
        unit: ``"word"`` (whitespace tokens) or ``"char"`` (characters).

    Raises:
        ValueError: bad ``ngram`` or ``unit``.
    """
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    if unit == "word":
        units: Sequence = response.split()
    elif unit == "char":
        units = response
    else:
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
    total = len(units) - ngram + 1
    if total <= 0:
        return 0.0
    distinct = len(set(zip(*(units[i:] for i in range(ngram)))))
    repeated = total - distinct
    return -repeated / total if repeated else 0.0


def overlength_reward(num_tokens: int, max_tokens: int, *, buffer: int) -> float:
    """DAPO soft over-length penalty, in [-1, 0].

    0 up to ``max_tokens - buffer`` tokens, then linearly down to -1 at ``max_tokens``, and
    -1 beyond. ``buffer <= 0`` gives a hard step at ``max_tokens``.
    """
    if num_tokens > max_tokens:
        return -1.0
    if buffer <= 0:
        return 0.0
    expected = max_tokens - buffer
    if num_tokens <= expected:
        return 0.0
    return (expected - num_tokens) / buffer


def cosine_length_reward(
    num_tokens: int,
    max_tokens: int,
    correct: bool,
    *,
    truncated: bool = False,
    correct_range: tuple[float, float] = (1.0, 0.5),
    wrong_range: tuple[float, float] = (-1.0, 0.0),
    exceed_penalty: float = -1.0,
) -> float:
    """Cosine length-scaled accuracy reward (Yeo et al. 2025, "Demystifying long CoT").

    The reward moves along half a cosine from ``range[0]`` at 0 tokens to ``range[1]`` at
    ``max_tokens``: by default short correct answers earn more (1.0 -> 0.5) and wrong
    answers are penalised less when the model kept thinking (-1.0 -> 0.0). Truncated or
    over-long responses get ``exceed_penalty``.
    """
    if truncated or num_tokens > max_tokens or max_tokens <= 0:
        return exceed_penalty
    r0, r1 = correct_range if correct else wrong_range
    t = min(max(num_tokens, 0), max_tokens) / max_tokens
    return r1 + 0.5 * (r0 - r1) * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------
# Registry and combination
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardInput:
    """Everything a named reward may look at for one response.

    ``correct`` is the accuracy when already known (``compute_rewards`` fills it once per
    batch so that "accuracy", "speed" and "cosine" do not re-run math-verify); None means
    not known yet: the rules here refuse it, :data:`dirl_min.engine.grading.REWARDS`
    computes it. ``overlength_buffer`` None means ``max_tokens // 5`` (DAPO: 4096 of
    20480).
    """

    response: str
    ground_truth: str
    num_tokens: int = 0
    num_steps: int = 0
    block_size: int = 1
    truncated: bool = False
    max_tokens: int = 0
    correct: bool | None = None
    overlength_buffer: int | None = None


def _is_correct(s: RewardInput) -> bool:
    if s.correct is None:  # deciding it takes math-verify, which is the engine's business
        raise ValueError(
            "RewardInput.correct is None; accuracy-based rewards need the verdict "
            "(dirl_min.engine.grading.REWARDS and compute_rewards compute it)"
        )
    return bool(s.correct)


def _overlength(s: RewardInput) -> float:
    if s.max_tokens <= 0:  # no known limit: nothing to penalise
        return 0.0
    buffer = s.max_tokens // 5 if s.overlength_buffer is None else s.overlength_buffer
    return overlength_reward(s.num_tokens, s.max_tokens, buffer=buffer)


#: Named reward rules, each ``fn(sample: RewardInput) -> float``; those named in
#: :data:`ACCURACY_REWARDS` read ``sample.correct``, which must be known.
REWARD_RULES: dict[str, Callable[[RewardInput], float]] = {
    "accuracy": lambda s: 1.0 if _is_correct(s) else 0.0,
    "speed": lambda s: speed_reward(s.num_tokens, s.num_steps, s.block_size, _is_correct(s)),
    "format": lambda s: format_reward(s.response),
    "boxed": lambda s: boxed_present_reward(s.response),
    "repetition": lambda s: repetition_reward(s.response),
    "overlength": _overlength,
    "cosine": lambda s: cosine_length_reward(
        s.num_tokens, s.max_tokens, _is_correct(s), truncated=s.truncated
    ),
}

#: The rules that depend on the accuracy verdict.
ACCURACY_REWARDS = frozenset({"accuracy", "speed", "cosine"})


def _is_seq(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes))


def combine_rewards(
    components: Mapping[str, float | Sequence[float]], weights: Mapping[str, float]
) -> float | list[float]:
    """Weighted sum ``sum_k weights[k] * components[k]``.

    Args:
        components: named reward values, each a float or a per-sample sequence (all
            sequences the same length; floats are broadcast). Components without a weight
            are ignored.
        weights: name -> weight; every name must be a component.

    Returns:
        A float if every weighted component is a float, else a list (one per sample).

    Raises:
        ValueError: a weight names an unknown component (the message lists the known
            ones), or sequence lengths differ.
    """
    unknown = [k for k in weights if k not in components]
    if unknown:
        raise ValueError(
            f"unknown reward name(s) {unknown}; known names: {sorted(components)}"
        )
    used = {k: components[k] for k in weights}
    lengths = {len(v) for v in used.values() if _is_seq(v)}
    if not lengths and not used:
        lengths = {len(v) for v in components.values() if _is_seq(v)}
    if len(lengths) > 1:
        raise ValueError(f"reward components have different lengths: {sorted(lengths)}")
    if not lengths:
        return float(sum(float(weights[k]) * float(v) for k, v in used.items()))
    (n,) = lengths
    total = [0.0] * n
    for k, v in used.items():
        w = float(weights[k])
        if _is_seq(v):
            for i in range(n):
                total[i] += w * float(v[i])
        else:
            for i in range(n):
                total[i] += w * float(v)
    return total
