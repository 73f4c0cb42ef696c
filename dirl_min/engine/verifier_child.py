"""The verifier child's side: math-verify in this process, and the request loop of a child.

:mod:`dirl_min.engine.verifier` starts children that load this file standalone (not as
``dirl_min.engine.verifier_child``), so it may import only the standard library and
math-verify, never the package's torch-heavy modules. The parent also calls
:func:`_verify_here` directly as its in-process fallback.

Inside a child the work runs in its main thread under a soft ``setitimer`` alarm, so the
usual slow answer is interrupted and the child is reused; math-verify's own alarm-based
timeouts are disabled (they raise ``ValueError`` outside the main thread and count whole
seconds only).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time


class _SoftTimeout(BaseException):
    """Raised by the soft alarm; a BaseException so that math-verify's ``except Exception``
    lets it through."""


def _raise_soft_timeout(signum, frame):  # pragma: no cover - signal handler
    raise _SoftTimeout()


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    """Parsed ground truth; cached because each prompt's answer is checked G times."""
    from math_verify import parse

    return parse("\\boxed{" + gold + "}", parsing_timeout=None)


def _verify_here(pred: str, gold: str, soft_timeout: float | None) -> bool | None:
    """math-verify in this process: True/False, or None when the soft alarm fired.

    The alarm (``setitimer``) is used only in the main thread and only when nobody else
    has an interval timer running; math-verify's own alarm-based timeouts are disabled
    (they raise outside the main thread and take whole seconds only).
    """
    from math_verify import parse, verify

    use_alarm = (
        soft_timeout is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )
    old_handler = None
    try:
        try:
            if use_alarm:
                old_handler = signal.signal(signal.SIGALRM, _raise_soft_timeout)
                signal.setitimer(signal.ITIMER_REAL, soft_timeout)
            gold_parsed = _parse_gold(gold)
            pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
            return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old_handler)
    except _SoftTimeout:
        return None
    except Exception:  # math-verify raising on odd input (RecursionError too) means "not verified"
        return False


def _worker_main() -> None:  # pragma: no cover - runs in the verifier child
    """Verifier child: read JSON requests from stdin, answer one line each on the real stdout.

    Requests: ``["verify", pred, gold, soft_timeout]`` -> ``1`` / ``0`` / ``T`` (soft
    timeout, scored 0). ``["_sleep", s]`` and ``["_crash"]`` exist for the tests of the
    parent's hard timeout and crash handling.
    """
    import logging

    proto = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the protocol
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    logging.disable(logging.CRITICAL)  # math-verify logs every timeout / parse failure
    import math_verify  # noqa: F401  (import once, before announcing readiness)

    _verify_here("1", "1", None)  # warm the parser/sympy caches
    proto.write(b"ready\n")
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
        except ValueError:
            proto.write(b"0\n")
            continue
        op = req[0]
        if op == "verify":
            ok = _verify_here(req[1], req[2], req[3])
            proto.write(b"T\n" if ok is None else (b"1\n" if ok else b"0\n"))
        elif op == "_sleep":
            time.sleep(float(req[1]))
            proto.write(b"0\n")
        elif op == "_crash":
            os._exit(3)
        else:
            proto.write(b"0\n")
