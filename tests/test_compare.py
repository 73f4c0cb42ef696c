"""python -m dirl_min.compare: the table's numbers are the runs' own files, reruns reuse and continue, other
settings are refused. ``--quick`` budgets: plumbing, no accuracy claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dirl_min.comparison import runner as cmp
from dirl_min.evaluation.stats import format_percent

OBJECTIVES = ["dipo", "tracerl"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mtimes(out: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in out.rglob("checkpoints/*/model/*.safetensors")}


def _check_run(out: Path, objective: str, result: dict) -> None:
    """The table's row and the run's points against the run's own metrics.jsonl and eval files."""
    run = out / objective / "seed-0"
    rl = [r for r in _jsonl(run / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2, 3, 4]  # --quick: rl.steps 4, logged every step
    points = result["runs"][objective][0]["points"]
    assert [(p["step"], p["checkpoint"]) for p in points] == [
        (1, "rl-000001"), (2, "rl-000002"), (3, "rl-000003"), (4, "rl-final")]
    assert all(r["score_copies"] > 0 for r in rl if r["kept_fraction"] > 0)
    for p in points:  # x: cumulative seconds of the time_* fields; y: that checkpoint's own evaluation
        assert p["seconds"] == pytest.approx(sum(r[f] for r in rl[: p["step"]] for f in cmp.TIME_FIELDS))
        samples = _jsonl(run / "eval" / p["checkpoint"] / "sampled" / "samples.jsonl")
        assert len(samples) == 8 * 2  # 8 problems x 2 samples
        assert p["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
        assert p["tokens_per_step"] == pytest.approx(sum(s["tokens_per_step"] for s in samples) / len(samples))
        greedy = _jsonl(run / "eval" / p["checkpoint"] / "greedy" / "samples.jsonl")
        assert p["greedy"] == pytest.approx(sum(s["correct"] for s in greedy) / len(greedy))
    row = result["table"][objective]  # one seed: the means are that run's numbers
    assert row["accuracy"] == points[-1]["accuracy"] and row["greedy"] == points[-1]["greedy"]
    assert row["train_seconds"] == pytest.approx(sum(r[f] for r in rl for f in cmp.TIME_FIELDS))
    assert row["scoring_seconds_per_step"] == pytest.approx(sum(r["time_scoring"] for r in rl) / 4)
    assert row["copies_per_step"] == pytest.approx(sum(r["score_copies"] for r in rl) / 4)
    assert [p["copies"] for p in points] == [sum(r["score_copies"] for r in rl[: p["step"]]) for p in points]


def test_quick_compare_table_rerun_and_refusal(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from dirl_min import compare, train

    out = tmp_path / "cmp"
    argv = ["--quick", "--out", str(out), "--objectives", ",".join(OBJECTIVES)]
    first = compare.main(argv)
    printed = capsys.readouterr().out
    assert any(r["time_scoring"] > 0 for r in _jsonl(out / "dipo" / "seed-0" / "metrics.jsonl") if r["stage"] == "rl")
    start = _jsonl(out / "sft" / "eval" / "sft-final" / "sampled" / "samples.jsonl")
    assert first["start"]["accuracy"] == pytest.approx(sum(s["correct"] for s in start) / len(start))
    for o in OBJECTIVES:
        _check_run(out, o, first)
        line = next(ln for ln in printed.splitlines() if ln.split()[:1] == [o])
        row = first["table"][o]
        assert format_percent(row["accuracy"]) in line.split() and f"{row['train_seconds']:.1f}" in line.split()
        assert f"| {o} | 1 | {format_percent(row['accuracy'])} |" in (out / "compare.md").read_text()
    assert json.loads((out / "compare.json").read_text())["table"] == first["table"]
    # the paired table is the final checkpoints' per-problem accuracies, minus the start and minus dipo
    finals = {o: first["runs"][o][0]["per_problem"] for o in OBJECTIVES}
    vs_start = first["paired"]["tracerl"]["vs_start"][0]["mean"]
    assert vs_start == pytest.approx(sum(finals["tracerl"]) / 8 - sum(first["start_per_problem"]) / 8)
    assert first["paired"]["tracerl"]["vs_dipo"][0]["mean"] == pytest.approx(
        sum(a - b for a, b in zip(finals["tracerl"], finals["dipo"])) / 8)
    assert "vs_dipo" not in first["paired"]["dipo"] and "Paired differences" in (out / "compare.md").read_text()
    with Image.open(out / "compare.png") as im:
        im.verify()
    with Image.open(out / "compare.png") as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1] * 0.9  # two panels side by side

    # A rerun: finished runs reused (no training, checkpoints untouched); a run cut short (no
    # summary yet) and an evaluation cut short continue, with the same numbers.
    before = _mtimes(out)
    (out / "tracerl" / "seed-0" / "summary.json").unlink()
    cut = out / "dipo" / "seed-0" / "eval" / "rl-000002" / "sampled"
    lines = (cut / "samples.jsonl").read_text().splitlines(keepends=True)
    (cut / "samples.jsonl").write_text("".join(lines[:5]))
    (cut / "results.json").unlink()
    calls, real = [], train.main
    monkeypatch.setattr(train, "main", lambda a: calls.append(list(a)) or real(a))
    second = compare.main(argv)
    assert [(c[c.index("--run.out") + 1], c[-2:]) for c in calls] == [
        (str(out / "tracerl" / "seed-0"), ["--run.resume", "true"])]
    assert second["actions"] == {"sft": "reuse", "dipo/seed-0": "reuse", "tracerl/seed-0": "resume"}
    assert _mtimes(out) == before  # the resumed run found its final checkpoint: nothing retrained
    assert second["table"] == first["table"] and second["runs"] == first["runs"]
    assert len(_jsonl(cut / "samples.jsonl")) == 16

    # Other settings: refused before any work, naming the setting and the runs.
    calls.clear()
    table = (out / "compare.md").read_text()
    with pytest.raises(SystemExit) as e:
        compare.main([*argv, "--rl.lr", "0.001"])
    assert "rl.lr: 0.0003 -> 0.001" in str(e.value) and str(out / "dipo" / "seed-0") in str(e.value)
    assert "--overwrite" in str(e.value) and calls == [] and _mtimes(out) == before
    assert (out / "compare.md").read_text() == table

    # Other evaluation settings leave the trained runs valid: the evaluations are refused, and
    # with --overwrite redone, without training anything.
    with pytest.raises(SystemExit, match="other settings.*top_k"):
        compare.main([*argv, "--eval.top_k", "5"])
    third = compare.main([*argv, "--eval.top_k", "5", "--overwrite"])
    assert calls == [] and _mtimes(out) == before and set(third["actions"].values()) == {"reuse"}
    redone = json.loads((cut / "results.json").read_text())["settings"]
    assert redone["top_k"] == 5 and len(_jsonl(cut / "samples.jsonl")) == 16


def _run(tmp_path, name, argv, parent=None):
    return cmp.Run(name, tmp_path / name, tuple(argv), parent, "dipo" if parent else None, 0 if parent else None)


def _saved(run, *, finished=True):
    """Write the files a finished (or, ``finished=False``, interrupted) ``run`` leaves."""
    run.folder.mkdir(parents=True)
    (run.folder / "config.json").write_text(json.dumps(run.config()))
    if finished:
        (run.folder / "summary.json").write_text("{}")


def test_plan_actions_reuse_resume_and_stale_children(tmp_path):
    sft = _run(tmp_path, "sft", ["--sft.steps", "5"])
    rl = _run(tmp_path, "rl", ["--rl.steps", "4"], parent="sft")
    assert cmp.plan_actions([sft, rl], overwrite=False) == {"sft": "train", "rl": "train"}
    _saved(sft)
    _saved(rl, finished=False)
    assert cmp.plan_actions([sft, rl], overwrite=False) == {"sft": "reuse", "rl": "resume"}
    # SFT saved with other settings: it is replaced, and the RL run on its old checkpoint is stale
    # although its own settings are equal.
    (sft.folder / "config.json").write_text(json.dumps(cmp.Run("sft", sft.folder, ("--sft.steps", "6")).config()))
    with pytest.raises(cmp.CompareError) as e:
        cmp.plan_actions([sft, rl], overwrite=False)
    assert "sft.steps: 6 -> 5" in str(e.value) and "starts from sft, which is trained again" in str(e.value)
    assert cmp.plan_actions([sft, rl], overwrite=True) == {"sft": "replace", "rl": "replace"}


def test_reserved_and_invalid_settings_are_refused():
    with pytest.raises(cmp.CompareError, match="run.seed, run.stages"):
        cmp.check_settings(["--run.stages", "[rl]", "--seed", "3"])
    with pytest.raises(cmp.CompareError, match="rl.group_size"):
        cmp.check_settings(["--rl.group_size", "0"])
    with pytest.raises(cmp.CompareError, match="rl.steps = 0"):
        cmp.check_settings(["--rl.steps", "0"])
    assert cmp.check_settings(["--rl.steps", "8"]).rl.steps == 8


def test_a_step_that_kept_no_group_scored_no_copies():
    """A step whose groups were all filtered out has no update and scores nothing: 0 copies (an older
    log lacks the field there); a trained step without the field makes the copies unknown."""
    from dirl_min.comparison.runner import curve
    from dirl_min.comparison.summary import step_copies

    assert step_copies({"step": 1, "score_copies": 12.0, "loss": 0.1}) == 12.0
    assert step_copies({"step": 2}) == 0.0
    assert step_copies({"step": 3, "loss": 0.1}) is None
    rows = [{"step": 1, "score_copies": 12.0, "loss": 0.1, "time_update": 1.0}, {"step": 2, "time_rollout": 2.0}]
    assert curve(rows, [1, 2]) == [{"step": 1, "seconds": 1.0, "copies": 12.0}, {"step": 2, "seconds": 3.0, "copies": 12.0}]


def test_release_recipe_gives_each_objective_its_records_settings_and_given_ones_override(tmp_path):
    from dirl_min.core.estimates import RECORDS

    cfg = cmp.check_settings(["--rl.steps", "8"])
    shared = cmp.plan_runs(tmp_path, ["--rl.steps", "8"], list(RECORDS), [0], cfg)
    release = cmp.plan_runs(tmp_path, ["--rl.steps", "8", "--rl.eps_high", "0.3"], list(RECORDS), [0], cfg, "release")
    base = shared[1].config()["rl"]
    for s, r in zip(shared[1:], release[1:]):
        assert s.config()["rl"] == {**base, "objective": s.objective}  # shared: one recipe for all
        got = r.config()["rl"]
        for key, value in RECORDS[r.objective].release.items():
            want = 0.3 if key == "rl.eps_high" else value  # the given setting wins
            assert got[key.split(".", 1)[1]] == want, (r.objective, key)
    assert release[1].config()["rl"]["beta"] == 0.1 and release[2].config()["rl"]["kl_reference"] == "old"
    assert release[3].config()["rl"]["num_iterations"] == 12 and release[4].config()["rl"]["scale_advantages"] is False
    with pytest.raises(cmp.CompareError, match="rl.num_iterations"):  # a given setting no release can run with
        cmp.plan_runs(tmp_path, ["--rl.num_iterations", "0"], ["dipo"], [0], cfg, "release")


def test_paired_differences_by_hand():
    """Two objectives, two seeds, three problems: the per-seed means are worked by hand, a constant
    difference has a point interval, and "all" resamples seeds and problems."""
    from dirl_min.comparison.summary import paired, paired_rows

    start = [0.0, 0.5, 1.0]
    runs = {"dipo": [{"seed": 0, "per_problem": [0.5, 0.5, 1.0]}, {"seed": 1, "per_problem": [0.0, 1.0, 1.0]}],
            "other": [{"seed": 0, "per_problem": [0.25, 0.75, 1.25]}, {"seed": 1, "per_problem": [0.0, 1.0, 1.0]}]}
    t = paired(start, runs)
    assert t["dipo"]["vs_start"][0]["mean"] == pytest.approx(0.5 / 3)
    assert t["dipo"]["vs_start"][1]["mean"] == pytest.approx(0.5 / 3)
    assert t["other"]["vs_dipo"][0]["mean"] == pytest.approx(0.25 / 3)
    assert t["other"]["vs_dipo"][1] == {"mean": 0.0, "ci": [0.0, 0.0]}  # the same answers: no difference
    assert t["other"]["vs_start"][0] == {"mean": pytest.approx(0.25), "ci": [pytest.approx(0.25)] * 2}
    assert t["other"]["vs_dipo"]["all"]["mean"] == pytest.approx(0.25 / 6)
    lo, hi = t["other"]["vs_dipo"]["all"]["ci"]
    assert -0.25 <= lo <= 0.25 / 6 <= hi <= 0.25  # within the per-problem differences' extremes
    head, rows = paired_rows(t)
    assert head == ["objective", "against", "seed 0", "seed 1", "all seeds"]
    assert [r[:2] for r in rows] == [["dipo", "start"], ["other", "start"], ["other", "dipo"]]
    assert rows[2][3] == "+0.0 [+0.0, +0.0]" and rows[1][2] == "+25.0 [+25.0, +25.0]"
