"""Slow, obviously-correct rewards to test :mod:`dirl_min.rewards` against.

Written independently of the core: ``extract_boxed`` looks at every position of the text
and matches braces with a counter (quadratic, fine for tests); ``speed_reward`` is the SPEC
section 5 formula transcribed with ``math.cos``.
"""

from __future__ import annotations

import math

_COMMANDS = ("\\boxed", "\\fbox")
_TEX_SPACE = " \t\r\n"


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``/``\\fbox{...}`` (by opener position), or None.

    For every opener, count braces from its ``{``: +1 for ``{``, -1 for ``}``; the box is
    complete when the count returns to 0. Later complete boxes replace earlier ones.
    """
    if not isinstance(text, str):
        return None
    answer = None
    n = len(text)
    for i in range(n):
        for cmd in _COMMANDS:
            if text[i : i + len(cmd)] != cmd:
                continue
            j = i + len(cmd)
            while j < n and text[j] in _TEX_SPACE:
                j += 1
            if j >= n or text[j] != "{":
                continue
            count = 0
            for k in range(j, n):
                if text[k] == "{":
                    count += 1
                elif text[k] == "}":
                    count -= 1
                if count == 0:
                    answer = text[j + 1 : k]
                    break
    return answer


def speed_reward(num_tokens: int, num_steps: int, block_size: int, correct: bool) -> float:
    """SPEC section 5: v = |o|/steps, s = clamp(v-1, 0, B-1), c = (1 - cos(pi s/(B-1)))/2.

    Correct: 0.5 + 0.5 c; wrong: -0.5 c. Conventions shared with the core: c = 0 when
    B = 1 (no speed-up possible) or when no step was taken.
    """
    if block_size == 1 or num_steps <= 0:
        c = 0.0
    else:
        v = num_tokens / num_steps
        s = v - 1
        if s < 0:
            s = 0
        if s > block_size - 1:
            s = block_size - 1
        c = (1 - math.cos(math.pi * s / (block_size - 1))) / 2
    if correct:
        return 0.5 + 0.5 * c
    return -0.5 * c
