"""The errors a command reports as one line, ``dirl_min.<command>: error: <message>`` (no traceback).

Every such error derives from :class:`DirlError`, and every face catches that one base through
:func:`one_line_errors`, so the message shape is the same everywhere. Each keeps the builtin
class it had (``ValueError`` / ``RuntimeError``) for callers that catch those.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DirlError", "SettingsError", "EvalError", "ModelError", "one_line_errors", "about"]


class DirlError(Exception):
    """A problem the user can fix; the message says what is wrong and where (setting, file, record)."""


class SettingsError(DirlError, ValueError):
    """Invalid settings; the message names each setting, its value and what is allowed."""


class EvalError(DirlError, ValueError):
    """A usage problem (bad option, missing benchmark, incompatible --out); the message says what to do."""


class ModelError(DirlError, ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and what is wrong."""


@contextmanager
def one_line_errors(command: str) -> Iterator[None]:
    """A :class:`DirlError` raised inside ends the command with ``dirl_min.<command>: error: <message>``
    on stderr and exit status 1."""
    try:
        yield
    except DirlError as e:
        raise SystemExit(f"dirl_min.{command}: error: {e}") from None


@contextmanager
def about(option: str) -> Iterator[None]:
    """A :class:`DirlError` raised inside gets ``<option>: `` in front of its message (the option it
    concerns), keeping its class."""
    try:
        yield
    except DirlError as e:
        raise type(e)(f"{option}: {e}") from None
