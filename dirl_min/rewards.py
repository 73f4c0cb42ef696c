"""Rewards for DiPO (SPEC section 5): accuracy, DiRL speed, and the auxiliary shaping terms.

Accuracy
--------
:func:`extract_boxed` takes the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) of a
response; :func:`math_reward` compares it with the ground truth using math-verify
(``parse`` of both, each wrapped in ``\\boxed{}``, then ``verify(gold, pred)``).

Time bound (why a persistent worker process)
--------------------------------------------
math-verify bounds its own work with ``signal.alarm``, which raises ``ValueError`` in any
thread but the main one, counts whole seconds, and (like any Python signal handler) only
runs between bytecodes, so one long C call (a huge big-integer power, a C stack overflow in
the parser) is not interrupted; unguarded, ``\\boxed{10^{10^{10}}}`` kept sympy busy past
the 15 s we waited. Three layers keep every call bounded:

1. **Cheap in-process checks** (no sympy): truncated / no box -> 0.0; the answer equal to
   the ground truth up to whitespace -> 1.0; answers that are known sympy traps -> 0.0
   (longer than :data:`MAX_ANSWER_CHARS`, bracket nesting deeper than
   :data:`MAX_NESTING`, or an integer power tower / factorial whose exponent or operand
   exceeds :data:`MAX_INT_EXPONENT`).
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
   same code runs in-process: under the soft alarm in the main thread, and guarded only by
   layer 1 in other threads (counted as ``"inline"``).

Measured on the shared 2-core CPU box (math-verify 0.9, sympy 1.14): a verifier child
starts in about 0.9 s (once per concurrent caller, and after each hard kill); a request
round-trip costs about 0.15 ms, against math-verify's own ~0.4 ms per pair with warm
caches and ~40 ms for new strings, so a warm check costs ~0.55 ms through the child vs
~0.4 ms in-process. A process spawned per call would add ~0.9 s. The guards of layer 1
accept every one of the 17.5k ground truths in the benchmark files.
``concurrent.futures.ProcessPoolExecutor`` was not used because it cannot cancel a single
hung task and a crashed child breaks the whole pool. :func:`math_rewards` with
``num_workers > 0`` drives that many verifier children from a thread pool.

Speed and shaping
-----------------
:func:`speed_reward` is DiRL's cosine speed reward (it already contains accuracy);
:func:`format_reward`, :func:`boxed_present_reward`, :func:`repetition_reward`,
:func:`overlength_reward` (DAPO) and :func:`cosine_length_reward` are optional shaping
terms. :data:`REWARDS` maps names to functions of one :class:`RewardInput`;
:func:`compute_rewards` scores a batch with a weighted sum (:func:`combine_rewards`) and
always reports 0/1 accuracy as ``parts["correct"]``.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_INT_EXPONENT",
    "MAX_NESTING",
    "REWARDS",
    "RewardInput",
    "boxed_present_reward",
    "combine_rewards",
    "compute_rewards",
    "cosine_length_reward",
    "extract_boxed",
    "format_reward",
    "math_reward",
    "math_rewards",
    "overlength_reward",
    "repetition_reward",
    "shutdown_verifiers",
    "speed_reward",
    "verifier_stats",
]

# --------------------------------------------------------------------------------------
# \boxed{} extraction
# --------------------------------------------------------------------------------------

# A box opener: \boxed or \fbox, optional TeX whitespace, then the opening brace.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)[ \t\r\n]*\{")
# Openers and single braces in one scan, so the Python loop only visits braces.
_BOX_OPEN_OR_BRACE = re.compile(r"\\(?:boxed|fbox)[ \t\r\n]*\{|[{}]")


def _last_box_span(text: str) -> tuple[int, int, int] | None:
    """(opener start, content start, content end) of the last complete box, or None.

    One left-to-right pass with a stack of open braces (linear time): a closing brace pops
    the innermost open one, exactly as a per-box brace counter would, so a box is complete
    iff its opening brace gets popped. "Last" means the latest opener among complete boxes.
    """
    first = _BOX_OPEN.search(text)
    if first is None:
        return None
    stack: list[int] = []  # per open brace: index of its box opener, or -1 for a plain brace
    best: tuple[int, int, int] | None = None
    for m in _BOX_OPEN_OR_BRACE.finditer(text, first.start()):
        s, e = m.span()
        if e - s > 1:  # a box opener (ends with its "{")
            stack.append(s)
        elif text[s] == "{":
            stack.append(-1)
        elif stack:  # "}" closing the innermost open brace; stray "}" are ignored
            opener = stack.pop()
            if opener >= 0 and (best is None or opener > best[0]):
                content_start = text.index("{", opener) + 1
                best = (opener, content_start, s)
    return best


def extract_boxed(text: str) -> str | None:
    """Return the content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``.

    Braces are matched by counting every ``{`` and ``}`` character (escaped ``\\{``
    included, as in the usual MATH graders), so nested braces are fine. Whitespace is
    allowed between the command and its brace (``\\boxed {x}``). A box whose braces never
    close is skipped and the latest *complete* box wins, e.g. ``"\\boxed{1} \\boxed{2"``
    gives ``"1"``; for nested boxes the inner one starts later and wins.

    Args:
        text: a model response.

    Returns:
        The box content (not stripped), or None when there is no complete box or
        ``text`` is not a string. Linear time; never raises.
    """
    if not isinstance(text, str):
        return None
    try:
        span = _last_box_span(text)
    except Exception:  # defensive: extraction must never take a training step down
        return None
    return None if span is None else text[span[1] : span[2]]


# --------------------------------------------------------------------------------------
# Cheap guards against answers that make sympy hang
# --------------------------------------------------------------------------------------

#: Longest box content that is sent to math-verify; real final answers are < 200 chars.
MAX_ANSWER_CHARS = 1000
#: Deepest allowed nesting of ``{ ( [``; real answers stay below 10.
MAX_NESTING = 64
#: Largest integer exponent / factorial operand evaluated exactly (10^100000 takes ~0.3 s).
MAX_INT_EXPONENT = 100_000

_TOWER_TOKEN = re.compile(r"\d+|\^|[{}()]")
_TOWER_CHARS = re.compile(r"[\d\s^{}()]+")


def _int_tower_value(s: str) -> float | None:
    """Value (as a float, inf when huge) of ``s`` if it is an integer power tower.

    ``s`` may only hold digits, spaces, braces, parentheses and ``^`` (e.g. ``10^{10^{10}}``);
    anything else (letters, commands, operators) returns None: symbolic exponents stay
    symbolic in sympy and are cheap. Evaluated right to left in log space so it never
    overflows.
    """
    if not s or not _TOWER_CHARS.fullmatch(s):
        return None
    nums = [t for t in _TOWER_TOKEN.findall(s) if t.isdigit()]
    if not nums:
        return None
    if s.count("^") != len(nums) - 1:  # juxtaposed numbers ("10 10") are not a tower
        return None
    value = float(int(nums[-1])) if len(nums[-1]) < 300 else math.inf
    for digits in reversed(nums[:-1]):
        base = int(digits) if len(digits) < 300 else 10**300
        if base <= 1:
            value = float(base)  # 0^x, 1^x stay small
            continue
        log10 = value * math.log10(base)
        value = math.inf if log10 > 300 else 10.0**log10
    return value


def _group_after(s: str, i: int) -> str:
    """The argument that starts at ``s[i]`` (after ``^``): a brace group, a number, a char."""
    n = len(s)
    while i < n and s[i] in " \t\r\n":
        i += 1
    if i >= n:
        return ""
    if s[i] == "{":
        depth = 0
        for j in range(i, n):
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
                if depth == 0:
                    return s[i + 1 : j]
        return s[i + 1 :]
    if s[i].isdigit():
        j = i
        while j < n and s[j].isdigit():
            j += 1
        return s[i:j]
    return s[i]


def _group_before(s: str, i: int) -> str:
    """The operand that ends at ``s[i]`` (before ``!``): a bracket group or a number."""
    while i >= 0 and s[i] in " \t\r\n":
        i -= 1
    if i < 0:
        return ""
    close = s[i]
    if close in ")}":
        open_ = "(" if close == ")" else "{"
        depth = 0
        for j in range(i, -1, -1):
            if s[j] == close:
                depth += 1
            elif s[j] == open_:
                depth -= 1
                if depth == 0:
                    return s[j + 1 : i]
        return ""
    j = i
    while j >= 0 and s[j].isdigit():
        j -= 1
    return s[j + 1 : i + 1]


def _refusal_reason(answer: str) -> str | None:
    """Why ``answer`` is not sent to sympy (a known hang pattern), or None when it is fine."""
    if len(answer) > MAX_ANSWER_CHARS:
        return "too long"
    depth = deepest = 0
    for ch in answer:
        if ch in "{([":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "})]":
            depth = max(depth - 1, 0)
    if deepest > MAX_NESTING:
        return "nested too deep"
    # Bounded by MAX_ANSWER_CHARS, so the scans below are cheap.
    for m in re.finditer(r"\^", answer):
        value = _int_tower_value(_group_after(answer, m.end()))
        if value is not None and value > MAX_INT_EXPONENT:
            return "huge integer power"
    for m in re.finditer(r"!", answer):
        value = _int_tower_value(_group_before(answer, m.start() - 1))
        if value is not None and value > MAX_INT_EXPONENT:
            return "huge factorial"
    return None


_INTEGER = re.compile(r"[+-]?\d{1,30}")


def _squash(s: str) -> str:
    """Whitespace-normalised string: runs of whitespace become one space, ends stripped."""
    return " ".join(s.split())


def _gold_answer(ground_truth: str) -> str:
    """The ground-truth answer; a ground truth that is itself boxed is unwrapped first."""
    if "\\boxed" in ground_truth or "\\fbox" in ground_truth:
        inner = extract_boxed(ground_truth)
        if inner is not None:
            return inner
    return ground_truth


# --------------------------------------------------------------------------------------
# math-verify, in-process (used inside the verifier child, and as the fallback)
# --------------------------------------------------------------------------------------


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
    "s = u.spec_from_file_location('_dirl_min_rewards_worker', sys.argv[1])\n"
    "m = u.module_from_spec(s); sys.modules[s.name] = m\n"  # dataclasses look the module up
    "s.loader.exec_module(m); m._worker_main()\n"
)


class _WorkerDied(Exception):
    pass


class _Worker:
    """One verifier child: a Python running this file's :func:`_worker_main`.

    The file is loaded standalone (not as ``dirl_min.rewards``) so the child imports only
    the standard library and math-verify, never the package's torch-heavy modules.
    """

    def __init__(self, startup_timeout: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, os.path.abspath(__file__)],
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


# --------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------


def math_reward(
    response: str, ground_truth: str, *, truncated: bool = False, timeout: float = 5.0
) -> float:
    """Accuracy reward: 1.0 if the last boxed answer equals the ground truth, else 0.0.

    Args:
        response: the decoded response.
        ground_truth: the reference answer (LaTeX, without ``\\boxed``; a boxed one is
            unwrapped).
        truncated: the response hit the length limit; it scores 0.0 even when its box is
            right (SPEC section 5: an unfinished response is not rewarded).
        timeout: hard bound in seconds on the math-verify step of this call (see the
            module docstring; starting a verifier child, once per concurrent caller, is
            bounded separately by :data:`STARTUP_TIMEOUT`).

    Returns:
        1.0 or 0.0. Never raises an ``Exception`` (KeyboardInterrupt still propagates), and
        may be called from any thread.
    """
    try:
        if truncated or not isinstance(response, str) or not isinstance(ground_truth, str):
            return 0.0
        pred = extract_boxed(response)
        if pred is None:
            return 0.0
        _count("calls")
        gold = _gold_answer(ground_truth)
        if _squash(pred) and _squash(pred) == _squash(gold):
            _count("fast_path")
            return 1.0
        if _INTEGER.fullmatch(pred.strip()) and _INTEGER.fullmatch(gold.strip()):
            _count("fast_path")  # two integer literals: their values decide, no verifier needed
            return float(int(pred) == int(gold))
        if not pred.strip() or _refusal_reason(pred) is not None:
            _count("guarded")
            return 0.0
        return 1.0 if _verify_bounded(pred, gold, _clean_timeout(timeout)) else 0.0
    except Exception:
        return 0.0


def math_rewards(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    truncated: Sequence[bool] | bool | None = None,
    *,
    timeout: float = 5.0,
    num_workers: int = 0,
) -> list[float]:
    """Accuracy rewards of a batch (same values as :func:`math_reward` one by one).

    Args:
        responses: decoded responses.
        ground_truths: reference answers, one per response.
        truncated: per-response truncation flags, or one bool / None for all.
        timeout: hard bound per answer, in seconds.
        num_workers: 0 checks the answers one after another; ``n > 0`` checks ``n`` at a
            time, each in its own verifier child, so a hung or crashing answer costs at
            most ``timeout`` and scores 0.0 (counted in :func:`verifier_stats`).

    Returns:
        One 0.0/1.0 per response, in order.

    Raises:
        ValueError: the sequences have different lengths.
    """
    n = len(responses)
    if isinstance(truncated, bool) or truncated is None:
        flags = [bool(truncated)] * n
    else:
        flags = [bool(t) for t in truncated]
    if len(ground_truths) != n or len(flags) != n:
        raise ValueError(
            f"math_rewards: {n} responses, {len(ground_truths)} ground truths, "
            f"{len(flags)} truncation flags"
        )

    def one(i: int) -> float:
        return math_reward(responses[i], ground_truths[i], truncated=flags[i], timeout=timeout)

    if num_workers <= 0 or n <= 1:
        return [one(i) for i in range(n)]
    workers = min(int(num_workers), n)
    _POOL.reserve(workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="math_reward") as ex:
        return list(ex.map(one, range(n)))


# --------------------------------------------------------------------------------------
# Speed and shaping rewards
# --------------------------------------------------------------------------------------


def speed_reward(num_tokens: int, num_steps: int, block_size: int, correct: bool) -> float:
    """DiRL speed reward (SPEC section 5), which already contains the accuracy signal.

    ``v = num_tokens / num_steps`` (tokens committed per distinct decoding step),
    ``s = clamp(v - 1, 0, B - 1)``, ``c = (1 - cos(pi s / (B - 1))) / 2`` (0 when B = 1).
    Correct answers get ``0.5 + 0.5 c`` (0.5 when decoding one token per step, 1.0 at a
    whole block per step); wrong answers get ``-0.5 c``, so decoding a wrong answer fast is
    penalised rather than rewarded.

    Args:
        num_tokens: response length ``|o|``.
        num_steps: number of distinct decoding steps; ``<= 0`` (nothing decoded) gives
            ``c = 0``, i.e. the accuracy-only value.
        block_size: block size ``B``.
        correct: whether the answer is right.

    Returns:
        A float in [0.5, 1.0] when correct, in [-0.5, 0.0] when wrong.
    """
    B = int(block_size)
    if num_steps <= 0 or B <= 1:
        c = 0.0
    else:
        v = num_tokens / num_steps
        s = min(max(v - 1.0, 0.0), B - 1.0)
        c = (1.0 - math.cos(math.pi * s / (B - 1))) / 2.0
    return 0.5 + 0.5 * c if correct else -0.5 * c


#: Characters allowed after the final box for :func:`format_reward` (``$``, ``.``, ``\\]`` ...).
FORMAT_TAIL_CHARS = 32


def format_reward(response: str) -> float:
    """1.0 for a well-formed final answer, else 0.0.

    Well-formed means: exactly one ``\\boxed``/``\\fbox`` in the response, it is complete
    with non-blank content, every brace of the response is balanced, and at most
    :data:`FORMAT_TAIL_CHARS` non-whitespace characters follow it (the answer is at the end,
    not followed by more reasoning). Stricter than :func:`boxed_present_reward`, which only
    asks for some complete box.
    """
    if not isinstance(response, str):
        return 0.0
    if sum(1 for _ in zip(range(2), _BOX_OPEN.finditer(response))) != 1:
        return 0.0
    span = _last_box_span(response)
    if span is None or not response[span[1] : span[2]].strip():
        return 0.0
    depth = 0
    for m in re.finditer(r"[{}]", response):
        depth += 1 if m.group() == "{" else -1
        if depth < 0:
            return 0.0
    if depth != 0:
        return 0.0
    tail = "".join(response[span[2] + 1 :].split())
    return 1.0 if len(tail) <= FORMAT_TAIL_CHARS else 0.0


def boxed_present_reward(response: str) -> float:
    """1.0 if the response has a complete box with non-blank content, else 0.0."""
    box = extract_boxed(response)
    return 1.0 if box is not None and box.strip() else 0.0


def repetition_reward(response: str, *, ngram: int = 3, unit: str = "word") -> float:
    """Minus the fraction of repeated n-grams, in [-1, 0].

    ``-(total - distinct) / total`` over the response's n-grams, so a response without a
    repeated n-gram scores 0 and one that loops the same n-gram approaches -1. Responses
    with fewer than ``ngram`` units score 0.

    Args:
        response: the decoded response.
        ngram: n-gram length, >= 1.
        unit: ``"word"`` (whitespace tokens) or ``"char"`` (characters).

    Raises:
        ValueError: bad ``ngram`` or ``unit``.
    """
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    if unit == "word":
        units: Sequence = response.split()
    elif unit == "char":
        units = response
    else:
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
    total = len(units) - ngram + 1
    if total <= 0:
        return 0.0
    distinct = len(set(zip(*(units[i:] for i in range(ngram)))))
    repeated = total - distinct
    return -repeated / total if repeated else 0.0


def overlength_reward(num_tokens: int, max_tokens: int, *, buffer: int) -> float:
    """DAPO soft over-length penalty, in [-1, 0].

    0 up to ``max_tokens - buffer`` tokens, then linearly down to -1 at ``max_tokens``, and
    -1 beyond. ``buffer <= 0`` gives a hard step at ``max_tokens``.
    """
    if num_tokens > max_tokens:
        return -1.0
    if buffer <= 0:
        return 0.0
    expected = max_tokens - buffer
    if num_tokens <= expected:
        return 0.0
    return (expected - num_tokens) / buffer


def cosine_length_reward(
    num_tokens: int,
    max_tokens: int,
    correct: bool,
    *,
    truncated: bool = False,
    correct_range: tuple[float, float] = (1.0, 0.5),
    wrong_range: tuple[float, float] = (-1.0, 0.0),
    exceed_penalty: float = -1.0,
) -> float:
    """Cosine length-scaled accuracy reward (Yeo et al. 2025, "Demystifying long CoT").

    The reward moves along half a cosine from ``range[0]`` at 0 tokens to ``range[1]`` at
    ``max_tokens``: by default short correct answers earn more (1.0 -> 0.5) and wrong
    answers are penalised less when the model kept thinking (-1.0 -> 0.0). Truncated or
    over-long responses get ``exceed_penalty``.
    """
    if truncated or num_tokens > max_tokens or max_tokens <= 0:
        return exceed_penalty
    r0, r1 = correct_range if correct else wrong_range
    t = min(max(num_tokens, 0), max_tokens) / max_tokens
    return r1 + 0.5 * (r0 - r1) * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------
# Registry and combination
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardInput:
    """Everything a named reward may look at for one response.

    ``correct`` is the accuracy when already known (``compute_rewards`` fills it once per
    batch so that "accuracy", "speed" and "cosine" do not re-run math-verify); None means
    compute it here. ``overlength_buffer`` None means ``max_tokens // 5`` (DAPO: 4096 of
    20480).
    """

    response: str
    ground_truth: str
    num_tokens: int = 0
    num_steps: int = 0
    block_size: int = 1
    truncated: bool = False
    max_tokens: int = 0
    correct: bool | None = None
    overlength_buffer: int | None = None


def _is_correct(s: RewardInput) -> bool:
    if s.correct is not None:
        return bool(s.correct)
    return math_reward(s.response, s.ground_truth, truncated=s.truncated) == 1.0


def _overlength(s: RewardInput) -> float:
    if s.max_tokens <= 0:  # no known limit: nothing to penalise
        return 0.0
    buffer = s.max_tokens // 5 if s.overlength_buffer is None else s.overlength_buffer
    return overlength_reward(s.num_tokens, s.max_tokens, buffer=buffer)


#: Named rewards, each ``fn(sample: RewardInput) -> float``.
REWARDS: dict[str, Callable[[RewardInput], float]] = {
    "accuracy": lambda s: 1.0 if _is_correct(s) else 0.0,
    "speed": lambda s: speed_reward(s.num_tokens, s.num_steps, s.block_size, _is_correct(s)),
    "format": lambda s: format_reward(s.response),
    "boxed": lambda s: boxed_present_reward(s.response),
    "repetition": lambda s: repetition_reward(s.response),
    "overlength": _overlength,
    "cosine": lambda s: cosine_length_reward(
        s.num_tokens, s.max_tokens, _is_correct(s), truncated=s.truncated
    ),
}


def _is_seq(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes))


def combine_rewards(
    components: Mapping[str, float | Sequence[float]], weights: Mapping[str, float]
) -> float | list[float]:
    """Weighted sum ``sum_k weights[k] * components[k]``.

    Args:
        components: named reward values, each a float or a per-sample sequence (all
            sequences the same length; floats are broadcast). Components without a weight
            are ignored.
        weights: name -> weight; every name must be a component.

    Returns:
        A float if every weighted component is a float, else a list (one per sample).

    Raises:
        ValueError: a weight names an unknown component (the message lists the known
            ones), or sequence lengths differ.
    """
    unknown = [k for k in weights if k not in components]
    if unknown:
        raise ValueError(
            f"unknown reward name(s) {unknown}; known names: {sorted(components)}"
        )
    used = {k: components[k] for k in weights}
    lengths = {len(v) for v in used.values() if _is_seq(v)}
    if not lengths and not used:
        lengths = {len(v) for v in components.values() if _is_seq(v)}
    if len(lengths) > 1:
        raise ValueError(f"reward components have different lengths: {sorted(lengths)}")
    if not lengths:
        return float(sum(float(weights[k]) * float(v) for k, v in used.items()))
    (n,) = lengths
    total = [0.0] * n
    for k, v in used.items():
        w = float(weights[k])
        if _is_seq(v):
            for i in range(n):
                total[i] += w * float(v[i])
        else:
            for i in range(n):
                total[i] += w * float(v)
    return total


def compute_rewards(
    samples: Sequence[RewardInput],
    weights: Mapping[str, float],
    *,
    num_workers: int = 0,
    timeout: float = 5.0,
) -> tuple[list[float], dict[str, list[float]]]:
    """Score a batch: weighted sum of named rewards from :data:`REWARDS`.

    Accuracy is computed once for the whole batch (with ``num_workers`` verifier children)
    and shared by every accuracy-based reward.

    Args:
        samples: one :class:`RewardInput` per response.
        weights: reward name -> weight, e.g. ``{"speed": 1.0}`` (DiRL) or
            ``{"accuracy": 1.0, "overlength": 1.0}``.
        num_workers: parallel accuracy checks (see :func:`math_rewards`).
        timeout: hard bound per accuracy check, in seconds.

    Returns:
        ``(total, parts)``: ``total[i]`` the weighted sum for sample ``i``; ``parts`` maps
        each weighted name to its unweighted values, plus ``parts["correct"]`` (0.0/1.0
        accuracy) always, for the metrics and ``rl.group_filter: accuracy`` (DAPO).

    Raises:
        ValueError: a weight names an unknown reward (the message lists the known ones).
    """
    unknown = [k for k in weights if k not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward name(s) {unknown}; known names: {sorted(REWARDS)}")
    samples = list(samples)
    todo = [i for i, s in enumerate(samples) if s.correct is None]
    if todo:
        acc = math_rewards(
            [samples[i].response for i in todo],
            [samples[i].ground_truth for i in todo],
            [samples[i].truncated for i in todo],
            timeout=timeout,
            num_workers=num_workers,
        )
        for i, a in zip(todo, acc):
            samples[i] = replace(samples[i], correct=a == 1.0)
    parts: dict[str, list[float]] = {"correct": [1.0 if s.correct else 0.0 for s in samples]}
    for name in weights:
        parts[name] = [float(REWARDS[name](s)) for s in samples]
    total = combine_rewards({k: parts[k] for k in weights}, weights) if weights else None
    if not isinstance(total, list):
        total = [0.0] * len(samples)
    return total, parts
