"""Tests of dirl_min.rewards (SPEC section 5) against reference/rewards.py and real answers."""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirl_min import rewards as R
from dirl_min.core import answers as A
from dirl_min.engine import verifier as V
from reference import rewards as ref

# ----------------------------------------------------------------------------------------
# extract_boxed
# ----------------------------------------------------------------------------------------

_PIECES = [
    "\\boxed{", "\\boxed {", "\\boxed\n{", "\\fbox{", "\\boxed", "\\fbox", "\\boxedx{",
    "\\fboxed{", "{", "}", "{", "}", "\\{", "\\}", "\\", "a", "1", " ", "\n", "x+y", "\\frac",
]


@settings(max_examples=250, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=3)), max_size=40))
def test_extract_boxed_matches_reference(pieces):
    text = "".join(pieces)
    assert R.extract_boxed(text) == ref.extract_boxed(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{{{x}}}", "{{x}}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),  # several boxes: the last one
        ("\\boxed{1} and an unfinished \\boxed{2", "1"),  # last complete box wins
        ("\\boxed{\\boxed{1} + 2}", "1"),  # nested boxes: the later opener
        ("\\boxed{a {b}", None),  # never closes
        ("no box here {}", None),
        ("\\boxed{}", ""),
        ("\\fbox{7}", "7"),
        ("\\boxed {7}", "7"),
        ("\\boxed\n{7}", "7"),
        ("\\boxedx{7}", None),  # another command, not \boxed
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("} stray } \\boxed{3}", "3"),
        ("{ \\boxed{3}", "3"),
    ],
)
def test_extract_boxed_cases(text, expected):
    assert R.extract_boxed(text) == expected
    assert ref.extract_boxed(text) == expected


def test_extract_boxed_non_string_and_linear_time():
    assert R.extract_boxed(None) is None
    assert R.extract_boxed(b"\\boxed{1}") is None
    # Adversarial 1 MB inputs: quadratic code would take minutes here.
    for text in (
        "\\boxed{" * 150_000,
        "{" * 1_000_000 + "\\boxed{1}",
        "\\boxed{" + "{}" * 500_000 + "}",
        "x" * 1_000_000 + "\\boxed{5}",
    ):
        t = time.perf_counter()
        R.extract_boxed(text)
        assert time.perf_counter() - t < 3.0


# ----------------------------------------------------------------------------------------
# Accuracy: a table of real answer formats (ground truths marked m500 are MATH500's)
# ----------------------------------------------------------------------------------------

