"""Answers (SPEC section 5): the last boxed answer, and the checks that need no math-verify.

:func:`extract_boxed` takes the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) of a
response. :func:`screen_answer` decides what it can without sympy, the first of the three
layers that bound the time of an accuracy check (:mod:`dirl_min.engine.verifier` holds the
other two): truncated / no box -> 0.0; the answer equal to the ground truth up to
whitespace, or both integer literals -> their comparison; answers that are known sympy traps
-> 0.0 (longer than :data:`MAX_ANSWER_CHARS`, bracket nesting deeper than
:data:`MAX_NESTING`, or an integer power tower / factorial whose exponent or operand exceeds
:data:`MAX_INT_EXPONENT`). The guards accept every one of the 17.5k ground truths in the
benchmark files. Everything else goes to math-verify.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_INT_EXPONENT",
    "MAX_NESTING",
    "Screened",
    "extract_boxed",
    "screen_answer",
]

# --------------------------------------------------------------------------------------
# \boxed{} extraction
# --------------------------------------------------------------------------------------

# A box opener: \boxed or \fbox, optional TeX whitespace, then the opening brace.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)[ \t\r\n]*\{")
# Openers and single braces in one scan, so the Python loop only visits braces.
_BOX_OPEN_OR_BRACE = re.compile(r"\\(?:boxed|fbox)[ \t\r\n]*\{|[{}]")


def _last_box_span(text: str) -> tuple[int, int, int] | None:
    """(opener start, content start, content end) of the last complete box, or None.

    One left-to-right pass with a stack of open braces (linear time): a closing brace pops
    the innermost open one, exactly as a per-box brace counter would, so a box is complete
    iff its opening brace gets popped. "Last" means the latest opener among complete boxes.
    """
    first = _BOX_OPEN.search(text)
    if first is None:
        return None
    stack: list[int] = []  # per open brace: index of its box opener, or -1 for a plain brace
    best: tuple[int, int, int] | None = None
    for m in _BOX_OPEN_OR_BRACE.finditer(text, first.start()):
        s, e = m.span()
        if e - s > 1:  # a box opener (ends with its "{")
            stack.append(s)
        elif text[s] == "{":
            stack.append(-1)
        elif stack:  # "}" closing the innermost open brace; stray "}" are ignored
            opener = stack.pop()
            if opener >= 0 and (best is None or opener > best[0]):
                content_start = text.index("{", opener) + 1
                best = (opener, content_start, s)
    return best


def extract_boxed(text: str) -> str | None:
    """Return the content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``.

    Braces are matched by counting every ``{`` and ``}`` character (escaped ``\\{``
    included, as in the usual MATH graders), so nested braces are fine. Whitespace is
    allowed between the command and its brace (``\\boxed {x}``). A box whose braces never
    close is skipped and the latest *complete* box wins, e.g. ``"\\boxed{1} \\boxed{2"``
    gives ``"1"``; for nested boxes the inner one starts later and wins.

    Args:
        text: a model response.

    Returns:
        The box content (not stripped), or None when there is no complete box or
        ``text`` is not a string. Linear time; never raises.
    """
    if not isinstance(text, str):
        return None
    try:
        span = _last_box_span(text)
    except Exception:  # defensive: extraction must never take a training step down
        return None
    return None if span is None else text[span[1] : span[2]]


# --------------------------------------------------------------------------------------
# Cheap guards against answers that make sympy hang
# --------------------------------------------------------------------------------------

#: Longest box content that is sent to math-verify; real final answers are < 200 chars.
MAX_ANSWER_CHARS = 1000
#: Deepest allowed nesting of ``{ ( [``; real answers stay below 10.
MAX_NESTING = 64
#: Largest integer exponent / factorial operand evaluated exactly (10^100000 takes ~0.3 s).
MAX_INT_EXPONENT = 100_000

_TOWER_TOKEN = re.compile(r"\d+|\^|[{}()]")
_TOWER_CHARS = re.compile(r"[\d\s^{}()]+")


def _int_tower_value(s: str) -> float | None:
    """Value (as a float, inf when huge) of ``s`` if it is an integer power tower.

    ``s`` may only hold digits, spaces, braces, parentheses and ``^`` (e.g. ``10^{10^{10}}``);
    anything else (letters, commands, operators) returns None: symbolic exponents stay
    symbolic in sympy and are cheap. Evaluated right to left in log space so it never
    overflows.
    """
    if not s or not _TOWER_CHARS.fullmatch(s):
        return None
    nums = [t for t in _TOWER_TOKEN.findall(s) if t.isdigit()]
    if not nums:
        return None
    if s.count("^") != len(nums) - 1:  # juxtaposed numbers ("10 10") are not a tower
        return None
    value = float(int(nums[-1])) if len(nums[-1]) < 300 else math.inf
    for digits in reversed(nums[:-1]):
        base = int(digits) if len(digits) < 300 else 10**300
        if base <= 1:
            value = float(base)  # 0^x, 1^x stay small
            continue
        log10 = value * math.log10(base)
        value = math.inf if log10 > 300 else 10.0**log10
    return value


def _group_after(s: str, i: int) -> str:
    """The argument that starts at ``s[i]`` (after ``^``): a brace group, a number, a char."""
    n = len(s)
    while i < n and s[i] in " \t\r\n":
        i += 1
    if i >= n:
        return ""
    if s[i] == "{":
        depth = 0
        for j in range(i, n):
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
                if depth == 0:
                    return s[i + 1 : j]
        return s[i + 1 :]
    if s[i].isdigit():
        j = i
        while j < n and s[j].isdigit():
            j += 1
        return s[i:j]
    return s[i]


def _group_before(s: str, i: int) -> str:
    """The operand that ends at ``s[i]`` (before ``!``): a bracket group or a number."""
    while i >= 0 and s[i] in " \t\r\n":
        i -= 1
    if i < 0:
        return ""
    close = s[i]
    if close in ")}":
        open_ = "(" if close == ")" else "{"
        depth = 0
        for j in range(i, -1, -1):
            if s[j] == close:
                depth += 1
            elif s[j] == open_:
                depth -= 1
                if depth == 0:
                    return s[j + 1 : i]
        return ""
    j = i
    while j >= 0 and s[j].isdigit():
        j -= 1
    return s[j + 1 : i + 1]


def _refusal_reason(answer: str) -> str | None:
    """Why ``answer`` is not sent to sympy (a known hang pattern), or None when it is fine."""
    if len(answer) > MAX_ANSWER_CHARS:
        return "too long"
    depth = deepest = 0
    for ch in answer:
        if ch in "{([":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "})]":
            depth = max(depth - 1, 0)
    if deepest > MAX_NESTING:
        return "nested too deep"
    # Bounded by MAX_ANSWER_CHARS, so the scans below are cheap.
    for m in re.finditer(r"\^", answer):
        value = _int_tower_value(_group_after(answer, m.end()))
        if value is not None and value > MAX_INT_EXPONENT:
            return "huge integer power"
    for m in re.finditer(r"!", answer):
        value = _int_tower_value(_group_before(answer, m.start() - 1))
        if value is not None and value > MAX_INT_EXPONENT:
            return "huge factorial"
    return None


_INTEGER = re.compile(r"[+-]?\d{1,30}")


def _squash(s: str) -> str:
    """Whitespace-normalised string: runs of whitespace become one space, ends stripped."""
    return " ".join(s.split())


def _gold_answer(ground_truth: str) -> str:
    """The ground-truth answer; a ground truth that is itself boxed is unwrapped first."""
    if "\\boxed" in ground_truth or "\\fbox" in ground_truth:
        inner = extract_boxed(ground_truth)
        if inner is not None:
            return inner
    return ground_truth



@dataclass(frozen=True)
class Screened:
    """What :func:`screen_answer` decided for one response.

    ``stage``: ``"no_answer"`` (truncated, not a string, or no complete box), ``"fast_path"``
    (equal as strings, or both integer literals), ``"guarded"`` (blank or a sympy trap) or
    ``"verify"`` (math-verify must decide). ``score`` is the reward for the first three and
    None for ``"verify"``; ``pred`` / ``gold`` are the answers to compare (empty for
    ``"no_answer"``).
    """

    stage: str
    score: float | None
    pred: str = ""
    gold: str = ""


def screen_answer(response: str, ground_truth: str, truncated: bool = False) -> Screened:
    """Decide the accuracy of ``response`` without math-verify where that is safe and exact.

    Args:
        response: the decoded response.
        ground_truth: the reference answer (a boxed one is unwrapped).
        truncated: the response hit the length limit; it scores 0.0 even when its box is
            right (SPEC section 5: an unfinished response is not rewarded).

    Returns:
        A :class:`Screened`; its ``score`` is None only when the stage is ``"verify"``.
    """
    if truncated or not isinstance(response, str) or not isinstance(ground_truth, str):
        return Screened("no_answer", 0.0)
    pred = extract_boxed(response)
    if pred is None:
        return Screened("no_answer", 0.0)
    gold = _gold_answer(ground_truth)
    if _squash(pred) and _squash(pred) == _squash(gold):
        return Screened("fast_path", 1.0, pred, gold)
    if _INTEGER.fullmatch(pred.strip()) and _INTEGER.fullmatch(gold.strip()):
        # two integer literals: their values decide, no verifier needed
        return Screened("fast_path", float(int(pred) == int(gold)), pred, gold)
    if not pred.strip() or _refusal_reason(pred) is not None:
        return Screened("guarded", 0.0, pred, gold)
    return Screened("verify", None, pred, gold)
