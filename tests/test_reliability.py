"""Issue 21: real data files, runs that cannot collide, interrupts that save, leftovers cleaned,
checks that set the exit status, interval means in the log."""

from __future__ import annotations

import json

import pytest

from dirl_min.data.records import load_problems, load_records

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
    from dirl_min.evaluation.benchmarks import jsonl_text

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
    from dirl_min.speed.measures import bench_model, bench_prompts, rescore_agreement
    from dirl_min.speed.rows import RESCORE_TOLERANCE
    from dirl_min.engine.decode import generate

    model, tok = bench_model("tiny", sharpen=25.0, block_size=4, seed=0)
    ro = generate(model, bench_prompts(tok, 4), max_new_tokens=32, temperature=1.0, top_k=50, threshold=0.9,
                  seeds=list(range(4)))
    agree = rescore_agreement(model, ro)
    print(agree)
    assert agree["max_abs_diff"] <= RESCORE_TOLERANCE


# ---- 2: data files identified by content ----

def _data(path, answer: str):
    path.write_text(json.dumps({"question": "What is 1 + 1?", "ground_truth_answer": answer}) + "\n")
    return path


def test_resume_checks_data_files_by_content_not_path(tmp_path, monkeypatch, capsys):
    """The reported fault: the same relative path in another working folder, now another file, was
    accepted; the same file by its absolute path was refused."""
    from dirl_min.settings import runs
    from dirl_min.settings.config import SettingsError, parse_config

    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "run"
    first.mkdir(), second.mkdir()
    _data(first / "rl.jsonl", "2"), _data(second / "rl.jsonl", "3")
    monkeypatch.chdir(first)
    runs.start_fresh(out, parse_config(["--rl-data", "rl.jsonl", "--out", str(out)]))
    record = json.loads((out / "config.json").read_text())
    assert record["data_sha256"]["data.rl_data"] == runs.file_sha256(first / "rl.jsonl")
    runs.check_out(parse_config(["--rl-data", str(first / "rl.jsonl"), "--out", str(out), "--resume"]))  # same file
    monkeypatch.chdir(second)
    with pytest.raises(SettingsError, match=r"data.rl_data: 'rl.jsonl' -> 'rl.jsonl', not the same content \(sha256"):
        runs.check_out(parse_config(["--rl-data", "rl.jsonl", "--out", str(out), "--resume"]))
    assert capsys.readouterr().err == ""


def test_a_run_saved_without_data_hashes_is_checked_by_path_and_says_so(tmp_path, capsys):
    """Runs saved before the hashes were recorded: their data cannot be checked by content; the path is."""
    from dirl_min.settings import runs
    from dirl_min.settings.config import SettingsError, parse_config

    data, out = _data(tmp_path / "rl.jsonl", "2"), tmp_path / "run"
    cfg = parse_config(["--rl-data", str(data), "--out", str(out), "--resume"])
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    runs.check_out(cfg)
    assert "records no hash of its data files" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="data.rl_data"):
        runs.check_out(parse_config(["--rl-data", str(_data(tmp_path / "other.jsonl", "2")), "--out", str(out),
                                     "--resume"]))


# ---- 3: one job per output folder ----

