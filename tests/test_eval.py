"""python -m dirl_min.eval: scoring on every benchmark's answers, pass@k, determinism under
sharding and resume, the --model path, data errors, the sweep plot."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from dirl_min import eval as E
from dirl_min.evaluation import benchmarks as EB, run as ER
from dirl_min.infra.errors import EvalError
from dirl_min import tasks
from dirl_min.settings.config import Config
from dirl_min.evaluation import responses as decode
from dirl_min.evaluation.stats import avg_at_k, mean_pass_at_k, pass_at_k, pass_ks
from dirl_min.model import build_tiny, save_model
from dirl_min.tasks import render_prompt
from tests.fixtures.tree import assert_env_imports_tree, tree_env

BENCH_FILES = ["math500", "gsm8k", "aime2024", "aime2025", "olympiadbench"]
#: a few records of each benchmark, kept in the repository (the full files are not needed)
BENCH_DIR = Path(__file__).resolve().parent / "fixtures" / "benchmarks"


def _deterministic_results(path: Path) -> dict:
    """results.json without the machine-dependent parts (timings, process count, batch size)."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "runtime"}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(json.loads(path.read_text()))


def _samples(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ER.RUNTIME_FIELDS}
            for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------
# Scoring: oracle answers built from every benchmark's ground truths
# --------------------------------------------------------------------------------------

_INT = re.compile(r"-?\d+")
_NUM = re.compile(r"-?\d+(\.\d+)?")


def _equivalent_forms(gt: str) -> dict[str, str]:
    """Other spellings of the same answer that a model may write (all go through math-verify)."""
    s = gt.strip()
    forms = {}
    if s.startswith("$") and s.endswith("$"):
        forms["without $"] = s.replace("$", "")  # olympiadbench answers carry $ delimiters
    else:
        forms["inside $"] = f"${s}$"
    if "\\frac" in s:
        forms["dfrac"] = s.replace("\\frac", "\\dfrac")
    if _INT.fullmatch(s):
        forms["point zero"] = s + ".0"
        if not s.startswith("-") and len(s) < 3:
            forms["zero padded"] = s.zfill(3)  # AIME style
        if len(s.lstrip("-")) > 3:
            forms["thousands commas"] = f"{int(s):,}"
    return forms


def _perturbed(gts: list[str], i: int) -> str:
    """A wrong answer for problem i: numeric + 1, else the next different answer of the file."""
    s = gts[i].strip()
    if _NUM.fullmatch(s):
        return str(Fraction(s) + 1) if "." not in s else repr(float(s) + 1)
    j = (i + 1) % len(gts)
    while " ".join(gts[j].split()) == " ".join(gts[i].split()):
        j = (j + 1) % len(gts)
    return gts[j]


def _score(responses, gts, truncated=False):
    flags = [truncated] * len(responses)
    return [ok for _, ok in decode.score_responses(responses, gts, flags)]


