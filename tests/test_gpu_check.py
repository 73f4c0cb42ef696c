"""The GPU check's runner (dirl_min.speed.gpu_check): limits, records kept, the next stage runs.

The commands here are tiny Python programs standing in for the real stages; the real stages run
in CI's offline rehearsal (DRY_RUN=1 bash scripts/gpu_check.sh, see .ci/run).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from dirl_min.speed import gpu_check as G

PY = sys.executable


def _hung(pid_file) -> list:
    """A stage that starts a grandchild, records its pid, then hangs."""
    code = (f"import subprocess, time; p = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('hanging', flush=True); time.sleep(600)")
    return [PY, "-c", code]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child of an ended process is a zombie until reaped: not running
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_hung_stage_is_killed_at_its_limit_and_the_next_stages_run(tmp_path):
    out = tmp_path / "out"
    pid_file = tmp_path / "grandchild.pid"
    # the stage after the hung one reads the hung stage's record: it must exist before the next stage starts
    reader = [PY, "-c", f"import json; print(json.dumps({{'hung_status': json.load(open({str(out / 'hang.json')!r}))['status']}}))"]
    stages = [G.Stage("hang", _hung(pid_file), limit_s=3),
              G.Stage("after", reader, limit_s=60, result="stdout"),
              G.Stage("fails", [PY, "-c", "raise SystemExit(3)"], limit_s=60),
              G.Stage("absent", [PY, "-c", "pass"], limit_s=60, skip="not here")]
    records = G.run_all(stages, out, budget_s=300)

    hang = json.loads((out / "hang.json").read_text())
    assert hang["status"] == "timeout" and "limit of 3 s" in hang["reason"]
    assert 3 <= hang["seconds"] < 60  # stopped at its limit, not after its 600 s sleep
    assert "hanging" in (out / "hang.log").read_text()
    assert not _alive(int(pid_file.read_text()))  # the whole process group went, grandchild included
    after = json.loads((out / "after.json").read_text())
    assert after["status"] == "ok" and after["result"] == {"hung_status": "timeout"}
    fails = json.loads((out / "fails.json").read_text())
    assert fails["status"] == "failed" and fails["returncode"] == 3
    absent = json.loads((out / "absent.json").read_text())
    assert absent["status"] == "skipped" and absent["reason"] == "not here"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["hang", "after", "fails", "absent"]
    assert summary["stages"] == records
    lines = G.table(records).splitlines()
    assert [l.split()[:2] for l in lines[1:]] == [["hang", "timeout"], ["after", "ok"], ["fails", "failed"],
                                                   ["absent", "skipped"]]


def test_the_budget_cuts_each_limit_to_what_is_left(tmp_path):
    stages = [G.Stage("long", [PY, "-c", "import time; time.sleep(600)"], limit_s=500),
              G.Stage("late", [PY, "-c", "pass"], limit_s=60)]
    records = G.run_all(stages, tmp_path, budget_s=3)
    assert records[0]["status"] == "timeout" and records[0]["limit_s"] <= 3
    assert records[1]["status"] == "skipped" and "budget" in records[1]["reason"]


def test_a_failed_configuration_fails_its_stage(tmp_path):
    rows = tmp_path / "rows.json"
    write = [PY, "-c", f"import json; json.dump([{{'stage': 'sft', 'failed': 1}}], open({str(rows)!r}, 'w'))"]
    (rec,) = G.run_all([G.Stage("train", write, limit_s=60, result=str(rows))], tmp_path, budget_s=60)
    assert rec["status"] == "failed" and "1 configuration" in rec["reason"]


def test_the_plan_has_every_stage_and_fits_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "lmdeploy_missing", lambda: "")  # as where lmdeploy is installed
    names = ["train_flex_attention", "train_sdpa", "rollout_native", "save", "check", "pytest_gpu",
             "rollout_lmdeploy", "check_lmdeploy"]
    gpu = G.plan(tmp_path, dry_run=False)
    assert [s.name for s in gpu] == names and not any(s.skip for s in gpu)
    assert sum(s.limit_s for s in gpu) <= G.BUDGET_S <= 9 * 60
    assert all("--device" not in s.argv or s.argv[s.argv.index("--device") + 1] == "cuda" for s in gpu)
    dry = G.plan(tmp_path, dry_run=True)
    assert [s.name for s in dry] == names
    assert all(s.argv[s.argv.index("--device") + 1] == "cpu" for s in dry if "--device" in s.argv)
    assert all(s.argv[s.argv.index("--shape") + 1] == "toy" for s in dry if "--shape" in s.argv)


def test_lmdeploy_stages_say_why_they_are_skipped(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lmdeploy" else real(name, *a))
    stages = {s.name: s for s in G.plan(tmp_path, dry_run=False)}
    assert "lmdeploy is not installed" in stages["rollout_lmdeploy"].skip
    assert stages["check_lmdeploy"].skip == stages["rollout_lmdeploy"].skip
    assert not stages["check"].skip


def test_trailing_json_reads_the_last_printed_object():
    text = 'log line\n{"not": "this"}\nmore\n{\n  "max_abs_diff": 1e-06,\n  "tokens": 4\n}\n'
    assert G._trailing_json(text) == {"max_abs_diff": 1e-06, "tokens": 4}
    assert G._trailing_json("no json\n") is None


@pytest.mark.parametrize("argv", [["--out", "x"]])
def test_without_cuda_the_full_check_refuses(argv, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        G.main(argv)
    assert "DRY_RUN=1" in capsys.readouterr().err
