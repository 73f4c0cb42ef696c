"""One training step = one optimizer step on every backend; processes make the same collective calls.

DeepSpeed is not installed here (and needs CUDA): Accelerate's own DeepSpeed code paths
(``Accelerator.backward`` → the real ``DeepSpeedEngineWrapper``, the no-op optimizer wrapper,
the engine's gradient norm) run with :class:`StandInDeepSpeedEngine`, a stand-in written
from our reading of DeepSpeed's accumulation rules that records every update it makes. It
is NOT DeepSpeed and has not been checked against DeepSpeed itself: these tests show that
dirl_min drives Accelerate's DeepSpeed path correctly *if* DeepSpeed behaves as the
stand-in does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils.deepspeed import DeepSpeedEngineWrapper, DeepSpeedOptimizerWrapper

from dirl_min import train
from dirl_min.settings import checks as settings
from dirl_min.loops import rl as loops_dipo
from dirl_min.loops.state import Job
from dirl_min.settings.config import SettingsError, parse_config
from tests.fixtures.tree import assert_env_imports_tree, tree_env

_spec = importlib.util.spec_from_file_location("toy_reward_run", Path(__file__).with_name("toy_reward_run.py"))
toy_reward_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_reward_run)


class StandInDeepSpeedEngine(torch.nn.Module):
    """A stand-in for DeepSpeedEngine (not DeepSpeed; unverified against it), after its accumulation rules: ``backward`` divides the loss by the configured
    accumulation count; ``step`` updates only at an accumulation boundary (the one set
    explicitly, else every ``gas``-th micro step), then zeroes the gradients. Each update's
    gradient is recorded."""

    def __init__(self, module, optimizer, gas: int):
        super().__init__()
        self.module, self.optimizer, self.gas = module, optimizer, gas
        self.boundary, self.micro_steps, self.updates = None, 0, []

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.boundary = is_boundary

    def backward(self, loss):
        (loss / self.gas if self.gas > 1 else loss).backward()

    def step(self):
        at_boundary = self.boundary if self.boundary is not None else (self.micro_steps + 1) % self.gas == 0
        if at_boundary:
            self.updates.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                 for p in self.module.parameters()])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_global_grad_norm(self):
        return torch.cat([g.flatten() for g in self.updates[-1]]).norm() if self.updates else torch.tensor(0.0)


class DeepSpeedPath(Accelerator):
    """A one-process CPU Accelerator on Accelerate's DeepSpeed code paths once ``prepare`` ran."""

    def __init__(self, gas: int):
        super().__init__(cpu=True)
        self.gas, self.engine = gas, None

    @property
    def distributed_type(self):
        return DistributedType.DEEPSPEED if getattr(self, "engine", None) is not None else super().distributed_type

    def prepare(self, model, optimizer):
        self.engine = StandInDeepSpeedEngine(model, optimizer, self.gas)
        self.deepspeed_engine_wrapped = DeepSpeedEngineWrapper(self.engine)
        self.gradient_accumulation_steps = self.gas  # Accelerate adopts the DeepSpeed config's count
        return self.engine, DeepSpeedOptimizerWrapper(optimizer)


_SMALL = ["--sft.steps", "2", "--sft.batch_size", "8", "--sft.warmup_steps", "1", "--rl.steps", "2",
          "--rl.prompts_per_step", "2", "--rl.group_size", "4", "--rl.sampling_rounds", "3",
          "--rl.max_new_tokens", "8"]


def _deepspeed_updates(tmp_path, stage, gas, *args):
    """The updates the DeepSpeed stand-in engine makes while dirl_min runs ``stage`` (sft or rl)."""
    cfg = parse_config([*_SMALL, "--out", str(tmp_path), *args])
    train._seed_everything(cfg.run.seed)
    model, tok, sft, rl, _ = train.build(cfg)
    accel = DeepSpeedPath(gas)
    try:
        run = train.run_sft if stage == "sft" else train.run_rl
        list(run(Job(cfg, accel, train.MetricsLog(tmp_path, False)), model, tok, sft if stage == "sft" else rl, {}))
    finally:
        accel.gradient_accumulation_steps = 1  # Accelerate's gradient state is shared by every Accelerator
    return accel.engine.updates


