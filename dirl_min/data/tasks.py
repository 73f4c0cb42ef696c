"""The embedded arithmetic task: problems, the seeded family-preserving split, prompts and SFT records."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = [
    "Problem",
    "RESPONSE_STYLES",
    "arithmetic_problems",
    "split_problems",
    "sft_records",
    "worked_solution",
    "render_prompt",
]


@dataclass(frozen=True)
class Problem:
    """One verifiable problem: a question and its ground-truth answer (a string)."""

    question: str
    answer: str
    level: int = 0
    family: tuple = ()  # problems of one family (e.g. a + b and b + a) fall on the same side of a split


def arithmetic_problems(max_operand: int = 20, levels: tuple[int, ...] = (1, 2)) -> list[Problem]:
    """Every problem of the embedded task, in a fixed order (no randomness).

    Levels: 1 ``What is a + b?``; 2 ``What is a - b?`` (negative answers allowed);
    3 ``Solve: If x + a = c, what is x?``. Operands run over ``0..max_operand``.

    The default (levels 1–2, operands to 30: 1922 problems, 400 held out) was chosen by
    measurement: a tiny model learns it in a few CPU minutes of SFT, yet leaves many problems
    solved sometimes but not always, which is where RL can gain, and 400 held-out problems
    make the paired RL − SFT interval about ±2 points wide (README, "Run the main job").
    """
    out = []
    rng = range(max_operand + 1)
    for a in rng:
        for b in rng:
            family = (min(a, b), max(a, b))  # the unordered operand pair: a + b and b + a are twins
            if 1 in levels:
                out.append(Problem(f"What is {a} + {b}?", str(a + b), 1, family))
            if 2 in levels:
                out.append(Problem(f"What is {a} - {b}?", str(a - b), 2, family))
            if 3 in levels:
                out.append(Problem(f"Solve: If x + {a} = {a + b}, what is x?", str(b), 3, family))
    return out


def render_prompt(template: str, question: str) -> str:
    """The user message for a question: ``{question}`` in the template replaced literally.

    Every other brace is kept, so DiRL's template with a bare ``\\boxed{}`` works as written.
    """
    return template.replace("{question}", question)


def split_problems(problems: list[Problem], held_out: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """A seeded train / held-out split that never separates a family of problems.

    All problems sharing a ``family`` (the embedded task: the unordered operand pair, so
    ``a + b``, ``b + a``, ``a - b``, ``b - a`` …) go to the same side, so no held-out problem
    has a twin (same question, or same operands and answer) in training. Families are
    taken in seeded random order while they fit, so the held-out set has exactly
    ``held_out`` problems whenever the family sizes allow it. Problems without a family
    are their own family, keyed by the question. Both lists keep the input order.
    """
    families: dict = {}
    for i, p in enumerate(problems):
        families.setdefault(p.family or (p.question,), []).append(i)
    keys = list(families)
    random.Random(seed).shuffle(keys)
    test: list[int] = []
    for k in keys:
        if len(test) + len(families[k]) <= held_out:
            test += families[k]
        if len(test) == held_out:
            break
    held = set(test)
    return [p for i, p in enumerate(problems) if i not in held], [problems[i] for i in sorted(held)]


#: the embedded task's user message (``data.prompt_template``'s default): the bare question
PLAIN_TEMPLATE = "{question}"

RESPONSE_STYLES = ("answer", "worked")

_BINARY = re.compile(r"What is (-?\d+) ([+-]) (-?\d+)\?")
_SOLVE = re.compile(r"Solve: If x \+ (-?\d+) = (-?\d+), what is x\?")


def worked_solution(problem: Problem) -> str:
    """A one-line worked solution of an embedded problem, without the final box.

    ``What is 3 + 4?`` -> ``"3 + 4 = 7. "``; ``Solve: If x + 3 = 7, what is x?`` -> ``"x = 7 - 3 = 4. "``.
    Most of it repeats the prompt, so a confident model can decode it several tokens per step.

    Raises:
        ValueError: the question is not one of the embedded task's forms.
    """
    if m := _BINARY.fullmatch(problem.question):
        return f"{m[1]} {m[2]} {m[3]} = {problem.answer}. "
    if m := _SOLVE.fullmatch(problem.question):
        return f"x = {m[2]} - {m[1]} = {problem.answer}. "
    raise ValueError(f"no worked solution for {problem.question!r}: data.response_style worked needs the embedded task")


def sft_records(problems: list[Problem], tokenizer, prompt_template: str = "{question}",
                response_style: str = "answer") -> list[dict]:
    """DiRL SFT records for problems: the answer in ``\\boxed{}``, then end-of-turn and eos.

    ``response_style``: ``answer`` = ``\\boxed{7}`` alone; ``worked`` = a short worked
    solution first (:func:`worked_solution`): ``3 + 4 = 7. \\boxed{7}``.
    """
    from dirl_min.model import chat_prompt_ids

    if response_style not in RESPONSE_STYLES:
        raise ValueError(f"data.response_style must be one of {RESPONSE_STYLES}, not {response_style!r}")
    end = "<|im_end|>" + (tokenizer.eos_token or "")
    records = []
    for p in problems:
        prompt = tokenizer.decode(chat_prompt_ids(tokenizer, render_prompt(prompt_template, p.question)))
        lead = worked_solution(p) if response_style == "worked" else ""
        records.append({"prompt": prompt, "response": lead + f"\\boxed{{{p.answer}}}" + end})
    return records
