"""math-verify in bounded worker processes: the verifier children, their pool and protocol.

Time bound (why a persistent worker process)
--------------------------------------------
math-verify bounds its own work with ``signal.alarm``, which raises ``ValueError`` in any
thread but the main one, counts whole seconds, and (like any Python signal handler) only
runs between bytecodes, so one long C call (a huge big-integer power, a C stack overflow in
the parser) is not interrupted; unguarded, ``\\boxed{10^{10^{10}}}`` kept sympy busy past
the 15 s we waited. Three layers keep every call bounded:

1. **Cheap in-process checks** (no sympy): truncated / no box -> 0.0; the answer equal to
   the ground truth up to whitespace -> 1.0; answers that are known sympy traps -> 0.0
   (:func:`dirl_min.core.answers.screen_answer`).
2. **Persistent verifier processes**: parse + verify run in a child Python that imports
   math-verify once and then serves requests over a pipe, one at a time. Inside the child
   the work runs in its main thread under a soft ``setitimer`` alarm (80 % of the budget),
   so the usual slow answer is interrupted and the child is reused. The parent waits on
   the pipe with ``poll`` for at most ``timeout`` seconds; if no answer comes (a hang in C
   code) or the child dies (e.g. a C stack overflow), it is killed, the sample scores
   0.0, the event is counted in :func:`verifier_stats`, and a fresh child is started on
   the next call. This works identically from the main thread, a ``threading.Thread`` or
   a thread pool, and a crash never takes the trainer down.
3. **Fallback**: if no child can be started (no ``fork``/``exec`` allowed, non-POSIX), the
   same code (:mod:`dirl_min.engine.verifier_child`) runs in-process: under the soft alarm
   in the main thread, and guarded only by layer 1 in other threads (counted as
   ``"inline"``).

Measured on the shared 2-core CPU box (math-verify 0.9, sympy 1.14): a verifier child
starts in about 0.9 s (once per concurrent caller, and after each hard kill); a request
round-trip costs about 0.15 ms, against math-verify's own ~0.4 ms per pair with warm
caches and ~40 ms for new strings, so a warm check costs ~0.55 ms through the child vs
~0.4 ms in-process. A process spawned per call would add ~0.9 s. The guards of layer 1
accept every one of the 17.5k ground truths in the benchmark files.
``concurrent.futures.ProcessPoolExecutor`` was not used because it cannot cancel a single
hung task and a crashed child breaks the whole pool.
:func:`dirl_min.engine.grading.math_rewards` with ``num_workers > 0`` drives that many
verifier children from a thread pool.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections import Counter

from dirl_min.engine import verifier_child
from dirl_min.engine.verifier_child import _verify_here

__all__ = ["STARTUP_TIMEOUT", "shutdown_verifiers", "verifier_stats"]

# --------------------------------------------------------------------------------------
# Verifier children and their pool (parent side)
# --------------------------------------------------------------------------------------

#: Seconds a new verifier child may take to import math-verify and say "ready".
STARTUP_TIMEOUT = 60.0

_STATS: Counter = Counter()
_STATS_LOCK = threading.Lock()


def _count(key: str, n: int = 1) -> None:
    with _STATS_LOCK:
        _STATS[key] += n


def verifier_stats(reset: bool = False) -> dict[str, int]:
    """Counters of the accuracy checker since start (or the last reset).

    Keys: ``calls`` (answers that reached the checker), ``fast_path`` (equal to the ground
    truth as strings, or both integer literals), ``guarded`` (refused as sympy traps), ``verified`` (sent to
    math-verify), ``soft_timeouts`` (interrupted in the child, child reused),
    ``hard_timeouts`` and ``crashes`` (child killed / died; scored 0), ``worker_starts``,
    ``worker_start_failures`` and ``inline`` (verified in-process as a fallback).

    Args:
        reset: zero the counters after reading them.

    Returns:
        A plain dict copy of the counters.
    """
    with _STATS_LOCK:
        out = dict(_STATS)
        if reset:
            _STATS.clear()
    return out


_BOOT = (
    "import importlib.util as u, sys\n"
    "sys.path[:] = [p for p in sys.path if p not in ('', '.')]\n"  # no shadowing by the cwd
    "s = u.spec_from_file_location('_dirl_min_verifier_child', sys.argv[1])\n"
    "m = u.module_from_spec(s); sys.modules[s.name] = m\n"  # dataclasses look the module up
    "s.loader.exec_module(m); m._worker_main()\n"
)


class _WorkerDied(Exception):
    pass


class _Worker:
    """One verifier child: a Python running :func:`verifier_child._worker_main`.

    That file is loaded standalone (not as ``dirl_min.engine.verifier_child``) so the child
    imports only the standard library and math-verify, never the package's torch-heavy
    modules.
    """

    def __init__(self, startup_timeout: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, os.path.abspath(verifier_child.__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self._buf = b""
        try:
            if self._readline(startup_timeout) != b"ready":
                raise _WorkerDied("verifier child did not start")
        except BaseException:
            self.kill()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _readline(self, timeout: float) -> bytes | None:
        """Next protocol line; None on timeout; raises _WorkerDied on EOF."""
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # not select.select: trainers may hold > 1024 fds
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not poller.poll(max(1, math.ceil(remaining * 1000))):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise _WorkerDied("verifier child exited")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def request(self, req: list, timeout: float) -> bytes | None:
        """Send one request and wait at most ``timeout`` s; None on timeout."""
        try:
            self.proc.stdin.write(json.dumps(req).encode("ascii") + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise _WorkerDied(str(e)) from e
        return self._readline(timeout)

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass


class _Pool:
    """Idle verifier children; grows to the number of concurrent callers, up to ``limit``."""

    def __init__(self) -> None:
        self._idle: list[_Worker] = []
        self._live = 0
        self._cond = threading.Condition()
        self.limit = max(2, os.cpu_count() or 2)
        # Until when to verify in-process: forever off POSIX (no poll() on pipes), and for
        # a while after a failed start so that a broken setup does not cost a start per call.
        self.inline_until = math.inf if os.name != "posix" else 0.0

    def reserve(self, n: int) -> None:
        with self._cond:
            self.limit = max(self.limit, n)

    def acquire(self) -> _Worker:
        with self._cond:
            while True:
                while self._idle:
                    w = self._idle.pop()
                    if w.alive():
                        return w
                    w.kill()
                    self._live -= 1
                if self._live < self.limit:
                    self._live += 1
                    break
                self._cond.wait()
        try:
            w = _Worker(STARTUP_TIMEOUT)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise
        _count("worker_starts")
        return w

    def release(self, w: _Worker) -> None:
        with self._cond:
            self._idle.append(w)
            self._cond.notify()

    def discard(self, w: _Worker) -> None:
        w.kill()
        with self._cond:
            self._live -= 1
            self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for w in idle:
            w.kill()


_POOL = _Pool()
atexit.register(_POOL.shutdown)


def shutdown_verifiers() -> None:
    """Stop all idle verifier children (new ones start on demand). Also runs at exit."""
    _POOL.shutdown()


def _worker_request(req: list, timeout: float) -> bytes | None:
    """Run ``req`` in a pooled child with a hard ``timeout``.

    Returns the reply line, or None when the child hung (killed) or died (both counted).
    Raises RuntimeError when no child can be started, so the caller can fall back.
    """
    try:
        w = _POOL.acquire()
    except Exception as e:
        raise RuntimeError("cannot start a verifier child") from e
    try:
        reply = w.request(req, timeout)
    except _WorkerDied:
        _count("crashes")
        _POOL.discard(w)
        return None
    except BaseException:  # e.g. KeyboardInterrupt mid-request: the child's state is unknown
        _POOL.discard(w)
        raise
    if reply is None:
        _count("hard_timeouts")
        _POOL.discard(w)
        return None
    _POOL.release(w)
    return reply


def _clean_timeout(timeout: float) -> float:
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        return 5.0
    if math.isnan(t):
        return 5.0
    return min(max(t, 0.01), 3600.0)


def _verify_bounded(pred: str, gold: str, timeout: float) -> bool:
    """math-verify with the hard time bound of a child process (or the inline fallback)."""
    soft = 0.8 * timeout
    _count("verified")
    if time.monotonic() >= _POOL.inline_until:
        try:
            reply = _worker_request(["verify", pred, gold, soft], timeout)
        except RuntimeError:
            _count("worker_start_failures")
            _POOL.inline_until = time.monotonic() + 300.0
        else:
            if reply == b"T":
                _count("soft_timeouts")
            return reply == b"1"
    _count("inline")
    ok = _verify_here(pred, gold, soft)
    if ok is None:
        _count("soft_timeouts")
    return bool(ok)
