"""One run per output folder: no fresh run over another, resume only with the saved settings,
truncated checkpoints skipped by name, and progress lines when output goes to a file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dirl_min import train
from dirl_min.settings import runs
from dirl_min.loops import state as loops_state
from dirl_min.settings.config import Config, SettingsError, parse_config
from dirl_min.infra.progress import progress_line, progress_mode

TIMINGS = {"seconds", "sft_seconds", "rl_seconds", "wall_seconds"}


def _args(out, *extra):
    return ["--out", str(out), "--eval.max_problems", "2", "--eval.samples", "2", "--eval.greedy", "false",
            "--sft.steps", "4", "--sft.batch_size", "8", "--sft.warmup_steps", "1", "--rl.steps", "4",
            "--rl.prompts_per_step", "4", "--rl.group_size", "4", "--rl.max_new_tokens", "8",
            "--eval.max_new_tokens", "8", "--run.log_every", "2", *extra]


def _untimed(summary: dict) -> dict:
    """The summary without wall-clock numbers (the only part a rerun may change)."""
    return {k: (_untimed(v) if isinstance(v, dict) else v) for k, v in summary.items() if k not in TIMINGS}


def _weights(ck):
    from dirl_min.model import load_model

    return load_model(ck / "model")[0].state_dict()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished seed-0 run (checkpoints every 2 steps) and what it printed on stderr (not a terminal)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("runs") / "seed0"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
        mp.delenv("DIRL_PROGRESS", raising=False)
        summary = train.main(_args(out, "--run.save_every", "2", "--resume"))  # --resume on a missing folder
    return out, summary, err.getvalue()


def test_resume_on_a_missing_folder_says_it_starts_fresh(finished):
    out, summary, err = finished
    assert f"run.resume: {out} holds no complete checkpoint; starting fresh" in err
    assert summary["seed"] == 0 and {"base", "sft", "rl"} <= summary.keys()


def test_progress_lines_when_stderr_is_not_a_terminal(finished):
    lines = [line for line in finished[2].splitlines() if " step " in line]
    assert [line.split(" | ")[0] for line in lines] == [
        "sft step 2/4 (50%)", "sft step 4/4 (100%)", "rl step 2/4 (50%)", "rl step 4/4 (100%)"]
    assert all("| elapsed " in line and "| remaining ~" in line for line in lines)
    assert "| loss " in lines[0] and "| reward " in lines[2] and "| accuracy " in lines[2]


def test_progress_line_estimates_the_remaining_time_from_the_pace_since_the_start():
    line = progress_line("rl", 30, 100, {"reward": 0.5, "accuracy": 0.25, "loss": 1.0}, elapsed=20.0, start=10)
    assert line == ("rl step 30/100 (30%) | loss 1.000 | reward 0.500 | accuracy 0.250 | elapsed 0:00:20 "
                    "| remaining ~0:01:10")


def test_progress_mode_bar_on_a_terminal_lines_otherwise_unless_dirl_progress_says():
    assert [progress_mode(True, None), progress_mode(False, None), progress_mode(False, "")] == ["bar", "lines", "lines"]
    assert [progress_mode(False, "1"), progress_mode(True, "lines"), progress_mode(True, "0")] == ["bar", "lines", "off"]
    with pytest.raises(SettingsError, match="DIRL_PROGRESS = 'yes': expected 1"):
        progress_mode(False, "yes")


def test_a_fresh_run_into_a_finished_folder_is_refused_and_overwrite_replaces_it(finished, tmp_path):
    """The reported fault: seed 5 into a finished seed-0 folder, killed, resumed, printed seed 0's results."""
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    before = (out / "summary.json").read_text()
    with pytest.raises(SystemExit, match="holds another run .*use --resume to continue it, --overwrite to replace it"):
        train.main(_args(out, "--seed", "5"))
    assert (out / "summary.json").read_text() == before

    real_save = loops_state.save_checkpoint

    def killed_after_sft(path, *a, **k):
        real_save(path, *a, **k)
        if path.name == "sft-final":
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loops_state, "save_checkpoint", killed_after_sft)
        with pytest.raises(KeyboardInterrupt):
            train.main(_args(out, "--seed", "5", "--overwrite", "--run.save_every", "2"))
    assert not (out / "summary.json").exists() and not (out / "checkpoints" / "rl-final").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["sft-000002", "sft-final"]  # seed 0's are gone
    summary = train.main(_args(out, "--seed", "5", "--resume"))
    assert summary["seed"] == 5 and json.loads((out / "config.json").read_text())["run"]["seed"] == 5
    straight = train.main(_args(tmp_path / "straight5", "--seed", "5"))
    assert _untimed(summary) == _untimed(straight)


@pytest.mark.parametrize("extra,diff", [
    (["--rl.lr", "0.001"], "rl.lr: 0.0003 -> 0.001"),
    (["--seed", "1"], "run.seed: 0 -> 1"),
    (["--rl.steps", "8"], "rl.steps: 4 -> 8"),
    (["--rl-data", "{data}"], "data.rl_data: '' -> '{data}'"),
])
def test_resume_with_other_settings_is_refused_and_says_which(finished, tmp_path, extra, diff):
    data = tmp_path / "rl.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 1?", "ground_truth_answer": "2"}) + "\n")
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    before = (out / "config.json").read_text()
    extra = [a.replace("{data}", str(data)) for a in extra]
    with pytest.raises(SystemExit) as err:
        train.main(_args(out, "--resume", *extra))
    assert diff.replace("{data}", str(data)) in str(err.value.code)
    assert "was saved with other settings" in str(err.value.code)
    assert (out / "config.json").read_text() == before  # not rewritten with the new values


def test_settings_that_change_no_result_may_differ_on_resume():
    saved = Config().to_dict()
    given = parse_config(["--run.threads", "3", "--run.save_every", "7", "--eval.batch_size", "5", "--resume"]).to_dict()
    assert runs.config_differences(saved, given) == []
    given["sft"]["betas"] = [0.9, 0.99]
    assert runs.config_differences(saved, given) == ["sft.betas: [0.9, 0.98] -> [0.9, 0.99]"]


def test_the_checkpoints_own_settings_are_checked_too(finished, tmp_path):
    """Without config.json (lost or from elsewhere) a checkpoint still refuses another run's settings."""
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    (out / "config.json").unlink()
    with pytest.raises(SettingsError, match="rl-final was saved with other settings .*\n  run.seed: 0 -> 1"):
        runs.load_latest(out, parse_config(_args(out, "--seed", "1")).to_dict(), _weights)


def test_a_truncated_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(finished, tmp_path, capsys):
    """rl-final's weights and rl-000002's trainer state are cut short: resume names both files, continues
    from sft-final, and ends with the straight run's weights (bit for bit) and summary (timings aside)."""
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    for f in (out / "checkpoints" / "rl-final" / "model" / "model.safetensors",
              out / "checkpoints" / "rl-000002" / "trainer_state.pt"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    summary = train.main(_args(out, "--run.save_every", "2", "--resume"))
    err = capsys.readouterr().err
    assert "skipping checkpoint rl-final" in err and "rl-final/model/model.safetensors" in err
    assert "skipping checkpoint rl-000002" in err and "rl-000002/trainer_state.pt" in err
    assert "resumed from" in err and "sft-final (sft-done step 4)" in err
    a, b = _weights(finished[0] / "checkpoints" / "rl-final"), _weights(out / "checkpoints" / "rl-final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _untimed(summary) == _untimed(finished[1])
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == [("sft", 2), ("sft", 4), ("rl", 2), ("rl", 4)]
