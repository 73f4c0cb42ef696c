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
