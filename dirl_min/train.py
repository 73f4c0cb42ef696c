"""The main job: evaluate the base model, SFT, evaluate, DiPO, evaluate, print a table.

    python -m dirl_min.train                      # the embedded default (tiny model, CPU: 7 min on 2 free cores)
    python -m dirl_min.train --help               # every setting, its meaning and default
    python -m dirl_min.train --config configs/sdar-8b-dirl.yaml --model.path /ckpt/SDAR-8B-Chat
    accelerate launch --num_processes 8 -m dirl_min.train --config ...

Outputs under ``--run.out``: ``summary.json``, ``metrics.jsonl``, TensorBoard events,
``curves.png``, and ``checkpoints/`` (resumable with ``--run.resume true``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from dirl_min.atomic import atomic_write
from dirl_min.config import Config, SettingsError, parse_config
from dirl_min.forward import _unwrap
from dirl_min.model import build_tiny, load_model, resolve_dtype
from dirl_min import runs, tasks
from dirl_min.loops.dipo import make_rollout_engine, run_rl
from dirl_min.loops.sft import run_sft
from dirl_min.loops.state import (
    Checkpoints, EpochSampler, MetricsLog, resume, save_checkpoint, seed_everything as _seed_everything)
from dirl_min.progress import progress_mode
from dirl_min.settings import check_launch, launch_of, validate
from dirl_min.sharding import full_parameters
from dirl_min.engine.rollouts import rollout_and_reward
from dirl_min.evaluation.protocol import evaluate
from dirl_min.loops.sft import sft_loss
from dirl_min.metrics import bootstrap_ci
from dirl_min.report import plot_curves, print_table

# The loops live in dirl_min.loops; their names are re-exported here, where tests and notebooks
# have found them (a monkeypatch must target the module that looks a name up: dirl_min.loops.*).
__all__ = ["main", "build", "run_eval", "run_sft", "run_rl", "make_rollout_engine", "MetricsLog", "EpochSampler",
           "save_checkpoint", "rollout_and_reward", "sft_loss", "print_table"]


def build(cfg: Config):
    """Model, tokenizer and the three data sets (SFT records, RL problems, eval problems).

    The data files are read before the model is loaded, so that their errors come first."""
    problems = tasks.arithmetic_problems(cfg.data.task_max_operand, tuple(cfg.data.task_levels))
    train_p, test_p = tasks.split_problems(problems, cfg.data.held_out, cfg.data.split_seed)
    sft_raw = tasks.load_records(cfg.data.sft_data) if cfg.data.sft_data else None
    rl = tasks.load_problems(cfg.data.rl_data) if cfg.data.rl_data else train_p
    ev = tasks.load_problems(cfg.data.eval_data) if cfg.data.eval_data else test_p
    if cfg.model.path:
        model, tok = load_model(
            cfg.model.path,
            block_size=cfg.model.block_size or None,
            mask_token_id=cfg.model.mask_token_id if cfg.model.mask_token_id >= 0 else None,
            dtype=resolve_dtype(cfg.model.dtype),
        )
    else:
        model, tok = build_tiny(
            hidden_size=cfg.model.hidden_size, num_layers=cfg.model.num_layers, num_heads=cfg.model.num_heads,
            num_kv_heads=cfg.model.num_kv_heads, head_dim=max(1, cfg.model.hidden_size // cfg.model.num_heads),
            intermediate_size=cfg.model.intermediate_size, block_size=cfg.model.block_size or 4, seed=cfg.run.seed,
        )
    attn = cfg.model.attn_implementation
    if attn == "auto":
        attn = "flex_attention" if torch.cuda.is_available() else "sdpa"  # CPU flex has no backward
    model.set_attn_implementation(attn)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    sft = (tasks.load_sft(cfg.data.sft_data, tok, sft_raw) if sft_raw is not None
           else tasks.sft_records(train_p, tok, cfg.data.prompt_template, cfg.data.response_style))
    rl = _fitting_prompts(rl, tok, cfg.data.prompt_template, cfg.data.max_prompt_tokens, "rl")
    ev = _fitting_prompts(ev, tok, cfg.data.prompt_template, cfg.data.max_prompt_tokens, "eval")  # as in training
    if cfg.eval.max_problems:
        ev = ev[: cfg.eval.max_problems]
    return model, tok, sft, rl, ev


def _fitting_prompts(problems, tok, template, limit, what):
    """Problems whose chat prompt fits ``limit`` tokens; the others are skipped and counted."""
    from dirl_min.model import chat_prompt_ids

    kept = [p for p in problems if len(chat_prompt_ids(tok, tasks.render_prompt(template, p.question))) <= limit]
    if len(kept) < len(problems):
        print(f"{what}: skipped {len(problems) - len(kept)} of {len(problems)} prompts longer than "
              f"data.max_prompt_tokens={limit}", file=sys.stderr)
    if not kept:
        raise SettingsError(f"{what}: no prompt fits data.max_prompt_tokens={limit}")
    return kept


def run_eval(cfg, accel, model, tok, problems, name):
    """Evaluation on every process: problems sharded, parameters gathered once (FSDP2), the
    results gathered, so each process returns the 1-process numbers.

    Every stage is sampled with the same seed, so the paired RL − SFT difference is paired in
    its samples as well as its problems (a model that did not change scores the same)."""
    from accelerate.utils import gather_object

    with full_parameters(model):
        return evaluate(
            _unwrap(model), tok, problems, samples=cfg.eval.samples, temperature=cfg.eval.temperature,
            top_k=cfg.eval.top_k, top_p=cfg.eval.top_p, greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens,
            decode_cfg=cfg.decode, prompt_template=cfg.data.prompt_template, seed=cfg.run.seed * 1000,
            batch_size=cfg.eval.batch_size, rank=accel.process_index, world=accel.num_processes, gather=gather_object,
        )


def _start(argv):
    """Settings, output folder, model and data — every check before any work; nothing is written
    to ``run.out`` until all of them pass. Returns ``(cfg, accel, out, built, state)``."""
    try:
        cfg = parse_config(argv, description=__doc__.split("\n\n")[0], prog="python -m dirl_min.train")
        validate(cfg)
        progress_mode(sys.stderr.isatty(), os.environ.get("DIRL_PROGRESS"))  # a bad value fails here, not later
        runs.check_out(cfg)
    except SettingsError as e:
        raise SystemExit(f"dirl_min.train: error: {e}") from None
    from accelerate import Accelerator

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    _seed_everything(cfg.run.seed)
    accel = Accelerator(cpu=not torch.cuda.is_available())
    out = Path(cfg.run.out)
    try:
        check_launch(cfg, launch_of(accel))  # processes, Accelerate backend, LMDeploy on this machine
        built = build(cfg)
        found = runs.load_latest(out, cfg.to_dict(), lambda p: load_model(p)[0].state_dict()) if cfg.run.resume else None
    except (tasks.DataError, SettingsError) as e:
        raise SystemExit(f"dirl_min.train: error: {e}") from None
    state = resume(out, built[0], found, cfg, accel.is_main_process)
    if accel.is_main_process and found is None:
        runs.start_fresh(out, cfg)  # a fresh run starts a fresh log (an earlier run's files: run.overwrite)
    accel.wait_for_everyone()
    return cfg, accel, out, built, state


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    cfg, accel, out, built, state = _start(argv)
    model, tok, sft_data, rl_problems, eval_problems = built
    model.to(accel.device)
    # Train mode for the updates (transformers checkpoints layers only in train mode; load_model
    # returns eval mode); rollouts and evaluation switch to eval mode themselves.
    model.train()
    summary = state.get("summary", {})
    mode = progress_mode(sys.stderr.isatty(), os.environ.get("DIRL_PROGRESS"))
    progress = mode == "bar"
    log = MetricsLog(out, accel.is_main_process, lines=mode == "lines")
    checkpoints = Checkpoints(out, cfg, accel, model, tok, summary, state.get("ckpt_index", 0))

    done = set(state.get("done", []))
    if "base" not in summary:
        summary["base"] = run_eval(cfg, accel, model, tok, eval_problems, "base")
        if accel.is_main_process:
            print(f"base: {json.dumps({k: v for k, v in summary['base'].items() if k != 'per_problem'})}", file=sys.stderr)
    stages = {"sft": lambda st: run_sft(cfg, accel, model, tok, sft_data, log, st, progress),
              "rl": lambda st: run_rl(cfg, accel, model, tok, rl_problems, log, st, progress)}
    for stage in cfg.run.stages:
        steps = getattr(cfg, stage).steps
        if stage in done or steps <= 0:
            continue
        t0 = time.perf_counter()
        st = state if state.get("stage") == stage else {}
        log.begin(stage, st.get("step", 0), steps)
        for _, ck_state in stages[stage](st):
            checkpoints.save(f"{stage}-{ck_state['step']:06d}", {**ck_state, "done": sorted(done)})
        done.add(stage)
        summary[f"{stage}_seconds"] = summary.get(f"{stage}_seconds", 0.0) + time.perf_counter() - t0
        summary[stage] = run_eval(cfg, accel, model, tok, eval_problems, stage)
        if accel.is_main_process:
            print(f"{stage}: {json.dumps({k: v for k, v in summary[stage].items() if k != 'per_problem'})}", file=sys.stderr)
        checkpoints.save(f"{stage}-final", {"stage": f"{stage}-done", "step": steps, "done": sorted(done)})
    summary["wall_seconds"] = summary.get("wall_seconds", 0.0) + time.perf_counter() - t_start
    _finish(cfg, summary)
    if accel.is_main_process:
        _write_outputs(out, summary, log)
    return summary


def _finish(cfg, summary: dict) -> None:
    """The summary's closing fields: samples, the paired RL − SFT difference, the seed."""
    summary["samples"] = cfg.eval.samples
    if "sft" in summary and "rl" in summary:  # paired: the same problems before and after DiPO
        diff = [b - a for a, b in zip(summary["sft"]["per_problem"], summary["rl"]["per_problem"])]
        summary["rl_minus_sft"] = {"mean": sum(diff) / len(diff), "ci": list(bootstrap_ci(diff))}
    summary["seed"] = cfg.run.seed


def _write_outputs(out: Path, summary: dict, log: MetricsLog) -> None:
    """summary.json, curves.png, and the table on stdout (main process only)."""
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    log.close()
    plot_curves(out)
    print(print_table(summary))
    print(f"wall time {summary['wall_seconds']:.0f} s; outputs in {out}/ (summary.json, metrics.jsonl, curves.png)")


if __name__ == "__main__":
    main()
