"""The rule machinery of :mod:`dirl_min.settings.checks`: a rule is a row of a table — a setting, a test
of its value, and what is allowed, in words — and :func:`problems` applies a table to any object."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Rule", "is_int", "is_number", "at_least", "number", "one_of", "get_setting", "problems"]


@dataclass(frozen=True)
class Rule:
    """``name``: the setting (``sft.steps``) or option attribute (``max_new_tokens``);
    ``ok(value)``: whether the value is allowed; ``allowed``: what is, in words."""

    name: str
    ok: Callable[[Any], bool]
    allowed: str | Callable[[], str]  # a callable when the words need an import


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(name: str, lo: int, why: str = "") -> Rule:
    """An integer >= lo."""
    return Rule(name, lambda v: is_int(v) and v >= lo, f"an integer >= {lo}" + (f" ({why})" if why else ""))


def number(name: str, lo: float = -math.inf, hi: float = math.inf, *, lo_open=False, hi_open=False, why="") -> Rule:
    """A finite number in the interval [lo, hi] (ends open where asked)."""
    def ok(v):
        return is_number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    if hi == math.inf:
        words = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        words = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return Rule(name, ok, words + (f" ({why})" if why else ""))


def one_of(name: str, *choices) -> Rule:
    return Rule(name, lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def get_setting(obj, name: str):
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def problems(obj, rules: list[Rule], *, names: dict | None = None) -> list[str]:
    """One message per rule of ``rules`` that ``obj``'s value breaks (``names``: how to show a setting)."""
    out = []
    for rule in rules:
        value = get_setting(obj, rule.name)
        if not rule.ok(value):
            allowed = rule.allowed() if callable(rule.allowed) else rule.allowed
            shown = (names or {}).get(rule.name, rule.name)
            out.append(f"{shown} = {value!r}: expected {allowed}")
    return out