ANSWER_TABLE = [
    # fractions and decimals
    ("\\boxed{0.5}", "\\frac{1}{2}", 1),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1),
    ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", 1),  # m500 test/algebra/2584
    ("\\boxed{\\frac{28}{6}}", "\\frac{14}{3}", 1),
    ("\\boxed{4.67}", "\\frac{14}{3}", 0),
    ("\\boxed{\\frac{1}{3}}", "0.333", 0),
    ("\\boxed{0.0000672}", ".0000672", 1),
    ("\\boxed{6.72\\times 10^{-5}}", ".0000672", 1),
    # roots and pi
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{12}", 0),
    ("\\boxed{\\sqrt{117}}", "3\\sqrt{13}", 1),  # m500 test/algebra/2036
    ("\\boxed{\\frac{1}{\\sqrt{3}}}", "\\frac{\\sqrt{3}}{3}", 1),  # m500 test/algebra/1519
    ("\\boxed{1+\\sqrt{19}, 1-\\sqrt{19}}", "1 \\pm \\sqrt{19}", 1),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", 1),
    ("\\boxed{288\\pi}", "288 \\pi", 1),
    ("\\boxed{904.78}", "288 \\pi", 0),
    # intervals, tuples, sets
    ("\\boxed{(-\\infty, 0]}", "(-\\infty, 0]", 1),
    ("\\boxed{(-\\infty, 0)}", "(-\\infty, 0]", 0),
    ("\\boxed{(0, 9)\\cup(9, 36)}", "(0,9) \\cup (9,36)", 1),
    ("\\boxed{[-2,7]}", "x \\in [-2,7]", 1),
    ("\\boxed{[-2,7)}", "x \\in [-2,7]", 0),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1),  # m500 precalc/807
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 0),
    ("\\boxed{(6, -1, 31)}", "(6,31,-1)", 0),  # order matters in a tuple
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1),
    ("\\boxed{-2, 1+\\sqrt5, 1-\\sqrt5}", "\\{1\\pm\\sqrt{5},-2\\}", 1),
    ("\\boxed{-2, 2}", "1,-2", 0),
    # text, units, degrees, percents, money, thousands separators
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1),
    ("\\boxed{\\text{west}}", "\\text{east}", 0),
    ("\\boxed{C}", "\\text{(C)}", 1),
    ("\\boxed{\\text{(B)}}", "\\text{(C)}", 0),
    ("\\boxed{5\\text{ cm}}", "5", 1),
    ("\\boxed{5.4}", "5.4 \\text{ cents}", 1),
    ("\\boxed{90}", "90^\\circ", 1),
    ("\\boxed{45^\\circ}", "90^\\circ", 0),
    ("\\boxed{0.5}", "50\\%", 1),
    ("\\boxed{18.9}", "\\$18.90", 1),
    ("\\boxed{10080}", "10,\\!080", 1),
    # signs, equations, expressions
    ("\\boxed{3}", "-3", 0),
    ("\\boxed{-3}", "-3", 1),
    ("\\boxed{x = 3}", "3", 1),
    ("\\boxed{5}", "x=5", 1),
    ("\\boxed{y=3x+2}", "y = 2x + 3", 0),
    ("\\boxed{-5x + 7y - 11z - 4 = 0}", "5x - 7y + 11z + 4 = 0", 1),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1),
    ("\\boxed{q - p}", "p - q", 0),
    # matrices
    (
        "\\boxed{\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}}",
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
        1,
    ),
    (
        "\\boxed{\\begin{pmatrix} 1 & 0 \\\\ 0 & -1 \\end{pmatrix}}",
        "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
        0,
    ),
    # where the box is and how it is written
    ("First \\boxed{3}, but on reflection the answer is \\boxed{5}.", "5", 1),
    ("First \\boxed{5}, but on reflection the answer is \\boxed{3}.", "5", 0),
    ("So \\fbox{9}", "9", 1),
    ("So \\boxed {9}", "9", 1),
    ("So the answer is 9.", "9", 0),  # no box
    ("\\boxed{}", "9", 0),
    ("\\boxed{7}", "9", 0),
]


@pytest.mark.parametrize("response, gt, expected", ANSWER_TABLE)
def test_math_reward_table(response, gt, expected):
    assert R.math_reward(response, gt) == float(expected)