HOLD = """
import sys, time
from dirl_min.infra.atomic import folder_lock
with folder_lock(sys.argv[1], "holder"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(out):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_resubmitted_training_job_is_refused_while_the_first_runs(tmp_path):
    """The reported fault: a second --resume while the first run was going was accepted, and both wrote
    metrics.jsonl. Two real jobs: the second is refused naming the first's pid and host, and writes
    nothing; the first, killed with -9 (no clean-up), leaves its lock file, which blocks nobody."""
    import os
    import socket
    import subprocess
    import sys

    from dirl_min import train
    from dirl_min.infra.atomic import LOCK_FILE, folder_lock

    out = tmp_path / "run"
    args = _small(out, "--sft.steps", "300", "--run.log_every", "1")
    first = subprocess.Popen([sys.executable, "-m", "dirl_min.train", *args], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "DIRL_PROGRESS": "lines"})
    try:
        for line in first.stderr:
            if line.startswith("sft step 1/"):
                break
        with pytest.raises(SystemExit, match=f"dirl_min.train: error: {out} is in use by another job: "
                                             f"pid {first.pid} on host {socket.gethostname()}"):
            train.main([*args, "--resume"])
        assert first.poll() is None  # still training, alone
    finally:
        first.kill()
        first.wait()
    assert (out / LOCK_FILE).read_text().startswith(f"pid {first.pid} ")  # left behind by the dead job
    with folder_lock(out, "after"):
        assert (out / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")


def test_eval_refuses_a_folder_in_use(tmp_path):
    import signal
    import socket

    from dirl_min import eval as eval_face
    from dirl_min.infra.atomic import LOCK_FILE
    from dirl_min.model import build_tiny, save_model

    save_model(*build_tiny(seed=0), tmp_path / "tiny")
    out = tmp_path / "eval"
    holder = _holder(out)
    try:
        with pytest.raises(SystemExit, match=f"dirl_min.eval: error: {out} is in use by another job: "
                                             f"pid {holder.pid} on host {socket.gethostname()}"):
            eval_face.main(["--model", str(tmp_path / "tiny"), "--task", "embedded", "--out", str(out)])
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# ---- 4: interrupts ----

def _small(out, *extra):
    return ["--out", str(out), "--eval.max_problems", "2", "--eval.samples", "2", "--eval.greedy", "false",
            "--sft.steps", "4", "--sft.batch_size", "8", "--sft.warmup_steps", "1", "--rl.steps", "4",
            "--rl.prompts_per_step", "4", "--rl.group_size", "4", "--rl.max_new_tokens", "8",
            "--eval.max_new_tokens", "8", "--run.log_every", "2", *extra]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupt_finishes_the_step_saves_a_checkpoint_and_says_how_to_resume(tmp_path, sig):
    """Ctrl-C or a scheduler's SIGTERM in the middle of SFT (run.save_every 0, the default): the step ends,
    its checkpoint is written, the exit status is 128 + the signal, and the message gives the command."""
    import os
    import signal
    import subprocess
    import sys

    import torch

    out = tmp_path / "run"
    args = _small(out, "--sft.steps", "2000", "--run.log_every", "1")
    proc = subprocess.Popen([sys.executable, "-m", "dirl_min.train", *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DIRL_PROGRESS": "lines"})
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("sft step 3/"):
            break
    proc.send_signal(getattr(signal, sig))
    err = "".join(seen) + proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + getattr(signal, sig), err[-3000:]
    (ck,) = (out / "checkpoints").iterdir()
    state = torch.load(ck / "trainer_state.pt", weights_only=True)
    assert state["stage"] == "sft" and 3 <= state["step"] < 2000 and ck.name == f"sft-{state['step']:06d}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == state["step"]  # the step that was running finished, and nothing after it
    assert f"{sig}: stopped; saved {ck}. Continue with the same settings and --resume:" in err
    assert err.rstrip().endswith(f"python -m dirl_min.train {' '.join(args)} --resume")
    assert "Traceback" not in err


def _children(pid: int) -> list[int]:
    from pathlib import Path

    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_two_processes_stop_after_the_same_step_when_only_one_is_signalled(tmp_path, repo_root):
    """`accelerate launch`, 2 CPU processes; SIGTERM reaches process 1 only. Process 0 learns of it through
    the per-step all-reduce: both stop after the same step (no hang: their collectives stayed matched),
    process 0 writes the checkpoint and the log ends at its step."""
    import os
    import signal
    import subprocess
    import sys

    import torch

    out = tmp_path / "run"
    args = _small(out, "--sft.steps", "300", "--run.log_every", "1", "--run.stages", "[sft]")
    config = repo_root / "configs" / "accelerate" / "cpu-2proc.yaml"
    launcher = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                                 "-m", "dirl_min.train", *args], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "DIRL_PROGRESS": "lines"})
    seen = []
    for line in launcher.stderr:
        seen.append(line)
        if line.startswith("sft step 2/"):
            break
    workers = _children(launcher.pid)
    env = {w: dict(e.split("=", 1) for e in open(f"/proc/{w}/environ").read().split("\0") if "=" in e) for w in workers}
    rank1 = [w for w in workers if env[w].get("RANK") == "1"]
    assert len(workers) == 2 and len(rank1) == 1, workers
    os.kill(rank1[0], signal.SIGTERM)
    err = "".join(seen) + launcher.communicate(timeout=300)[1]
    assert launcher.returncode != 0
    (ck,) = (out / "checkpoints").iterdir()
    state = torch.load(ck / "trainer_state.pt", weights_only=True)
    assert state["stage"] == "sft" and 2 <= state["step"] < 300 and ck.name == f"sft-{state['step']:06d}", err[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == state["step"]
    assert f"SIGTERM: stopped; saved {ck}. Continue with the same settings and --resume:" in err


class _Accel:
    def __init__(self, world, others=0.0):
        self.num_processes, self.device, self.others = world, "cpu", others

    def reduce(self, t, op):
        assert op == "sum"
        return t + self.others  # the other processes' flags


def test_a_second_interrupt_stops_at_once_and_the_handlers_are_restored_after_the_run():
    import os
    import signal
    import time

    from dirl_min.loops.state import Interrupts

    before = signal.getsignal(signal.SIGINT)
    with Interrupts(_Accel(1)) as stop:
        assert stop() is False
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop() is True and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_stop_is_decided_on_all_processes_together():
    """A signal that reached only another process stops this one after the same step (collectives stay matched)."""
    from dirl_min.loops.state import Interrupts

    stop = Interrupts(_Accel(2, others=1.0))
    assert stop.signum is None and stop() is True and stop.stopping
    assert Interrupts(_Accel(2, others=0.0))() is False


def test_a_second_ctrl_c_ends_with_one_line_not_a_traceback(monkeypatch, capsys):
    from dirl_min import train

    def interrupted(argv=None):
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(train, "main", interrupted)
    with pytest.raises(SystemExit) as e:
        train.cli([])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == ("SIGINT: stopped at once, without a checkpoint; --resume continues "
                                               "from the last one")


# ---- 5, 9: leftovers, resumed logs and timings, interval means, TensorBoard, curves ----

TIMING_COLUMNS = ("tokens_per_s", "time_rollout", "time_rewards", "time_scoring", "time_update")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run with a checkpoint after every step, logged every 2 steps."""
    from dirl_min import train

    out = tmp_path_factory.mktemp("rel") / "run"
    return out, train.main(_small(out, "--run.save_every", "1"))


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _untimed_rows(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in _rows(out)]