def _assert_same_updates(a, b):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        for x, y in zip(step_a, step_b):
            assert torch.allclose(x, y, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("gas", [1, 3])
def test_deepspeed_standin_makes_one_update_per_sft_step_from_all_micro_batches(tmp_path, gas):
    """sft.grad_accum 4 on Accelerate's DeepSpeed path with the stand-in engine (whatever its own accumulation count): one update per
    step, with the gradient of the whole batch taken as one micro-batch."""
    whole = _deepspeed_updates(tmp_path / "whole", "sft", 1, "--sft.grad_accum", "1")
    accumulated = _deepspeed_updates(tmp_path / "acc", "sft", gas, "--sft.grad_accum", "4")
    assert len(whole) == len(accumulated) == 2
    _assert_same_updates(whole, accumulated)


def test_deepspeed_standin_makes_one_update_per_dipo_step_from_all_micro_batches(tmp_path, monkeypatch):
    """DiPO micro-batches of 2 responses on Accelerate's DeepSpeed path (stand-in engine): one update per step, and the same
    gradient as all kept responses of a rollout in one micro-batch (later micro-batches must
    not be scored on weights that already moved)."""
    monkeypatch.setattr(loops_dipo, "rollout_and_reward", toy_reward_run.toy_correct(loops_dipo.rollout_and_reward))
    whole = _deepspeed_updates(tmp_path / "whole", "rl", 1, "--rl.micro_batch", "0")
    split = _deepspeed_updates(tmp_path / "split", "rl", 1, "--rl.micro_batch", "2")
    assert len(whole) == len(split) == 2
    _assert_same_updates(whole, split)


def test_more_micro_batches_than_a_process_has_examples_is_refused_clearly():
    """Each of 2 processes gets 4 of 8 examples: 5 micro-batches would leave one empty."""
    cfg = parse_config(["--sft.batch_size", "8", "--sft.grad_accum", "5"])
    settings.check_launch(cfg, settings.Launch(world=1))  # one process has all 8
    with pytest.raises(SettingsError, match=r"sft.grad_accum = 5: expected at most the 4 examples each of the 2 "
                                            r"process\(es\) gets per step \(sft.batch_size = 8\)"):
        settings.check_launch(cfg, settings.Launch(world=2))
    with pytest.raises(SettingsError, match=r"rl.prompts_per_step = 1: expected at least one prompt for each of the 2"):
        settings.check_launch(parse_config(["--rl.prompts_per_step", "1"]), settings.Launch(world=2))


_RL_ARGS = ["--run.stages", '["rl"]', "--rl.steps", "4", "--rl.prompts_per_step", "2", "--rl.group_size", "4",
            "--rl.sampling_rounds", "2", "--rl.micro_batch", "2", "--rl.max_new_tokens", "8", "--run.log_every", "1",
            "--eval.max_problems", "1", "--eval.samples", "1", "--eval.greedy", "false", "--eval.max_new_tokens", "4"]


def _launch_two_processes(args, timeout):
    """``accelerate launch`` (the shipped 2-CPU-process config) of the toy-reward run; killed,
    with its workers, if it outlives ``timeout`` (processes waiting on each other hang)."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "configs" / "accelerate" / "cpu-2proc.yaml"), str(Path(__file__).with_name("toy_reward_run.py")),
           *args]
    env = tree_env()
    assert_env_imports_tree(env, Path(args[args.index("--out") + 1]).parent)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil  # an Accelerate dependency

        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()  # the workers first: they run in sessions of their own and would outlive the launcher
        proc.communicate()
        pytest.fail(f"the 2-process DiPO run did not finish in {timeout} s (processes waiting on each other)")
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.parametrize("objective, extra", [
    ("dipo", []), ("tracerl", ["--rl.updates_per_pass", "2"]),  # shares of the kept groups taken globally
    ("diffu_grpo", []),
    ("diffu_grpo_masked_context", ["--rl.num_iterations", "2"]),  # a fresh prompt mask, and its logp_old, each pass
    ("coupled_grpo", [])])
def test_two_process_dipo_with_disagreeing_processes_matches_one_process(tmp_path, monkeypatch, objective, extra):
    """Each process decodes one of the step's two groups; which of them are kept, whether to
    sample another round and whether a process trains at all differ between processes. The run
    must finish (same collective calls on both) and train on the groups one process would keep —
    with every objective (the random views are seeded per response, not per process)."""
    args = [*_RL_ARGS, "--rl.objective", objective, *extra]
    _launch_two_processes([*args, "--out", str(tmp_path / "two")], timeout=240)
    monkeypatch.setattr(loops_dipo, "rollout_and_reward", toy_reward_run.toy_correct(loops_dipo.rollout_and_reward))
    train.main([*args, "--out", str(tmp_path / "one")])

    def rows(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert any(r["sampling_rounds"] > 1 for r in one) and any("loss" in r for r in one)  # rounds added; trained
    for a, b in zip(one, two, strict=True):
        for key in ("reward", "accuracy", "kept_fraction", "sampling_rounds", "cap_hit", "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        assert ("loss" in a) == ("loss" in b)  # a step trains on all processes or on none
        assert a.get("loss", 0.0) == pytest.approx(b.get("loss", 0.0), rel=1e-4, abs=1e-7)
        assert a.get("score_copies") == b.get("score_copies")
        if objective.startswith(("diffu_grpo", "coupled_grpo")) and "loss" in a:  # one or two copies per response
            kept = round(a["kept_fraction"] * a["sampling_rounds"] * 2) * 4
            assert a["score_copies"] == kept * (2 if objective == "coupled_grpo" else 1) * (2 if extra else 1)
    from dirl_min.model import build_tiny, load_model

    init = build_tiny(seed=0)[0].state_dict()
    p1 = load_model(tmp_path / "one" / "checkpoints" / "rl-final" / "model")[0].state_dict()
    p2 = load_model(tmp_path / "two" / "checkpoints" / "rl-final" / "model")[0].state_dict()
    diff = sum(float((p1[k] - p2[k]).pow(2).sum()) for k in p1) ** 0.5
    moved = sum(float((p1[k] - init[k]).pow(2).sum()) for k in p1) ** 0.5
    assert moved > 0
    assert diff < 1e-3 * moved  # the same updates up to float summation order
