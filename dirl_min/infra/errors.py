"""The errors a command reports as a one-line message (no traceback)."""

from __future__ import annotations

__all__ = ["SettingsError", "EvalError"]


class SettingsError(ValueError):
    """Invalid settings; the message names each setting, its value and what is allowed."""


class EvalError(ValueError):
    """A usage problem (bad option, missing benchmark, incompatible --out); the message says what to do."""
