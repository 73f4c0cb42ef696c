"""Data: the embedded arithmetic task, and DiRL-format SFT / RL files with clear errors.

Formats (DiRL's):

* SFT: ``{"prompt": <chat-formatted prompt>, "response": <answer text + end tokens>}``,
  or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (the last message is the
  assistant's answer).
* RL / evaluation: ``{"question": ..., "ground_truth_answer": ...}``.

Files may be JSON (a list of records), JSONL, or parquet (read through ``datasets``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Problem",
    "arithmetic_problems",
    "split_problems",
    "sft_records",
    "worked_solution",
    "load_records",
    "load_problems",
    "load_sft",
    "DataError",
    "render_prompt",
    "read_text",
]


class DataError(ValueError):
    """A data file is malformed; the message names the file, the record and the field."""


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

    The default (levels 1–2, operands to 20: 882 problems) was chosen by measurement: a
    tiny model learns it in a few CPU minutes of SFT, yet leaves many problems solved
    sometimes but not always, which is where RL can gain (README, "Run the main job").
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


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file.

    Raises:
        DataError: no such file, a folder, or bytes that are not UTF-8 (the message names the
            line: replacing them silently would train on corrupted text).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                        "convert the file to UTF-8") from None


def load_records(path: str | Path) -> list[dict]:
    """Read records from a JSON list, a JSONL file or a parquet file.

    Raises:
        DataError: missing or empty file, a folder, text that is not UTF-8, bad JSON (with the
            line number), or a record that is not an object.
    """
    path = Path(path)
    if path.suffix == ".parquet" and path.is_file():
        import datasets

        return [dict(r) for r in datasets.Dataset.from_parquet(str(path))]
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected JSON or JSONL records")
    records: list = []
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        where = [f"{path}: record {i}" for i in range(len(records))]
    else:
        where = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); expected one JSON object per line") from None
            where.append(f"{path}:{lineno}")
    for rec, loc in zip(records, where):
        if not isinstance(rec, dict):
            raise DataError(f"{loc}: expected a JSON object, got {type(rec).__name__}")
    if not records:
        raise DataError(f"{path}: no records found")
    return [dict(r, _where=loc) for r, loc in zip(records, where)] if where else records


def _field(rec: dict, name: str, path) -> str:
    where = rec.get("_where", str(path))
    if name not in rec:
        raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(k for k in rec if k != '_where')})")
    value = rec[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "ground_truth_answer":
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def load_problems(path: str | Path) -> list[Problem]:
    """RL / evaluation problems (``question``, ``ground_truth_answer``) from a file."""
    return [Problem(_field(r, "question", path), _field(r, "ground_truth_answer", path)) for r in load_records(path)]


def load_sft(path: str | Path, tokenizer, records: list[dict] | None = None) -> list[dict]:
    """SFT records (``prompt``/``response``, or chat ``messages``) from a file.

    Chat messages are rendered with the tokenizer's chat template; the assistant
    answer gets the end-of-turn and eos tokens, as in DiRL's SFT format. ``records``:
    the file's :func:`load_records`, when already read (before the tokenizer was loaded).
    """
    out = []
    for r in load_records(path) if records is None else records:
        if "messages" in r:
            msgs = r["messages"]
            where = r.get("_where", str(path))
            if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs):
                raise DataError(f"{where}: field 'messages' must be a list of at least two {{role, content}} objects")
            if msgs[-1].get("role") != "assistant":
                raise DataError(f"{where}: the last message must have role 'assistant'")
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            out.append({"prompt": prompt, "response": msgs[-1]["content"] + "<|im_end|>" + (tokenizer.eos_token or "")})
        else:
            out.append({"prompt": _field(r, "prompt", path), "response": _field(r, "response", path)})
    return out
