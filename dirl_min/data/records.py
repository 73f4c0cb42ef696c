"""DiRL-format SFT / RL / evaluation files, read with clear errors (file, line, field, expected).

Formats (DiRL's):

* SFT: ``{"prompt": <chat-formatted prompt>, "response": <answer text + end tokens>}``,
  or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (the last message is the
  assistant's answer).
* RL / evaluation: ``{"question": ..., "ground_truth_answer": ...}``.

Files may be JSON (a list of records), JSONL, or parquet (read through ``datasets``).
"""

from __future__ import annotations

import json
from pathlib import Path

from dirl_min.data.tasks import Problem
from dirl_min.infra.errors import DirlError

__all__ = ["DataError", "read_text", "load_records", "load_problems", "load_sft"]


class DataError(DirlError, ValueError):
    """A data file is malformed; the message names the file, the record and the field."""


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


def import_datasets(purpose: str):
    """The optional ``datasets`` package (``pip install -e ".[hub]"``), or a DataError saying so."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{purpose} needs the optional package `datasets`: pip install -e \".[hub]\" "
                        "(or convert the file to JSONL)") from None
    return datasets


def load_records(path: str | Path) -> list[dict]:
    """Read records from a JSON list, a JSONL file or a parquet file.

    Raises:
        DataError: missing or empty file, a folder, text that is not UTF-8, bad JSON (with the
            line number), or a record that is not an object.
    """
    path = Path(path)
    if path.suffix == ".parquet" and path.is_file():
        datasets = import_datasets(f"reading {path}")

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
        # JSON Lines ends a record at "\n" only (a "\r" before it is JSON whitespace); str.splitlines would
        # also break inside a string at U+2028 / U+2029 or "\x1c".."\x1e", which JSON allows there raw
        for lineno, line in enumerate(text.split("\n"), 1):
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
