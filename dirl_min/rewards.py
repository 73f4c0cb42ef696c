"""Rewards for DiPO (SPEC section 5): the public names, re-exported from where they now live.

:mod:`dirl_min.core.answers` (boxed-answer extraction, the checks that need no math-verify),
:mod:`dirl_min.core.rewards` (speed and shaping rewards, their combination),
:mod:`dirl_min.engine.verifier` (math-verify in bounded worker processes) and
:mod:`dirl_min.engine.grading` (accuracy through that verifier, batch scoring).
"""

from dirl_min.core.answers import MAX_ANSWER_CHARS, MAX_INT_EXPONENT, MAX_NESTING, extract_boxed
from dirl_min.core.rewards import (
    FORMAT_TAIL_CHARS,
    RewardInput,
    boxed_present_reward,
    combine_rewards,
    cosine_length_reward,
    format_reward,
    overlength_reward,
    repetition_reward,
    speed_reward,
)
from dirl_min.engine.grading import REWARDS, compute_rewards, math_reward, math_rewards
from dirl_min.engine.verifier import STARTUP_TIMEOUT, shutdown_verifiers, verifier_stats

__all__ = [
    "FORMAT_TAIL_CHARS",
    "MAX_ANSWER_CHARS",
    "MAX_INT_EXPONENT",
    "MAX_NESTING",
    "REWARDS",
    "RewardInput",
    "STARTUP_TIMEOUT",
    "boxed_present_reward",
    "combine_rewards",
    "compute_rewards",
    "cosine_length_reward",
    "extract_boxed",
    "format_reward",
    "math_reward",
    "math_rewards",
    "overlength_reward",
    "repetition_reward",
    "shutdown_verifiers",
    "speed_reward",
    "verifier_stats",
]