def _tb_points(out) -> list[tuple[str, int]]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [(v.tag, ev.step) for f in sorted((out / "tensorboard").rglob("events.out.tfevents.*"))
            for ev in EventFileLoader(str(f)).Load() for v in ev.summary.value]


def test_resume_removes_stale_temporaries_and_keeps_each_log_point_once(finished, tmp_path, capsys):
    """Killed at RL step 3: a half-written checkpoint and log temporary are left. The resumed run removes
    them, logs the same rows as the straight run (the interval mean of steps 3-4 included), has each
    TensorBoard point once, and its seconds count the earlier process too."""
    import shutil

    import torch

    from dirl_min import train

    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    shutil.rmtree(out / "checkpoints" / "rl-final")
    (out / "summary.json").unlink()
    stale = [out / "checkpoints" / ".rl-000004.tmp-k1ll3d9", out / ".metrics.jsonl.tmp-4ab9x", out / "checkpoints" / ".rl-000001.old-1a2b3c4d"]
    (stale[0] / "model").mkdir(parents=True)
    (stale[0] / "model" / "model.safetensors").write_bytes(b"\0" * 1000)
    stale[1].write_text("{}\n")
    stale[2].mkdir()
    saved = torch.load(out / "checkpoints" / "rl-000003" / "trainer_state.pt", weights_only=True)["summary"]
    capsys.readouterr()
    summary = train.main(_small(out, "--run.save_every", "1", "--resume"))
    err = capsys.readouterr().err
    assert not any(p.exists() for p in stale) and all(f"removed {p}" in err for p in stale)
    assert _untimed_rows(out) == _untimed_rows(finished[0])
    points = _tb_points(out)
    assert len(points) == len(set(points)) and sorted(points) == sorted(_tb_points(finished[0]))
    assert saved["wall_seconds"] > saved["sft_seconds"] > 0 and saved["rl_seconds"] > 0  # what each checkpoint records
    assert summary["sft_seconds"] == saved["sft_seconds"] and summary["rl_seconds"] > saved["rl_seconds"]
    assert summary["wall_seconds"] > saved["wall_seconds"] and summary["wall_seconds"] > summary["sft_seconds"] + summary["rl_seconds"]


