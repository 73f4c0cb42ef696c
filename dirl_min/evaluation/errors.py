"""The error ``python -m dirl_min.eval`` reports as a one-line message (no traceback)."""

from __future__ import annotations

__all__ = ["EvalError"]


class EvalError(ValueError):
    """A usage problem (bad option, missing benchmark, incompatible --out); the message says what to do."""
