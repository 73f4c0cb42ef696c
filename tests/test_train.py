"""Training loops: learning (not just running), exact accumulation, exact resume, config and data errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dirl_min import tasks
from dirl_min.settings.config import Config, parse_config
from dirl_min.dipo import group_advantages
from dirl_min.model.forward import SelectedLogits
from dirl_min.model import build_tiny
from dirl_min.loops import rl as loops_dipo, sft as loops_sft, state as loops_state
from dirl_min.trainer import (MicroBatch, PolicySettings, StepTotals, dipo_step, rollout_and_reward, sft_loss, sft_noise,
                              tokenize_sft)
from tests.fixtures.tree import assert_env_imports_tree, tree_env




def _examples(tok, n=16):
    recs = tasks.sft_records(tasks.arithmetic_problems()[:n], tok)
    ex, skipped = tokenize_sft(recs, tok, 4, 2048)
    assert skipped == 0
    return ex


def test_sft_examples_are_padded_to_whole_blocks_with_trained_pad():
    _, tok = build_tiny()
    for e in _examples(tok, 8):
        assert len(e.ids) % 4 == 0
        assert e.ids[-1].item() in (tok.pad_token_id, tok.eos_token_id)


def test_a_few_sft_steps_lower_the_loss_on_a_fixed_batch():
    model, tok = build_tiny(seed=0)
    ex = _examples(tok)
    w = SelectedLogits(model)
    n_resp = sum(len(e.ids) - e.prompt_len for e in ex)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_at_fixed_noise():
        with torch.no_grad():
            noise = sft_noise(ex, model.config.mask_token_id, t_min=0.5, generator=torch.Generator().manual_seed(123))
            return float(sft_loss(w, ex, model.config.mask_token_id, 4, noise, num_response_tokens=n_resp)[0])

    before = loss_at_fixed_noise()
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        noise = sft_noise(ex, model.config.mask_token_id, t_min=0.1, generator=gen)
        loss, _ = sft_loss(w, ex, model.config.mask_token_id, 4, noise, num_response_tokens=n_resp)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss_at_fixed_noise() < 0.7 * before


def _sft_runner(seed: int, n: int):
    """A tiny model, n examples (mixed lengths) with fixed noise, and ``run(splits, pack)`` →
    (summed step-normalised loss, gradients) over the micro-batches ``splits``."""
    model, tok = build_tiny(seed=seed)
    ex = _examples(tok, n)[::-1]
    w = SelectedLogits(model)
    M = model.config.mask_token_id
    n_resp = sum(len(e.ids) - e.prompt_len for e in ex)
    noise = sft_noise(ex, M, t_min=0.1, generator=torch.Generator().manual_seed(seed))

    def run(splits, pack=0):
        model.zero_grad()
        total = 0.0
        for idx in splits:
            loss, _ = sft_loss(w, [ex[i] for i in idx], M, 4, noise.take(idx), num_response_tokens=n_resp,
                               pack_tokens=pack)
            loss.backward()
            total += float(loss.detach())
        return total, [q.grad.clone() for q in model.parameters()]

    return ex, noise.masks, M, run


def _assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    for x, y in zip(a[1], b[1]):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-4)


def test_accumulated_micro_batches_give_the_same_loss_and_gradient_as_one_batch():
    """k micro-batches of n (step-normalised, as the trainer does) equal one batch of k·n."""
    _, _, _, run = _sft_runner(seed=1, n=12)
    _assert_same(run([list(range(12))]), run([list(range(i, 12, 3)) for i in range(3)]))


def test_a_few_dipo_steps_raise_the_mean_reward_on_a_toy_reward():
    """Toy reward: 1 if the response (text) contains the digit '7'. DiPO should make sevens likelier."""
    torch.manual_seed(0)
    model, tok = build_tiny(seed=3)
    from dirl_min.settings.config import DecodeConfig

    problems = [tasks.Problem("What is 3 + 4?", "7")] * 8
    w = SelectedLogits(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)

    def sample(n_problems=8):
        roll, _, _, _ = rollout_and_reward(model, tok, problems[:n_problems], group_size=8, prompt_template="{question}",
                                           decode_cfg=DecodeConfig(), temperature=1.0, top_k=0, top_p=1.0,
                                           max_new_tokens=8, rewards={"accuracy": 1.0}, generator=gen)
        reward = torch.tensor([float("7" in "".join(tok.decode([t]) for t in r)) for r in roll.response_ids])
        return roll, reward

    _, r0 = sample()
    for _ in range(15):
        roll, reward = sample()
        adv = group_advantages(reward, 8)
        n_tok = sum(len(x) for x in roll.response_ids)
        loss, stats, _ = dipo_step(w, MicroBatch(roll, list(range(len(roll))), adv), StepTotals(n_tok),
                                   PolicySettings(eps_low=0.2, eps_high=0.28))
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert stats["ratio_mean"] == pytest.approx(1.0)  # one on-policy pass
    _, r1 = sample()
    assert r1.mean() > r0.mean() + 0.2


def test_engine_sees_the_trainers_weights_after_an_optimizer_step():
    """Weight sync on CPU: the engine decodes with the very module the optimizer updates."""
    from dirl_min.decoding import generate
    from dirl_min.dipo import rescore

    model, tok = build_tiny(seed=4)
    prompt = [tok.encode("What is 1 + 1?")]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = generate(model, prompt, max_new_tokens=8, temperature=0.0)
    model.lm_head.weight.grad = torch.randn_like(model.lm_head.weight)
    opt.step()
    after = generate(model, prompt, max_new_tokens=8, temperature=0.0)
    with torch.no_grad():
        assert (rescore(model, after)[0] - torch.tensor(after.logp[0])).abs().max() < 1e-4
        assert (rescore(model, before)[0] - torch.tensor(before.logp[0])).abs().max() > 1e-4


def test_config_layers_yaml_and_dotted_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("sft:\n  steps: 5\n  lr: 0.01\nrl:\n  rewards: {accuracy: 1.0, speed: 0.5}\n")
    cfg = parse_config(["--config", str(y), "--sft.lr", "0.02", "--run.stages", "sft"])
    assert cfg.sft.steps == 5 and cfg.sft.lr == 0.02
    assert cfg.rl.rewards == {"accuracy": 1.0, "speed": 0.5}
    assert cfg.run.stages == ["sft"]
    assert Config().sft.steps != 5  # defaults untouched


def test_config_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--sft.steps", "many"])
    assert "--sft.steps: expected int, got 'many'" in capsys.readouterr().err
    y = tmp_path / "bad.yaml"
    y.write_text("sft:\n  stepz: 5\n")
    with pytest.raises(ValueError, match="unknown setting 'sft.stepz'"):
        parse_config(["--config", str(y)])


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    out = capsys.readouterr().out
    for name in ("--sft.steps", "--rl.group_size", "--decode.threshold", "--run.out", "--model.path"):
        assert name in out
    assert f"default: {Config().sft.steps})" in out and f"default: {Config().data.held_out})" in out


@pytest.mark.parametrize("content,message", [
    ("", "the file is empty"),
    ('{"question": "a", "ground_truth_answer": "1"}\n{"question": "b"\n', ":2: invalid JSON"),
    ('{"question": "a"}\n', "missing field 'ground_truth_answer'"),
    ('{"question": 3, "ground_truth_answer": "1"}\n', "field 'question' must be a string"),
    ('[1, 2]', "record 0: expected a JSON object"),
])
def test_bad_rl_data_gets_a_clear_message(tmp_path, content, message):
    f = tmp_path / "rl.jsonl"
    f.write_text(content)
    with pytest.raises(tasks.DataError, match=message.replace("(", r"\(")) as err:
        tasks.load_problems(f)
    assert str(f) in str(err.value)


def test_bad_sft_messages_get_a_clear_message(tmp_path):
    _, tok = build_tiny()
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(tasks.DataError, match="sft.jsonl:1: the last message must have role 'assistant'"):
        tasks.load_sft(f, tok)


def test_default_split_is_large_disjoint_family_preserving_and_seeded():
    """The main job's held-out set: at least 400 problems (a paired RL − SFT interval of about
    ±2.5 points), exactly ``data.held_out`` of them, no question or operand pair also in training."""
    d = Config().data
    probs = tasks.arithmetic_problems(d.task_max_operand, tuple(d.task_levels))
    train, test = tasks.split_problems(probs, d.held_out, seed=d.split_seed)
    assert len(test) == d.held_out >= 400 and len(train) + len(test) == len(probs)
    assert not {p.question for p in train} & {p.question for p in test}
    assert not {_operands(p.question) for p in train} & {_operands(p.question) for p in test}
    assert {p.level for p in test} == set(d.task_levels)  # every kind of question is evaluated
    assert tasks.split_problems(probs, d.held_out, seed=d.split_seed)[1] == test
    assert tasks.split_problems(probs, d.held_out, seed=d.split_seed + 1)[1] != test


def _operands(question: str) -> tuple[int, ...]:
    """The unordered operands of an embedded question, read from its text (independent of ``family``)."""
    nums = [int(n) for n in re.findall(r"\d+", question)]
    if question.startswith("Solve"):  # x + a = c: the operands are a and x = c - a
        nums = [nums[0], nums[1] - nums[0]]
    return tuple(sorted(nums))


@settings(max_examples=40, deadline=None)
@given(levels=st.sets(st.sampled_from([1, 2, 3]), min_size=1), max_operand=st.integers(1, 25),
       frac=st.floats(0.05, 0.5), seed=st.integers(0, 10**6))
def test_no_held_out_problem_has_a_twin_in_training(levels, max_operand, frac, seed):
    """a + b held out while b + a (same answer) is trained on would measure memory, not generalisation."""
    probs = tasks.arithmetic_problems(max_operand, tuple(sorted(levels)))
    held_out = max(1, int(frac * len(probs)))
    train, test = tasks.split_problems(probs, held_out, seed)
    assert sorted(train + test, key=probs.index) == probs
    assert held_out - 4 < len(test) <= held_out  # whole families (at most 4 problems each) fill the count
    train_operands, train_questions = {_operands(p.question) for p in train}, {p.question for p in train}
    for p in test:
        assert p.question not in train_questions
        assert _operands(p.question) not in train_operands, p  # no training problem on the same operands


def test_shipped_tiny_config_is_the_default(repo_root):
    """configs/tiny.yaml documents the default; it must not drift from the dataclass defaults."""
    assert parse_config(["--config", str(repo_root / "configs" / "tiny.yaml")]) == Config()


def test_shipped_gpu_config_parses(repo_root):
    cfg = parse_config(["--config", str(repo_root / "configs" / "sdar-8b-dirl.yaml"), "--model", "/ckpt/x"])
    assert cfg.model.path == "/ckpt/x" and cfg.rl.top_k == 50 and cfg.decode.threshold == 0.9


def _tiny_run_args(out, *extra):
    return ["--out", str(out), "--eval.max_problems", "2", "--eval.samples", "1", "--eval.greedy", "false",
            "--sft.steps", "6", "--sft.batch_size", "8", "--sft.warmup_steps", "2", "--rl.steps", "4",
            "--rl.prompts_per_step", "4", "--rl.group_size", "4", "--rl.max_new_tokens", "8",
            "--eval.max_new_tokens", "8", "--run.log_every", "1", *extra]


def _final_params(out):
    from dirl_min.model import load_model

    model, _ = load_model(out / "checkpoints" / "rl-final" / "model")
    return model.state_dict()


def test_resume_after_an_interruption_gives_identical_parameters(tmp_path, monkeypatch):
    """N steps straight == N/2 steps, a crash, --resume, the rest: same weights, bit for bit."""
    from dirl_min import train

    straight = tmp_path / "straight"
    train.main(_tiny_run_args(straight, "--run.save_every", "3"))

    interrupted = tmp_path / "interrupted"
    real_save = loops_state.save_checkpoint
    saves = []

    def crash_after_second_save(path, *a, **k):
        real_save(path, *a, **k)
        saves.append(path.name)
        if len(saves) == 2:  # sft-000003, sft-final; the crash hits mid-RL set-up
            raise KeyboardInterrupt

    monkeypatch.setattr(loops_state, "save_checkpoint", crash_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(_tiny_run_args(interrupted, "--run.save_every", "3"))
    monkeypatch.setattr(loops_state, "save_checkpoint", real_save)
    assert not (interrupted / "checkpoints" / "rl-final").exists()
    summary = train.main(_tiny_run_args(interrupted, "--run.save_every", "3", "--resume"))

    a, b = _final_params(straight), _final_params(interrupted)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert {"base", "sft", "rl", "wall_seconds"} <= summary.keys()


def test_resume_mid_stage_continues_from_the_step(tmp_path, monkeypatch):
    from dirl_min import train

    straight = tmp_path / "straight"
    train.main(_tiny_run_args(straight, "--run.save_every", "2"))
    interrupted = tmp_path / "interrupted"
    real_save = loops_state.save_checkpoint

    def crash_after_rl_step_3(path, *a, **k):
        real_save(path, *a, **k)
        if path.name == "rl-000002":
            crash_after_rl_step_3.armed = True

    real_write = train.MetricsLog.write

    def write_then_crash(self, stage, step, values):
        real_write(self, stage, step, values)
        if getattr(crash_after_rl_step_3, "armed", False) and stage == "rl" and step == 3:
            raise KeyboardInterrupt  # step 3 is logged but not checkpointed: resume must not log it twice

    monkeypatch.setattr(loops_state, "save_checkpoint", crash_after_rl_step_3)
    monkeypatch.setattr(train.MetricsLog, "write", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(_tiny_run_args(interrupted, "--run.save_every", "2"))
    monkeypatch.setattr(loops_state, "save_checkpoint", real_save)
    monkeypatch.setattr(train.MetricsLog, "write", real_write)
    train.main(_tiny_run_args(interrupted, "--run.save_every", "2", "--resume"))
    a, b = _final_params(straight), _final_params(interrupted)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (interrupted / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["stage"] == "rl"]
    assert steps == [1, 2, 3, 4]  # the log continues, nothing repeated or lost


def test_main_job_writes_its_outputs(tmp_path):
    from dirl_min import train

    out = tmp_path / "run"
    summary = train.main(_tiny_run_args(out))
    saved = json.loads((out / "summary.json").read_text())
    assert saved["base"]["accuracy"] == summary["base"]["accuracy"]
    for stage in ("base", "sft", "rl"):
        assert {"accuracy", "tokens_per_step"} <= saved[stage].keys()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "sft"] == list(range(1, 7))
    assert {"reward", "kept_fraction", "time_rollout", "time_rewards", "time_scoring", "time_update",
            "tokens_per_step"} <= rows[-1].keys()
    from PIL import Image

    img = Image.open(out / "curves.png").convert("RGB")
    assert img.size == (1650, 935)  # a 2 x 3 grid of panels, 15 x 8.5 inches at 110 dpi
    assert dict((c, n) for n, c in img.getcolors(maxcolors=1 << 22)).get((0x1F, 0x77, 0xB4), 0) > 100  # curves (C0)
    import importlib.util

    tb = out / "tensorboard"
    if importlib.util.find_spec("tensorboard") is None:  # the writer is optional: metrics.jsonl has everything
        assert not tb.exists() or not any(tb.rglob("events.*"))
    else:  # the same scalars as metrics.jsonl
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tb)).Reload()
        sft = [r for r in rows if r["stage"] == "sft"]
        assert [e.step for e in acc.Scalars("sft/loss")] == [r["step"] for r in sft]
        assert [e.value for e in acc.Scalars("sft/loss")] == pytest.approx([r["loss"] for r in sft], rel=1e-6)


def test_two_process_accelerate_run_matches_one_process(tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP over gloo) gives the 1-process update equal to
    rounding, not bit for bit: the all-reduce sums the processes' gradients in another order than one
    process accumulates its micro-batches. Measured (issue 21, 2 CPU cores): max |ΔW| 6.8e-7 after these
    4 SFT steps; 4.7e-5 after 100 SFT steps and 4.4e-4 after 20 more DiPO steps (AdamW turns rounding-level
    differences of near-zero gradients into steps of up to the learning rate), with the same rollouts,
    rewards and accuracies.

    (accelerate 1.15 starts one process for `--cpu --num_processes 2`; `--multi_gpu` with
    no GPU gives real CPU processes.)
    """
    import subprocess
    import sys

    from dirl_min import train
    from dirl_min.model import build_tiny, load_model

    args = ["--eval.max_problems", "1", "--eval.samples", "1", "--eval.greedy", "false", "--eval.max_new_tokens", "4",
            "--sft.steps", "4", "--sft.batch_size", "8", "--sft.warmup_steps", "2", "--run.stages", "sft"]
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu-2proc.yaml"  # the shipped one
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "-m", "dirl_min.train", *args, "--out", str(tmp_path / "two")]
    env = tree_env()
    assert_env_imports_tree(env, tmp_path)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    train.main([*args, "--out", str(tmp_path / "one")])
    init = build_tiny(seed=0)[0].state_dict()
    one = load_model(tmp_path / "one" / "checkpoints" / "sft-final" / "model")[0].state_dict()
    two = load_model(tmp_path / "two" / "checkpoints" / "sft-final" / "model")[0].state_dict()
    diff = sum(float((one[k] - two[k]).pow(2).sum()) for k in one) ** 0.5
    moved = sum(float((one[k] - init[k]).pow(2).sum()) for k in one) ** 0.5
    max_abs = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"2 vs 1 process after 4 SFT steps: max |dW| {max_abs:.2e}, ||dW|| / ||W - W0|| {diff / moved:.2e}")
    assert moved > 0.1
    assert diff < 1e-3 * moved  # the same update up to float summation order
    assert max_abs < 1e-5