@pytest.mark.parametrize("data", ["fixtures", "full"])
@pytest.mark.parametrize("name", BENCH_FILES)
def test_oracle_answers_score_correct_and_perturbed_answers_wrong(request, name, data):
    """Every ground truth of the file, boxed at the end of a reasoning text, is correct (plain,
    with extra spaces, and after an earlier wrong box); truncated or unboxed it is not.

    ``fixtures``: the few records kept in tests/fixtures (chosen to cover the answer shapes);
    ``full``: the complete benchmark files from ``$DIRL_MIN_FULL_DATA`` (skipped without them).
    math-verify costs 3-25 ms per check, too slow for every form of all ~2.5k problems in the
    test budget, so the forms that reach math-verify ($-delimiters toggled, \\dfrac, 18.0, 025,
    1,234) and the perturbed answers are checked on a fixed random subset: 32 problems per
    file (all 30 for AIME). The plain forms use every problem.
    """
    folder = BENCH_DIR if data == "fixtures" else request.getfixturevalue("full_data_dir") / "benchmarks"
    problems = tasks.load_problems(folder / f"{name}.jsonl")
    gts = [p.answer for p in problems]
    assert len(gts) >= (10 if data == "fixtures" else 30)

    def wrap(ans):
        return f"Let me work through it step by step.\nSo the final answer is \\boxed{{{ans}}}."

    plain = [wrap(g) for g in gts]
    assert all(_score(plain, gts)), "plain boxed ground truth not scored correct"
    spaced = [f"So the answer is \\boxed{{  {g}  }} ." for g in gts]
    assert all(_score(spaced, gts)), "boxed ground truth with extra spaces not scored correct"
    last_box = [f"First guess \\boxed{{{_perturbed(gts, i)}}}, corrected: \\boxed{{{g}}}" for i, g in enumerate(gts)]
    assert all(_score(last_box, gts)), "the last box must be the one scored"
    assert not any(_score(plain, gts, truncated=True)), "a truncated response must score 0"
    assert not any(_score([f"The answer is {g}." for g in gts], gts)), "an unboxed answer must score 0"

    subset = sorted(random.Random(f"oracle-{name}").sample(range(len(gts)), min(32, len(gts))))
    responses, golds, labels = [], [], []
    for i in subset:
        for label, form in _equivalent_forms(gts[i]).items():
            responses.append(wrap(form))
            golds.append(gts[i])
            labels.append(f"{label}: {form!r} vs {gts[i]!r}")
    assert len({lab.split(":")[0] for lab in labels}) >= 2, "at least two other surface forms per file"
    verdicts = _score(responses, golds)
    failed = [lab for lab, ok in zip(labels, verdicts) if not ok]
    assert not failed, f"equivalent forms scored wrong: {failed}"

    wrong = [wrap(_perturbed(gts, i)) for i in subset]
    verdicts = _score(wrong, [gts[i] for i in subset])
    assert not any(verdicts), [gts[i] for i, ok in zip(subset, verdicts) if ok]
    wrong_last = [f"\\boxed{{{gts[i]}}} ... no, \\boxed{{{_perturbed(gts, i)}}}" for i in subset]
    assert not any(_score(wrong_last, [gts[i] for i in subset])), "an earlier right box must not count"


# --------------------------------------------------------------------------------------
# pass@k / avg@k
# --------------------------------------------------------------------------------------