def test_logged_rows_are_interval_means_and_leave_training_unchanged(finished, tmp_path):
    """Logging every 2 steps writes the mean of the 2 steps' values (TRL, verl), not the 2nd step alone;
    the schedule's lr is the last step's. The weights are the same bit for bit whatever run.log_every."""
    from dirl_min import train
    from dirl_min.model import load_model

    out = tmp_path / "every1"
    train.main(_small(out, "--run.log_every", "1"))
    every1 = {(r["stage"], r["step"]): r for r in _rows(out)}
    for row in _rows(finished[0]):
        a, b = every1[(row["stage"], row["step"] - 1)], every1[(row["stage"], row["step"])]
        for key, value in row.items():
            if key in ("stage", "step", *TIMING_COLUMNS):
                continue
            want = b[key] if key == "lr" else (a[key] + b[key]) / 2
            assert value == pytest.approx(want, rel=1e-12, abs=1e-15), (row["stage"], row["step"], key)
    for ck in ("sft-final", "rl-final"):
        x = load_model(out / "checkpoints" / ck / "model")[0].state_dict()
        y = load_model(finished[0] / "checkpoints" / ck / "model")[0].state_dict()
        assert all(x[k].equal(y[k]) for k in x)


def test_each_stage_evaluation_reaches_tensorboard(finished):
    points = _tb_points(finished[0])
    assert {("eval/accuracy", 0), ("eval/accuracy", 1), ("eval/accuracy", 2)} <= set(points)
    assert ("sft/loss", 2) in points and ("rl/reward", 4) in points


def test_curves_are_a_readable_grid(finished):
    """Five panels in a 2420 × 418 strip overlapped their labels; now a grid, no panel overlapping another."""
    from PIL import Image

    width, height = Image.open(finished[0] / "curves.png").size
    assert 1.2 <= width / height <= 2.0 and height >= 700


def test_keep_checkpoints_keeps_the_newest_step_checkpoints_in_run_order(tmp_path):
    """run.keep_checkpoints 3 after sft-000001..3, sft-final, rl-000001..2 (+ one being written): the newest
    3 step checkpoints stay in run order (rl after sft, whatever the names sort as), and every -final."""
    from types import SimpleNamespace

    from dirl_min.settings.config import parse_config
    from dirl_min.loops.state import Checkpoints

    names = ["sft-000001", "sft-000002", "sft-000003", "sft-000010", "sft-final", "rl-000001", "rl-000002",
             ".rl-000003.tmp-x1y2"]
    for n in names:
        (tmp_path / "checkpoints" / n).mkdir(parents=True)
    cfg = parse_config(["--run.keep_checkpoints", "3", "--sft.steps", "20"])
    ck = Checkpoints(tmp_path, cfg, SimpleNamespace(is_main_process=True), None, None, {})
    ck._prune()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(
        [".rl-000003.tmp-x1y2", "rl-000001", "rl-000002", "sft-000010", "sft-final"])