def test_shipped_accelerate_configs_load(repo_root):
    from accelerate.commands.config.config_args import ClusterConfig
    from transformers.models.qwen3 import modeling_qwen3

    files = sorted((repo_root / "configs" / "accelerate").glob("*.yaml"))
    kinds = {ClusterConfig.from_yaml_file(str(f)).distributed_type.value for f in files}
    assert {"NO", "MULTI_GPU", "DEEPSPEED", "FSDP"} <= kinds
    fsdp = ClusterConfig.from_yaml_file(str(repo_root / "configs" / "accelerate" / "fsdp2-8gpu.yaml")).fsdp_config
    assert hasattr(modeling_qwen3, fsdp["fsdp_transformer_layer_cls_to_wrap"])  # the class FSDP wraps exists


def test_prompts_longer_than_the_limit_are_skipped_and_counted(capsys):
    from dirl_min.train import _fitting_prompts

    _, tok = build_tiny()
    probs = [tasks.Problem("What is 1 + 1?", "2"), tasks.Problem("x" * 500, "1")]
    kept = _fitting_prompts(probs, tok, "{question}", 100, "rl")
    assert kept == probs[:1]
    assert "rl: skipped 1 of 2 prompts longer than data.max_prompt_tokens=100" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no prompt fits"):
        _fitting_prompts(probs[1:], tok, "{question}", 100, "rl")


