"""The rule machinery: a setting's rule sits on its field (``_f(default, help, rule=...)`` in
:mod:`dirl_min.settings.config` and :mod:`dirl_min.settings.commands`) as a :class:`Check` — a test
of the value and what is allowed, in words. :func:`rules_of` builds a command's table of
:class:`Rule` rows (the check with the setting's name) from its dataclass, and :func:`problems`
applies a table to any object."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Check", "Rule", "is_int", "is_number", "at_least", "number", "one_of", "betas", "template", "levels",
           "reward_weights", "names_from", "get_setting", "rules_of", "problems", "command_problems"]


@dataclass(frozen=True)
class Check:
    """``ok(value)``: whether a value is allowed; ``allowed``: what is, in words."""

    ok: Callable[[Any], bool]
    allowed: str | Callable[[], str]  # a callable when the words need an import


@dataclass(frozen=True)
class Rule:
    """A row of a table: ``name``, the setting (``sft.steps``); ``ok`` and ``allowed`` as in :class:`Check`."""

    name: str
    ok: Callable[[Any], bool]
    allowed: str | Callable[[], str]


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(lo: int, why: str = "") -> Check:
    """An integer >= lo."""
    return Check(lambda v: is_int(v) and v >= lo, f"an integer >= {lo}" + (f" ({why})" if why else ""))


def number(lo: float = -math.inf, hi: float = math.inf, *, lo_open=False, hi_open=False, why="") -> Check:
    """A finite number in the interval [lo, hi] (ends open where asked)."""
    def ok(v):
        return is_number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    if hi == math.inf:
        words = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        words = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return Check(ok, words + (f" ({why})" if why else ""))


def one_of(*choices) -> Check:
    return Check(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def betas() -> Check:
    return Check(lambda v: isinstance(v, list) and len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v),
                 "two numbers in [0, 1), e.g. [0.9, 0.98]")


def template(*, optional=False) -> Check:
    return Check(lambda v: (optional and v == "") or (isinstance(v, str) and "{question}" in v),
                 "a text containing {question} (where the question goes)" + (" or '' (the default)" if optional else ""))


def levels() -> Check:
    return Check(lambda v: isinstance(v, list) and bool(v) and all(is_int(x) and x in (1, 2, 3) for x in v)
                 and len(set(v)) == len(v), "a non-empty list of distinct levels from 1, 2, 3")


def _reward_names() -> tuple[str, ...]:
    from dirl_min.engine.grading import REWARDS  # math-verify: imported when a rule runs, not for --help

    return tuple(sorted(REWARDS))


def reward_weights() -> Check:
    return Check(lambda v: isinstance(v, dict) and bool(v) and all(k in _reward_names() and is_number(w)
                                                                   for k, w in v.items()),
                 lambda: "a mapping of reward names to numeric weights; names: " + ", ".join(_reward_names()))


def names_from(choices: Callable[[], tuple], what: str) -> Check:
    """A non-empty list of distinct names from ``choices()`` (a callable: the names may need an import)."""
    return Check(lambda v: isinstance(v, list) and bool(v) and len(set(v)) == len(v) and all(x in choices() for x in v),
                 lambda: f"a non-empty list of distinct {what} from " + ", ".join(choices()))


def get_setting(obj, name: str):
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def rules_of(root) -> list[Rule]:
    """The table of the dataclass of sections ``root``: one :class:`Rule` per field that carries a check,
    in the order of the sections and their fields."""
    out = []
    for section in dataclasses.fields(root):
        for f in dataclasses.fields(section.default_factory):
            if (check := f.metadata.get("rule")) is not None:
                out.append(Rule(f"{section.name}.{f.name}", check.ok, check.allowed))
    return out


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


def command_problems(cfg, rules: list[Rule], cross_rules=(), aliases: dict | None = None) -> list[str]:
    """Every broken rule of a command's settings ``cfg``, named by the command's short flag where
    it has one (``aliases``: flag -> setting, as :func:`dirl_min.settings.config.parse_config` takes)."""
    names = {target: flag for flag, target in (aliases or {}).items() if isinstance(target, str)}
    msgs = problems(cfg, rules, names=names)
    for cross in cross_rules:
        msgs += cross(cfg)
    return msgs