def test_math500_ground_truths(full_data_dir):
    """The table's MATH500 answers are real, and every MATH500 answer scores itself 1."""
    path = full_data_dir / "benchmarks" / "math500.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with path.open() as f:
        rows = {r["id"]: r["ground_truth_answer"] for r in map(json.loads, f)}
    assert rows["test/algebra/2584.json"] == "\\frac{14}{3}"
    assert rows["test/algebra/2036.json"] == "3\\sqrt{13}"
    assert rows["test/algebra/1519.json"] == "\\frac{\\sqrt{3}}{3}"
    assert rows["test/precalculus/807.json"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    gts = list(rows.values())
    responses = [f"Reasoning...\nThe answer is $\\boxed{{{g}}}$." for g in gts]
    assert R.math_rewards(responses, gts, False) == [1.0] * len(gts)
    assert R.math_rewards(responses, gts, True) == [0.0] * len(gts)


def test_truncated_or_unboxed_scores_zero():
    assert R.math_reward("\\boxed{5}", "5") == 1.0
    assert R.math_reward("\\boxed{5}", "5", truncated=True) == 0.0
    assert R.math_reward("the answer is 5", "5") == 0.0
    assert R.math_reward(None, "5") == 0.0
    assert R.math_reward("\\boxed{5}", None) == 0.0
    assert R.math_reward("\\boxed{5}", "\\boxed{5}") == 1.0  # a boxed ground truth is unwrapped


# ----------------------------------------------------------------------------------------
# Hostile inputs: bounded time, never raises, also from threads
# ----------------------------------------------------------------------------------------

_BAD_UTF8 = b"\xff\xfe\\boxed{\xc3\x28 1}\xed\xa0\x80 \\boxed{\x80\x81}".decode(
    "utf-8", errors="replace"
)

# (response, ground truth, expected score, seconds allowed). Without the guards the power
# tower and the 10000-deep nesting hang sympy or overflow the parser's stack.
HOSTILE = [
    ("\\boxed{1 + {2}", "1", 0.0, 1.0),
    ("\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "1", 0.0, 2.0),
    ("\\boxed{10^{10^{10^{10}}}}", "1", 0.0, 1.0),
    ("\\boxed{9^{9^{9}}}", "1", 0.0, 1.0),
    ("\\boxed{(10^{10})!}", "1", 0.0, 1.0),
    ("word " * 200_000 + "\\boxed{42}", "42", 1.0, 3.0),  # 1 MB response
    ("\\boxed{" + "1+" * 500_000 + "1}", "1", 0.0, 3.0),  # 1 MB answer
    (_BAD_UTF8, "1", 0.0, 5.0),
    ("\ufffd" * 1000, "1", 0.0, 1.0),
]


def test_guards_refuse_traps_but_no_real_answer():
    for trap in ("{" * 100 + "1" + "}" * 100, "10^{10^{10}}", "2^{1000001}", "9 ^ {9^{9}}",
                 "1000001!", "(10^{10})!", "1+" * 600):
        assert A._refusal_reason(trap) is not None, trap
    for response, gt, _ in ANSWER_TABLE:
        for answer in (R.extract_boxed(response), gt):
            assert answer is None or A._refusal_reason(answer) is None, answer
    fine_answers = ("2^{2^{2^{2^{2}}}}", "e^{x^2}", "100!", "\\frac{100!}{2^{50}}", "10,\\!080")
    for fine in fine_answers:
        assert A._refusal_reason(fine) is None, fine


def _timed_score(case):
    response, gt, _, _ = case
    t = time.perf_counter()
    score = R.math_reward(response, gt)
    return score, time.perf_counter() - t


@pytest.mark.parametrize("case", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_inputs_main_thread(case):
    score, elapsed = _timed_score(case)
    assert score == case[2]
    assert elapsed < case[3]


def test_hostile_inputs_in_threads():
    results = {}

    def run():
        results["thread"] = [_timed_score(c) for c in HOSTILE]

    th = threading.Thread(target=run)
    th.start()
    th.join(timeout=120)
    assert not th.is_alive()
    with ThreadPoolExecutor(max_workers=2) as ex:
        results["pool"] = list(ex.map(_timed_score, HOSTILE))
    for got in results.values():
        for (score, elapsed), case in zip(got, HOSTILE):
            assert score == case[2]
            assert elapsed < case[3] + 2.0  # two threads share the cores


# Escapes the cheap guards (each exponent is small) but is 10^(10^8): minutes of sympy.
_SLOW_UNGUARDED = "\\boxed{(10^{1000})^{100000}}"


def test_slow_answer_is_cut_by_timeout_in_a_thread():
    assert A._refusal_reason("(10^{1000})^{100000}") is None  # really reaches math-verify
    R.math_reward("\\boxed{2.5}", "3")  # a warm verifier child, so no start-up in the timing
    before = R.verifier_stats()
    out = {}

    def run():
        t = time.perf_counter()
        out["score"] = R.math_reward(_SLOW_UNGUARDED, "1", timeout=1.0)
        out["elapsed"] = time.perf_counter() - t

    th = threading.Thread(target=run)
    th.start()
    th.join(timeout=60)
    assert out["score"] == 0.0
    assert out["elapsed"] < 5.0
    after = R.verifier_stats()
    cut = sum(after.get(k, 0) - before.get(k, 0) for k in ("soft_timeouts", "hard_timeouts"))
    assert cut == 1
    assert R.math_reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0  # the checker still works


def test_integer_answers_are_decided_without_the_verifier():
    pairs = [("\\boxed{19}", "20", 0.0), ("\\boxed{-3}", "-3", 1.0), ("\\boxed{007}", "7", 1.0),
             ("\\boxed{+4}", "4", 1.0), ("\\boxed{ 12 }", "\\boxed{12}", 1.0), ("\\boxed{-0}", "0", 1.0)]
    before = R.verifier_stats()
    assert [R.math_reward(r, g) for r, g, _ in pairs] == [want for _, _, want in pairs]
    after = R.verifier_stats()
    assert after.get("verified", 0) == before.get("verified", 0)
    assert after["fast_path"] - before.get("fast_path", 0) == len(pairs)
    # not integer literals on both sides: still math-verify's call
    assert R.math_reward("\\boxed{20.0}", "20") == 1.0
    assert R.verifier_stats()["verified"] > after.get("verified", 0)


def test_hung_or_crashed_child_is_killed_and_counted():
    before = R.verifier_stats()
    t = time.perf_counter()
    assert V._worker_request(["_sleep", 60], 0.5) is None  # hangs past the hard timeout
    assert time.perf_counter() - t < 5.0
    assert V._worker_request(["_crash"], 30) is None  # dies mid-request
    after = R.verifier_stats()
    assert after.get("hard_timeouts", 0) - before.get("hard_timeouts", 0) == 1
    assert after.get("crashes", 0) - before.get("crashes", 0) == 1
    assert R.math_reward("\\boxed{2\\sqrt{3}}", "\\sqrt{12}") == 1.0  # a fresh child serves


def test_inline_fallback_works_in_threads(monkeypatch):
    """Without verifier children, math-verify runs in-process with its alarms disabled."""
    monkeypatch.setattr(V._POOL, "inline_until", math.inf)
    cases = [("\\boxed{0.5}", "\\frac{1}{2}", 1.0), ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
             ("\\boxed{3}", "4", 0.0)]
    with ThreadPoolExecutor(max_workers=2) as ex:
        got = list(ex.map(lambda c: R.math_reward(c[0], c[1]), cases))
    assert got == [c[2] for c in cases]


def test_math_rewards_parallel_equals_sequential():
    rows = ANSWER_TABLE[:12] + [(_SLOW_UNGUARDED, "1", 0)]
    responses = [r for r, _, _ in rows]
    gts = [g for _, g, _ in rows]
    truncated = [i % 5 == 4 for i in range(len(rows))]
    expected = [0.0 if t else float(e) for (_, _, e), t in zip(rows, truncated)]
    seq = R.math_rewards(responses, gts, truncated, timeout=1.0, num_workers=0)
    par = R.math_rewards(responses, gts, truncated, timeout=1.0, num_workers=2)
    assert seq == par == expected
    with pytest.raises(ValueError):
        R.math_rewards(["\\boxed{1}"], ["1", "2"], False)


# ----------------------------------------------------------------------------------------
# Speed reward
# ----------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.integers(0, 4096),
    steps=st.integers(-2, 4096),
    block=st.integers(1, 64),
    correct=st.booleans(),
)
def test_speed_reward_matches_reference(tokens, steps, block, correct):
    got = R.speed_reward(tokens, steps, block, correct)
    assert got == pytest.approx(ref.speed_reward(tokens, steps, block, correct), abs=1e-12)
    assert (0.5 <= got <= 1.0) if correct else (-0.5 <= got <= 0.0)


@pytest.mark.parametrize("block", [2, 4, 32])
def test_speed_reward_endpoints(block):
    n = 8 * block
    assert R.speed_reward(n, n, block, True) == 0.5  # v = 1: one token per step
    assert R.speed_reward(n, n // block, block, True) == 1.0  # v = B: a block per step
    assert R.speed_reward(n, n, block, False) == 0.0
    assert R.speed_reward(n, n // block, block, False) == -0.5
    assert R.speed_reward(n, 0, block, True) == 0.5  # guarded: no steps
    assert R.speed_reward(n, n // 2, 1, True) == 0.5  # B = 1: no speed-up possible


@settings(max_examples=200, deadline=None)
@given(
    block=st.integers(2, 64),
    steps=st.integers(1, 256),
    t1=st.integers(0, 20000),
    t2=st.integers(0, 20000),
)
def test_speed_reward_monotone(block, steps, t1, t2):
    lo, hi = sorted((t1, t2))  # same steps, more tokens: faster
    for correct, sign in ((True, 1.0), (False, -1.0)):  # correct: up with speed; wrong: down
        slow = R.speed_reward(lo, steps, block, correct)
        fast = R.speed_reward(hi, steps, block, correct)
        assert sign * (fast - slow) >= -1e-15


# ----------------------------------------------------------------------------------------
# Shaping rewards
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Reasoning. The answer is $\\boxed{5}$.", 1.0),
        ("\\boxed{\\frac{1}{2}}", 1.0),
        ("\\boxed{3} and also \\boxed{5}", 0.0),  # two boxes
        ("\\boxed{5} " + "and then more reasoning " * 5, 0.0),  # not at the end
        ("\\boxed{5} {", 0.0),  # unbalanced braces
        ("} \\boxed{5}", 0.0),
        ("\\boxed{ }", 0.0),  # empty
        ("no box", 0.0),
    ],
)
def test_format_reward(response, expected):
    assert R.format_reward(response) == expected


def test_boxed_present_reward():
    assert R.boxed_present_reward("\\boxed{3} and also \\boxed{5}") == 1.0
    assert R.boxed_present_reward("\\boxed{5") == 0.0
    assert R.boxed_present_reward("\\boxed{}") == 0.0
    assert R.boxed_present_reward("5") == 0.0


def test_repetition_reward_hand_cases():
    assert R.repetition_reward("a b c d e f") == 0.0
    assert R.repetition_reward("a b c a b c") == -0.25  # abc bca cab abc: 1 repeat in 4
    assert R.repetition_reward("a a a a a a", ngram=1) == -5 / 6
    assert R.repetition_reward("a b") == 0.0  # shorter than one n-gram
    assert R.repetition_reward("abab", ngram=2, unit="char") == -1 / 3
    with pytest.raises(ValueError):
        R.repetition_reward("a", ngram=0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c"]), max_size=60), st.integers(1, 4))
def test_repetition_reward_range(words, ngram):
    r = R.repetition_reward(" ".join(words), ngram=ngram)
    assert -1.0 < r <= 0.0
    total = len(words) - ngram + 1
    if total > 0:
        distinct = len({tuple(words[i : i + ngram]) for i in range(total)})
        assert r == pytest.approx(-(total - distinct) / total)


def test_overlength_reward():
    f = R.overlength_reward
    assert [f(n, 100, buffer=20) for n in (0, 80, 90, 100, 101)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert f(100, 100, buffer=0) == 0.0 and f(101, 100, buffer=0) == -1.0


def test_cosine_length_reward():
    f = R.cosine_length_reward
    assert f(0, 100, True) == 1.0 and f(100, 100, True) == pytest.approx(0.5)
    assert f(50, 100, True) == pytest.approx(0.75)
    assert f(0, 100, False) == -1.0 and f(100, 100, False) == pytest.approx(0.0)
    assert f(10, 100, True, truncated=True) == -1.0
    assert f(101, 100, True) == -1.0


# ----------------------------------------------------------------------------------------
# Combination, registry, batch scoring
# ----------------------------------------------------------------------------------------


def test_combine_rewards():
    assert R.combine_rewards({"a": 1.0, "b": -0.5}, {"a": 2.0, "b": 4.0}) == 0.0
    assert R.combine_rewards({"a": 1.0, "b": 3.0}, {"b": 0.5}) == 1.5  # unweighted: ignored
    got = R.combine_rewards({"a": [1.0, 0.0, 1.0], "b": [0.5, -0.5, 0.0], "c": 2.0},
                            {"a": 1.0, "b": 2.0, "c": 0.25})
    assert got == [2.5, -0.5, 1.5]
    with pytest.raises(ValueError, match=r"unknown reward name.*'nope'.*known names: \['a', 'b'\]"):
        R.combine_rewards({"a": 1.0, "b": 2.0}, {"nope": 1.0})
    with pytest.raises(ValueError, match="different lengths"):
        R.combine_rewards({"a": [1.0], "b": [1.0, 2.0]}, {"a": 1.0, "b": 1.0})


def test_registry_names_and_speed_contains_accuracy():
    assert {"accuracy", "speed", "format", "boxed", "repetition", "overlength"} <= set(R.REWARDS)
    right = R.RewardInput("\\boxed{4}", "4", num_tokens=64, num_steps=16, block_size=4)
    wrong = R.RewardInput("\\boxed{5}", "4", num_tokens=64, num_steps=16, block_size=4)
    assert R.REWARDS["accuracy"](right) == 1.0 and R.REWARDS["accuracy"](wrong) == 0.0
    assert R.REWARDS["speed"](right) == 1.0 and R.REWARDS["speed"](wrong) == -0.5
    over = R.RewardInput("x", "4", num_tokens=95, max_tokens=100, overlength_buffer=10)
    assert R.REWARDS["overlength"](over) == -0.5


def test_compute_rewards():
    samples = [
        R.RewardInput("\\boxed{\\frac12}", "0.5", num_tokens=32, num_steps=32, block_size=4),
        R.RewardInput("\\boxed{3}", "0.5", num_tokens=32, num_steps=8, block_size=4),
        R.RewardInput("\\boxed{0.5}", "0.5", num_tokens=32, num_steps=8, block_size=4,
                      truncated=True),
    ]
    total, parts = R.compute_rewards(samples, {"speed": 1.0})
    assert parts["correct"] == [1.0, 0.0, 0.0]  # always reported, even with speed only
    assert total == parts["speed"] == [0.5, -0.5, -0.5]
    total, parts = R.compute_rewards(samples, {"accuracy": 2.0, "boxed": 0.5}, num_workers=2)
    assert total == [2.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="known names"):
        R.compute_rewards(samples, {"speeed": 1.0})
