"""Issue 21: real data files, runs that cannot collide, interrupts that save, leftovers cleaned,
checks that set the exit status, interval means in the log."""

from __future__ import annotations

import json

from dirl_min.data.records import load_problems, load_records
from dirl_min.evaluation.benchmarks import jsonl_text

# characters str.splitlines breaks at that JSON allows raw inside a string (GSM8K's train file has U+2028)
LINE_BREAKS_INSIDE_STRINGS = "\u2028\u2029\x85\x1c\x1d\x1e\x0b\x0c"


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    path = tmp_path / "rl.jsonl"
    questions = [f"What is 1 + {i}?{c}Answer in a box." for i, c in enumerate(LINE_BREAKS_INSIDE_STRINGS)]
    records = [{"question": q, "ground_truth_answer": str(1 + i)} for i, q in enumerate(questions)]
    path.write_bytes(("\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n").encode())
    assert [p.question for p in load_problems(path)] == questions
    assert [r["_where"] for r in load_records(path)] == [f"{path}:{i}" for i in range(1, len(records) + 1)]


def test_the_hub_cache_reads_back_what_it_writes(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    records = [{"question": "Janet\u2028sells eggs.\u2029How many?", "ground_truth_answer": "18"},
               {"question": "Ünïcode ✓", "ground_truth_answer": "1"}]
    path.write_text(jsonl_text(records), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, as the cache writes it
    assert [(p.question, p.answer) for p in load_problems(path)] == [(r["question"], r["ground_truth_answer"]) for r in records]


def _bench_result(correct: bool) -> dict:
    config = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=256, vocab_size=100, block_size=4)
    row = {"row": 6, "name": "packed vs per-round rescore", "a": "1 ms", "b": "2 ms", "ratio": "2.00×",
           "check": "…", "correct": correct}
    return {"size": "tiny", "params": 1, "config": config, "prompt_tokens": 8, "rows": [row]}


def test_a_failed_benchmark_check_sets_the_exit_status(monkeypatch, capsys):
    """bench --quick printed "max|Δ| 1.7e-05 ≤ 1e-5: NOT MET" and exited 0."""
    from dirl_min import bench

    for correct, status in ((True, 0), (False, 1)):
        monkeypatch.setattr(bench, "bench_size", lambda size, args, c=correct: _bench_result(c))
        assert bench.cli(["--sizes", "tiny", "--quick"]) == status
    assert "correctness checks: NOT MET: tiny row 6: packed vs per-round rescore" in capsys.readouterr().out


def test_packed_rescoring_agrees_within_the_float32_tolerance_at_the_quick_size():
    """The tolerance is float32's: at bench --quick's size the two layouts differ by ~1e-5, under it."""
    from dirl_min.benchmarking.measures import bench_model, bench_prompts, rescore_agreement
    from dirl_min.benchmarking.rows import RESCORE_TOLERANCE
    from dirl_min.engine.decode import generate

    model, tok = bench_model("tiny", sharpen=25.0, block_size=4, seed=0)
    ro = generate(model, bench_prompts(tok, 4), max_new_tokens=32, temperature=1.0, top_k=50, threshold=0.9,
                  seeds=list(range(4)))
    agree = rescore_agreement(model, ro)
    print(agree)
    assert agree["max_abs_diff"] <= RESCORE_TOLERANCE