def test_pass_at_k_hand_worked_values():
    assert [pass_at_k(4, 1, k) for k in (1, 2, 4)] == pytest.approx([0.25, 0.5, 1.0])
    # n=4, c=2: pass@2 = 1 - C(2,2)/C(4,2) = 5/6
    assert [pass_at_k(4, 2, k) for k in (1, 2, 3, 4)] == pytest.approx([0.5, 5 / 6, 1.0, 1.0])
    # n=16, c=1: pass@8 = 1 - C(15,8)/C(16,8) = 1 - 8/16
    assert pass_at_k(16, 1, 8) == pytest.approx(0.5)
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 16, 1) == 1.0
    assert avg_at_k([(4, 1), (4, 2)]) == pytest.approx(0.375)
    assert mean_pass_at_k([(4, 1), (4, 2)], 2) == pytest.approx((0.5 + 5 / 6) / 2)
    assert pass_ks(16) == [1, 2, 4, 8, 16] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (0, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                exact = Fraction(sum(any(s) for s in subsets), len(subsets))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


# --------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------


def test_sample_seed_is_a_pure_function_of_its_four_inputs():
    s = ER.sample_seed(0, "gsm8k", 3, 1)
    assert s == ER.sample_seed(0, "gsm8k", 3, 1) and 0 <= s < 2**32
    others = {ER.sample_seed(1, "gsm8k", 3, 1), ER.sample_seed(0, "math500", 3, 1),
              ER.sample_seed(0, "gsm8k", 4, 1), ER.sample_seed(0, "gsm8k", 3, 2)}
    assert s not in others and len(others) == 4


def test_shards_partition_the_problems():
    for n, world in [(0, 1), (5, 1), (5, 2), (7, 3), (2, 4)]:
        shards = [ER.shard_indices(n, r, world) for r in range(world)]
        assert sorted(itertools.chain(*shards)) == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        ER.shard_indices(4, 2, 2)


def test_merge_shards_sorts_dedups_and_rejects_conflicts():
    def rec(b, i, j, resp="x", secs=0.1):
        return {"benchmark": b, "threshold": 0.9, "problem": i, "sample": j, "response": resp, "decode_seconds": secs}

    a = [rec("gsm8k", 2, 0), rec("gsm8k", 0, 1)]
    b = [rec("gsm8k", 0, 0), rec("aime2024", 1, 0), rec("gsm8k", 2, 0, secs=5.0)]  # a redone sample
    merged = ER.merge_shards([a, b])
    assert [ER.record_key(r) for r in merged] == [("aime2024", 0.9, 1, 0), ("gsm8k", 0.9, 0, 0),
                                                 ("gsm8k", 0.9, 0, 1), ("gsm8k", 0.9, 2, 0)]
    with pytest.raises(ValueError, match="different"):
        ER.merge_shards([a, [rec("gsm8k", 2, 0, resp="y")]])


def test_render_prompt_replaces_only_the_question():
    q = "What is {x}?"  # braces in the question and in the template stay as written
    assert render_prompt(EB.DIRL_PROMPT, q) == (
        "What is {x}?\nPlease reason step by step, and put your final answer within \\boxed{}.")


def test_help_states_dirl_defaults():
    cfg = E.parse_config([])
    assert (cfg.eval.samples, cfg.eval.temperature, cfg.eval.top_k, cfg.eval.top_p, cfg.decode.strategy,
            cfg.decode.evaluated, cfg.eval.max_new_tokens) == (16, 1.0, 50, 1.0, "low_confidence_dynamic", [0.9], 8192)
    text = " ".join(E.build_parser().format_help().split())  # unwrap argparse's line breaks
    for needle in ["default: 16", "default: 50", "default: 8192", "default: 0.9", "Please reason step by step"]:
        assert needle in text


def test_benchmark_names_resolve_in_the_data_dir_and_missing_ones_say_what_to_do(tmp_path):
    bench_dir = BENCH_DIR
    got = EB.resolve_benchmarks("math500,gsm8k,aime2024,aime2025,olympiadbench", bench_dir)
    assert [(n, p.name) for n, p in got] == [(n, f"{n}.jsonl") for n in BENCH_FILES]
    with pytest.raises(EvalError, match="--hub .*--data-dir"):
        EB.resolve_benchmarks("math500", None)
    with pytest.raises(EvalError, match="holds: aime2024"):
        EB.resolve_benchmarks("math501", bench_dir)
    (tmp_path / "a.jsonl").write_text('{"question": "q", "ground_truth_answer": "1"}\n')
    (tmp_path / "MATH500.json").write_text('[{"question": "q", "ground_truth_answer": "1"}]')
    assert [n for n, _ in EB.resolve_benchmarks(str(tmp_path), None)] == ["MATH500", "a"]
    assert EB.resolve_benchmarks("math500", tmp_path)[0][1].name == "MATH500.json"  # DiRL's hub file name
    with pytest.raises(EvalError, match="same name|benchmark name"):
        EB.resolve_benchmarks(f"{tmp_path / 'a.jsonl'},{tmp_path / 'a.jsonl'}", None)


# --------------------------------------------------------------------------------------
# Benchmarks from the Hub (--hub): conversion, cache, offline failure (no network in tests)
# --------------------------------------------------------------------------------------


def test_hub_layouts_convert_to_question_and_ground_truth_answer():
    """The field layouts public copies of the five benchmarks use all become the eval layout."""
    from dirl_min.evaluation.benchmarks import to_records

    rows = [
        {"question": "Q1", "ground_truth_answer": "\\frac{1}{2}"},  # DiRL's own layout
        {"problem": "Q2", "solution": "... \\boxed{3}", "answer": "3", "unique_id": "test/algebra/1.json"},  # MATH-500
        {"question": "Q3", "answer": "She pays 2 + 3 = <<2+3=5>>5.\n#### 1,234"},  # GSM8K solution text
        {"question": "Q4", "final_answer": ["$x=2$"], "id": 7},  # OlympiadBench: a one-element list
        {"question": "Q5", "answer": 70.0},  # AIME 2025 copies store floats
        {"Problem": "Q6", "Answer": 25},
    ]
    got = to_records(rows, "stand-in")
    assert [(r["question"], r["ground_truth_answer"]) for r in got] == [
        ("Q1", "\\frac{1}{2}"), ("Q2", "3"), ("Q3", "1234"), ("Q4", "$x=2$"), ("Q5", "70"), ("Q6", "25")]
    assert got[1]["unique_id"] == "test/algebra/1.json" and got[3]["id"] == 7 and "solution" in got[1]
    with pytest.raises(ValueError, match="stand-in: row 1 has no answer"):
        to_records([{"question": "a", "answer": "1"}, {"question": "b", "solution": "2"}], "stand-in")
    with pytest.raises(ValueError, match="row 0: final_answer is a list of 2"):
        to_records([{"question": "a", "final_answer": ["1", "2"]}], "stand-in")


def _forbid_network(monkeypatch):
    """Any attempt to reach the Hub fails the test."""
    import socket

    import datasets
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("the network was used")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_offline_fails_at_once_with_what_to_do(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and nothing cached: an error naming the cache and --data-dir, without
    any network call (datasets' own path retried for ~26 s before failing)."""
    _forbid_network(monkeypatch)
    monkeypatch.setenv("DIRL_MIN_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        E.main(["--hub", "--benchmarks", "gsm8k,math500", "--model", "tiny", "--out", str(tmp_path / "o")])
    msg = str(e.value.code)
    assert "gsm8k, math500 not in the local cache" in msg and "HF_HUB_OFFLINE=1" in msg and "--data-dir" in msg


def test_hub_unreachable_fails_after_one_short_probe(tmp_path, monkeypatch):
    import socket

    from dirl_min.evaluation import benchmarks as B

    _forbid_network(monkeypatch)
    for name in B.OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    probes = []

    def no_route(address, timeout=None):
        probes.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    with pytest.raises(B.HubError, match=r"hub.example:8443 did not answer within 3 s .*--data-dir"):
        B.fetch(["aime2024"], tmp_path / "cache")
    assert probes == [(("hub.example", 8443), B.PROBE_TIMEOUT_S)]
    with pytest.raises(B.HubError, match="unknown benchmark"):
        B.fetch(["math501"], tmp_path / "cache")


def test_hub_download_is_converted_cached_and_then_read_offline(tmp_path, monkeypatch):
    """A (faked) Hub answer in DiRL's file layout becomes a JSONL file that the evaluation reads
    exactly like --data-dir files; the next run uses that copy with the network forbidden."""
    import datasets
    import huggingface_hub

    from dirl_min.evaluation import benchmarks as B

    rows = [json.loads(line) for line in (BENCH_DIR / "gsm8k.jsonl").read_text().splitlines()]
    hub_rows = [{"question": r["question"], "answer": f"work...\n#### {r['ground_truth_answer']}"} for r in rows]
    calls = []
    commit = "0123456789abcdef0123456789abcdef01234567"

    class Info:
        sha = commit

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, repo, revision=None, timeout=None: calls.append(("info", repo, revision)) or Info)
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, **kw: calls.append(("load", repo, kw)) or hub_rows)
    monkeypatch.setattr(B, "hub_unreachable", lambda timeout=B.PROBE_TIMEOUT_S: None)
    monkeypatch.setenv("DIRL_MIN_DATA", str(tmp_path / "cache"))
    for name in B.OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)
    args = ["--hub", "--benchmarks", "gsm8k", "--model", "tiny", "--limit", "3", "--samples", "1",
            "--max-new-tokens", "4", "--no-progress"]
    assert E.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert calls == [("info", "Auraithm/GSM8K", "main"),
                     ("load", "Auraithm/GSM8K", {"revision": commit, "data_files": "GSM8K.json", "split": "train"})]
    cached = tmp_path / "cache" / "gsm8k.jsonl"
    got = tasks.load_problems(cached)
    assert [(p.question, p.answer) for p in got] == [(r["question"], r["ground_truth_answer"]) for r in rows]
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    source = f"hf://datasets/Auraithm/GSM8K@{commit}/GSM8K.json"
    assert json.dumps(res).count(source) >= 1

    _forbid_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert E.main([*args, "--out", str(tmp_path / "b")]) == 0
    assert _samples(tmp_path / "b" / "samples.jsonl") == _samples(tmp_path / "a" / "samples.jsonl")
    # the cache folder is also a --data-dir
    assert EB.resolve_benchmarks("gsm8k", tmp_path / "cache") == [("gsm8k", cached)]


# --------------------------------------------------------------------------------------
# End to end on the tiny model
# --------------------------------------------------------------------------------------

TINY = ["--model", "tiny", "--data-dir", str(BENCH_DIR), "--benchmarks", "gsm8k,aime2024", "--limit", "5",
        "--samples", "3",
        "--max-new-tokens", "12", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    t = time.perf_counter()
    assert E.main([*TINY, "--out", str(out)]) == 0
    _WALL_SECONDS[out] = time.perf_counter() - t
    return out


_WALL_SECONDS: dict[Path, float] = {}  # of each single_run


def test_single_run_writes_consistent_records_and_results(single_run):
    recs = _samples(single_run / "samples.jsonl")
    assert len(recs) == 2 * 5 * 3
    res = json.loads((single_run / "results.json").read_text())
    assert [(r["benchmark"], r["problems"], r["samples"]) for r in res["runs"]] == [("gsm8k", 5, 3), ("aime2024", 5, 3)]
    for r in recs:
        assert r["seed"] == ER.sample_seed(0, r["benchmark"], r["problem"], r["sample"])
        assert 1 <= r["tokens_per_step"] <= 4 and r["length"] <= r["num_tokens"] <= 12 + 3
        assert r["num_steps"] == sum(r["steps_by_tokens"]) and r["max_tokens_per_step"] <= 4
        assert r["prompt"].endswith("<|im_start|>assistant\n") and "Please reason step by step" in r["prompt"]
    gsm = res["runs"][0]
    g = [r for r in recs if r["benchmark"] == "gsm8k"]
    assert gsm["truncation_rate"] == pytest.approx(sum(r["truncated"] for r in g) / len(g))
    assert gsm["mean_length"] == pytest.approx(sum(r["length"] for r in g) / len(g))
    assert gsm["tokens_per_step"] == pytest.approx(sum(r["tokens_per_step"] for r in g) / len(g))
    # the records are what the decoder gives each (prompt, seed): decoded again here, one at a time
    from dirl_min.decoding import generate
    from dirl_min.model import chat_prompt_ids, stop_token_ids

    model, tok, _ = decode.load_eval_model("tiny")
    for r in g:
        ids = chat_prompt_ids(tok, render_prompt(EB.DIRL_PROMPT, r["question"]))
        roll = generate(model, [ids], seeds=[r["seed"]], max_new_tokens=12, temperature=1.0, top_k=50,
                        stop_token_ids=stop_token_ids(tok))
        assert (r["truncated"], r["num_tokens"], r["length"], r["num_steps"]) == (
            roll.truncated[0], len(roll.response_ids[0]), roll.length_to_stop(0), roll.num_steps(0))
    # the decode time is part of the run's wall time, and the rate is the records' tokens over it
    raw = [json.loads(line) for line in (single_run / "samples.jsonl").read_text().splitlines()]
    secs = sum(r["decode_seconds"] for r in raw if r["benchmark"] == "gsm8k")
    assert gsm["runtime"]["decode_seconds"] == pytest.approx(secs)
    assert 0 < secs < _WALL_SECONDS[single_run]
    assert gsm["runtime"]["tokens_per_second"] * secs == pytest.approx(sum(r["num_tokens"] for r in g))


def test_two_shards_give_the_same_results_as_one_process(single_run, tmp_path):
    out = tmp_path / "sharded"
    cfg = E.parse_config([*TINY[:-3], "--batch-size", "2", "--no-progress", "--out", str(out)])  # other batching too
    model, tok, ident = decode.load_eval_model("tiny")
    run = E.prepare(cfg, model, tok, ident)
    assert E.run_shard(run, model, tok, rank=1, world=2, progress=False) == 2 * 2 * 3  # problems 1, 3
    assert E.run_shard(run, model, tok, rank=0, world=2, progress=False) == 2 * 3 * 3  # problems 0, 2, 4
    assert sorted(p.name for p in out.glob("samples.rank*.jsonl")) == ["samples.rank0.jsonl", "samples.rank1.jsonl"]
    E.finalize(run, world=2)
    assert not list(out.glob("samples.rank*.jsonl"))
    assert _samples(out / "samples.jsonl") == _samples(single_run / "samples.jsonl")
    assert _deterministic_results(out / "results.json") == _deterministic_results(single_run / "results.json")


def test_resume_after_an_interruption_gives_identical_results(single_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(single_run, out)
    (out / "results.json").unlink()
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    keep = len(lines) // 2
    # half the records, then a write cut short in the middle of a line
    (out / "samples.jsonl").write_text("".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])
    cfg = E.parse_config([*TINY, "--out", str(out)])
    model, tok, ident = decode.load_eval_model("tiny")
    run = E.prepare(cfg, model, tok, ident)
    assert E.run_shard(run, model, tok, progress=False) == len(lines) - keep  # only the missing samples
    E.finalize(run)
    assert _samples(out / "samples.jsonl") == _samples(single_run / "samples.jsonl")
    assert _deterministic_results(out / "results.json") == _deterministic_results(single_run / "results.json")
    # the CLI on a finished folder decodes nothing and reports the same
    assert E.main([*TINY, "--out", str(out)]) == 0
    assert _deterministic_results(out / "results.json") == _deterministic_results(single_run / "results.json")


def test_resuming_with_other_settings_is_refused(single_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(single_run, out)
    with pytest.raises(SystemExit, match="temperature: 1.0 -> 0.5"):
        E.main([*TINY, "--temperature", "0.5", "--out", str(out)])
    assert E.main([*TINY, "--temperature", "0.5", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["settings"]["temperature"] == 0.5


def test_results_aggregate_the_per_sample_verdicts(tmp_path, monkeypatch):
    """With a stand-in verdict (depends on the response text), avg@k and pass@k in results.json
    equal values computed by hand from the per-sample records."""

    def fake_score(responses, gts, truncated, **kw):
        return [(None, sum(map(ord, r)) % 3 == 0) for r in responses]

    monkeypatch.setattr(decode, "score_responses", fake_score)
    out = tmp_path / "agg"
    E.main(["--model", "tiny", "--task", "embedded", "--limit", "6", "--samples", "4", "--max-new-tokens", "8",
            "--no-progress", "--out", str(out)])
    recs = _samples(out / "samples.jsonl")
    assert all(r["correct"] == (sum(map(ord, r["response"])) % 3 == 0) for r in recs)
    counts = [sum(r["correct"] for r in recs if r["problem"] == i) for i in range(6)]
    assert 0 < sum(counts) < 24  # a mix, or the check below says little
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["accuracy"] == pytest.approx(sum(counts) / 24)
    for k in (1, 2, 4):
        by_subsets = [sum(any(s) for s in itertools.combinations([1] * c + [0] * (4 - c), k))
                      / len(list(itertools.combinations(range(4), k))) for c in counts]
        assert run["pass@k"][str(k)] == pytest.approx(sum(by_subsets) / 6)
    d = Config().data  # --task embedded splits as dirl_min.train does by default
    held = tasks.split_problems(tasks.arithmetic_problems(d.task_max_operand, tuple(d.task_levels)),
                                d.held_out, d.split_seed)[1][:6]
    assert [r["question"] for r in recs if r["sample"] == 0] == [p.question for p in held]


def test_the_model_path_given_is_the_model_evaluated(tmp_path):
    model1, tok = build_tiny(seed=1)
    ckpt = save_model(model1, tok, tmp_path / "ckpt")
    save_model(model1, tok, tmp_path / "train_ckpt" / "model")  # dirl_min.train's layout
    common = ["--data-dir", str(BENCH_DIR), "--benchmarks", "gsm8k", "--limit", "2", "--samples", "2",
              "--max-new-tokens", "8", "--no-progress"]
    E.main([*common, "--model", str(ckpt), "--out", str(tmp_path / "a")])
    E.main([*common, "--model", "tiny", "--out", str(tmp_path / "b")])
    E.main([*common, "--model", str(tmp_path / "train_ckpt"), "--out", str(tmp_path / "c")])
    a, b, c = (_samples(tmp_path / x / "samples.jsonl") for x in "abc")
    assert [r["response"] for r in a] != [r["response"] for r in b]
    assert [r["response"] for r in a] == [r["response"] for r in c]
    settings = json.loads((tmp_path / "a" / "results.json").read_text())["settings"]
    assert settings["model"]["path"] == str(ckpt.resolve())
    with pytest.raises(SystemExit, match="other settings \\(model"):  # another model never resumes a folder
        E.main([*common, "--model", str(ckpt), "--out", str(tmp_path / "b")])
    # and the responses are those of the saved weights, decoded directly
    from dirl_min.decoding import generate
    from dirl_min.model import chat_prompt_ids
    from dirl_min.model import stop_token_ids

    model1.eval()
    for r in a:
        ids = chat_prompt_ids(tok, render_prompt(EB.DIRL_PROMPT, r["question"]))
        roll = generate(model1, [ids], seeds=[r["seed"]], max_new_tokens=8, temperature=1.0, top_k=50,
                        stop_token_ids=stop_token_ids(tok), tokenizer=tok)
        assert roll.text[0] == r["response"]


def test_threshold_sweep_writes_a_plot_of_accuracy_against_tokens_per_step(tmp_path):
    out = tmp_path / "sweep"
    E.main(["--model", "tiny", "--task", "embedded", "--limit", "3", "--samples", "2", "--max-new-tokens", "8",
            "--thresholds", "0.0,0.9", "--no-progress", "--out", str(out)])
    runs = json.loads((out / "results.json").read_text())["runs"]
    tps = {r["threshold"]: r["tokens_per_step"] for r in runs}
    assert set(tps) == {0.0, 0.9}
    assert tps[0.0] > 2 and tps[0.9] < tps[0.0]  # threshold 0 commits whole blocks
    # one line (matplotlib's first colour, C0) with its two markers; no second benchmark's line (C1)
    from PIL import Image

    img = Image.open(out / ER.PLOT_FILE).convert("RGB")
    assert img.size == (768, 576)  # 6.4 x 4.8 inches at 120 dpi
    colours = dict((c, n) for n, c in img.getcolors(maxcolors=1 << 20))
    assert colours.get((0x1F, 0x77, 0xB4), 0) > 50 and colours.get((0xFF, 0x7F, 0x0E), 0) == 0


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_a_malformed_data_file_is_reported_with_file_line_and_field(tmp_path):
    bad = tmp_path / "bench.jsonl"
    bad.write_text('{"question": "1+1?", "ground_truth_answer": "2"}\n\n{"question": "2+2?", "answer": "4"}\n')
    with pytest.raises(SystemExit) as e:
        E.main(["--benchmarks", str(bad), "--out", str(tmp_path / "o"), "--no-progress"])
    assert f"{bad}:3:" in str(e.value.code) and "ground_truth_answer" in str(e.value.code)
    bad.write_text('{"question": "1+1?", "ground_truth_answer": "2"}\n{"question": "2+2?",\n')
    with pytest.raises(SystemExit, match=re.escape(f"{bad}:2: invalid JSON")):
        E.main(["--benchmarks", str(bad), "--out", str(tmp_path / "o"), "--no-progress"])
    with pytest.raises(SystemExit, match="no such file"):
        E.main(["--benchmarks", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])


def test_a_corrupt_samples_file_is_reported_with_file_and_line(tmp_path):
    (tmp_path / "samples.jsonl").write_text('{"benchmark": "x", "threshold": 0.9, "problem": 0, "sample": 0}\nnot json\n')
    with pytest.raises(EvalError, match=re.escape(f"{tmp_path / 'samples.jsonl'}:2:")):
        ER.read_records(tmp_path / "samples.jsonl")


def test_lmdeploy_backend_without_lmdeploy_or_cuda_exits_with_a_clear_message(tmp_path):
    try:
        import lmdeploy  # noqa: F401
        has = torch.cuda.is_available()
    except ImportError:
        has = False
    if has:
        pytest.skip("lmdeploy and CUDA are present")
    with pytest.raises(SystemExit, match="--backend lmdeploy needs"):
        E.main(["--backend", "lmdeploy", "--model", str(tmp_path)])  # (--model: the settings ask for one first)


@pytest.mark.slow
def test_accelerate_launch_with_two_processes_matches_one_process(single_run, tmp_path, repo_root):
    """A real 2-process run (gloo on CPU). ``accelerate launch --cpu`` starts a single process
    unless mpirun is configured, so the torchrun-based launcher is used."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("accelerate CLI not found")
    out = tmp_path / "launched"
    env = tree_env(OMP_NUM_THREADS="1")
    assert_env_imports_tree(env, tmp_path)
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
           "-m", "dirl_min.eval", *TINY, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["runtime"]["processes"] == 2
    assert _samples(out / "samples.jsonl") == _samples(single_run / "samples.jsonl")
    assert _deterministic_results(out / "results.json") == _deterministic_results(single_run / "results.json")