def test_a_nan_loss_stops_training_with_a_clear_message(tmp_path, monkeypatch):
    from dirl_min import train

    real = loops_sft.sft_loss

    def nan_loss(*a, **k):
        loss, stats = real(*a, **k)
        return loss * float("nan"), stats

    monkeypatch.setattr(loops_sft, "sft_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="SFT step 0: the loss is nan"):
        train.main(_tiny_run_args(tmp_path / "run"))


def test_packing_several_examples_per_row_gives_the_same_loss_and_gradient():
    """Each packed example keeps its own block grid and sees only itself (block-diagonal mask)."""
    from dirl_min.dipo import build_layout

    ex, masks, M, run = _sft_runner(seed=6, n=10)
    rows = build_layout([e.ids for e in ex], [m[None] for m in masks], [m[None] for m in masks], M, 4,
                        pack_tokens=400).input_ids.shape[0]
    assert rows <= 4  # the 10 examples really share rows
    _assert_same(run([list(range(10))], pack=0), run([list(range(10))], pack=400))


def test_an_external_rollout_engine_synced_each_step_trains_like_the_native_one(tmp_path, monkeypatch):
    """The LMDeploy wiring on CPU: an engine that holds its *own* copy of the weights and sees
    the policy only through ``load_weights`` must give the native run's parameters, bit for
    bit; a sync skipped after a release would decode with stale weights and diverge."""
    import copy

    from dirl_min import train
    from dirl_min.decoding import generate

    class CopyEngine:
        def __init__(self):
            self.model, self.awake, self.loads = None, False, 0

        def load_weights(self, policy):
            self.model = copy.deepcopy(policy).eval()
            self.awake, self.loads = True, self.loads + 1

        def release(self):
            self.model, self.awake = None, False  # a released engine holds no weights

        def generate(self, prompts, **kw):
            assert self.awake, "decoding with a released engine"
            return generate(self.model, prompts, **kw)

    native = tmp_path / "native"
    train.main(_tiny_run_args(native, "--run.stages", '["rl"]'))
    engine = CopyEngine()
    monkeypatch.setattr(loops_dipo, "make_rollout_engine", lambda cfg, policy: engine)
    train.main(_tiny_run_args(tmp_path / "external", "--run.stages", '["rl"]'))
    assert engine.loads == 4 and not engine.awake  # one sync per RL step; released for every update
    a, b = _final_params(native), _final_params(tmp_path / "external")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rl_learning_rate_is_dirls_warm_up_then_constant():
    """run_rl's schedule, make_scheduler(opt, rl.warmup_steps, rl.steps, 1.0): lr·k/10 for the first 10
    updates, then lr to the end (no decay); SFT's floor < 1 does decay."""
    from dirl_min.settings.config import Config
    from dirl_min.trainer import make_scheduler

    cfg = Config()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.rl.lr)
    sched = make_scheduler(opt, cfg.rl.warmup_steps, cfg.rl.steps, 1.0)
    lrs = []
    for _ in range(cfg.rl.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert cfg.rl.warmup_steps == 10
    assert lrs[:10] == pytest.approx([cfg.rl.lr * (k + 1) / 10 for k in range(10)])
    assert lrs[10:] == pytest.approx([cfg.rl.lr] * (cfg.rl.steps - 10))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler(opt, 2, 20, 0.1)
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("rule,kept", [("reward_std", 0.25), ("accuracy", 0.0)])
def test_rl_group_filter_setting_picks_the_groups_trained_on(tmp_path, monkeypatch, rule, kept):
    """All answers correct, one group of four with differing (speed) rewards: DiRL's reward_std
    rule trains on that group, DAPO's accuracy rule drops it (and every other)."""
    from dirl_min import train

    real = loops_dipo.rollout_and_reward

    def all_correct_one_group_differs(*a, **k):
        roll, rewards, correct, parts = real(*a, **k)
        rewards = torch.full_like(rewards, 0.75)
        rewards[:4] = torch.tensor([0.5, 0.6, 0.7, 0.8])
        return roll, rewards, torch.ones_like(correct), parts

    monkeypatch.setattr(loops_dipo, "rollout_and_reward", all_correct_one_group_differs)
    out = tmp_path / rule
    train.main(_tiny_run_args(out, "--run.stages", '["rl"]', "--rl.steps", "1", "--rl.group_filter", rule))
    row = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["kept_fraction"] == kept
    assert ("loss" in row) == (kept > 0)


def test_worked_responses_state_the_sum_then_box_it():
    _, tok = build_tiny()
    probs = [tasks.Problem("What is 3 + 4?", "7"), tasks.Problem("What is 3 - 14?", "-11"),
             tasks.Problem("Solve: If x + 3 = 10, what is x?", "7")]
    recs = tasks.sft_records(probs, tok, response_style="worked")
    end = "<|im_end|>" + tok.eos_token
    assert [r["response"] for r in recs] == ["3 + 4 = 7. \\boxed{7}" + end, "3 - 14 = -11. \\boxed{-11}" + end,
                                             "x = 10 - 3 = 7. \\boxed{7}" + end]
    assert [r["response"] for r in tasks.sft_records(probs, tok)] == [f"\\boxed{{{p.answer}}}" + end for p in probs]
    for p in tasks.arithmetic_problems(6, (1, 2, 3)):  # the worked arithmetic is right
        lhs = tasks.worked_solution(p).split(" = ")[-2].removeprefix("x = ")
        assert eval(lhs) == int(p.answer), p
    with pytest.raises(ValueError, match="response_style"):
        tasks.sft_records(probs, tok, response_style="chain")
    with pytest.raises(ValueError, match="no worked solution"):
        tasks.sft_records([tasks.Problem("What is 2 * 3?", "6")], tok, response_style="worked")


def test_shipped_speed_config_parses(repo_root):
    cfg = parse_config(["--config", str(repo_root / "configs" / "speed.yaml")])
    assert cfg.data.response_style == "worked" and cfg.rl.rewards == {"speed": 1.0}
    assert cfg.rl.group_filter == "reward_std" and cfg.model.block_size == 8 and cfg.rl.max_new_tokens == 32


def test_with_accuracy_rewards_both_group_filters_train_identically(tmp_path, monkeypatch):
    """The default run is unchanged by the reward_std default: with accuracy-only rewards it
    keeps exactly the groups DAPO's accuracy rule keeps, so the weights agree bit for bit."""
    from dirl_min import train

    real = loops_dipo.rollout_and_reward

    def some_right(*a, **k):  # the tiny untrained model gets nothing right: fix a pattern of 0/1 rewards
        roll, rewards, correct, parts = real(*a, **k)
        correct = torch.tensor([float(i % 5 in (0, 3)) for i in range(len(correct))])
        correct[-4:] = 1.0  # an all-correct group
        return roll, correct.clone(), correct, parts

    monkeypatch.setattr(loops_dipo, "rollout_and_reward", some_right)
    for rule in ("reward_std", "accuracy"):
        train.main(_tiny_run_args(tmp_path / rule, "--run.stages", '["rl"]', "--rl.group_filter", rule))
    a, b = _final_params(tmp_path / "reward_std"), _final_params(tmp_path / "accuracy")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    kept = [[json.loads(l)["kept_fraction"] for l in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("reward_std", "accuracy")]
    assert kept[0] == kept[1] and max(kept[0]) > 0  # some groups were trained on


def test_every_stage_is_evaluated_on_the_same_samples(tmp_path):
    """RL − SFT is paired in its samples too: an RL stage that leaves the weights unchanged
    (a learning rate far below float32 resolution) scores exactly what SFT scored, sample for sample."""
    from dirl_min import train
    from dirl_min.model import load_model

    out = tmp_path / "run"
    summary = train.main(_tiny_run_args(out, "--rl.lr", "1e-20", "--eval.max_problems", "6", "--eval.samples", "4"))
    sft = load_model(out / "checkpoints" / "sft-final" / "model")[0].state_dict()
    rl = _final_params(out)
    assert all(torch.equal(sft[k], rl[k]) for k in sft)  # the premise: RL changed nothing
    for key in ("per_problem", "tokens_per_step", "mean_length", "truncation_rate"):
        assert summary["rl"][key] == summary["sft"][key], key
    assert summary["rl_minus_sft"]["mean"] == 0.0
