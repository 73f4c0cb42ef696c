"""The main job: evaluate the base model, SFT, evaluate, DiPO, evaluate, print a table.

    python -m dirl_min.train                      # the embedded default (tiny model, CPU: 7 min on 2 free cores)
    python -m dirl_min.train --help               # every setting, its meaning and default
    python -m dirl_min.train --config configs/sdar-8b-dirl.yaml --model.path /ckpt/SDAR-8B-Chat
    accelerate launch --num_processes 8 -m dirl_min.train --config ...

Outputs under ``--run.out``: ``summary.json``, ``metrics.jsonl``, TensorBoard events,
``curves.png``, and ``checkpoints/`` (resumable with ``--run.resume true``). The job holds the folder's
lock (one job per folder); SIGINT / SIGTERM end it after the current step with a checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from dirl_min.infra.atomic import FolderBusy, atomic_write, folder_lock, remove_temporaries
from dirl_min.infra.data_parallel import all_ranks
from dirl_min.infra.errors import SettingsError, about, one_line_errors
from dirl_min.settings.config import Config, parse_config
from dirl_min.model.forward import unwrap
from dirl_min.model import build_tiny, load_model, resolve_dtype
from dirl_min import data
from dirl_min.settings import runs
from dirl_min.loops.rl import run_rl
from dirl_min.loops.sft import run_sft
from dirl_min.loops.state import Checkpoints, Interrupts, Job, MetricsLog, resume, seed_everything as _seed_everything
from dirl_min.infra.progress import progress_mode
from dirl_min.settings.checks import check_launch, launch_of, validate
from dirl_min.infra.sharding import full_parameters
from dirl_min.evaluation.protocol import evaluate
from dirl_min.evaluation.stats import bootstrap_ci
from dirl_min.evaluation.train_report import plot_curves, print_table

__all__ = ["main", "build", "run_eval"]


def build(cfg: Config):
    """Model, tokenizer and the three data sets (SFT records, RL problems, eval problems).

    The data files are read before the model is loaded, so that their errors come first."""
    problems = data.arithmetic_problems(cfg.data.task_max_operand, tuple(cfg.data.task_levels))
    train_p, test_p = data.split_problems(problems, cfg.data.held_out, cfg.data.split_seed)
    sft_raw = data.load_records(cfg.data.sft_data) if cfg.data.sft_data else None
    rl = data.load_problems(cfg.data.rl_data) if cfg.data.rl_data else train_p
    ev = data.load_problems(cfg.data.eval_data) if cfg.data.eval_data else test_p
    if cfg.model.path:
        with about("--model"):
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
            dtype=resolve_dtype(cfg.model.dtype),  # auto: float32 on CPU, as the weights are built
        )
    attn = cfg.model.attn_implementation
    if attn == "auto":
        attn = "flex_attention" if torch.cuda.is_available() else "sdpa"  # CPU flex has no backward
    model.set_attn_implementation(attn)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    sft = (data.load_sft(cfg.data.sft_data, tok, sft_raw) if sft_raw is not None
           else data.sft_records(train_p, tok, cfg.data.prompt_template, cfg.data.response_style))
    rl = _fitting_prompts(rl, tok, cfg.data.prompt_template, cfg.data.max_prompt_tokens, "rl")
    ev = _fitting_prompts(ev, tok, cfg.data.prompt_template, cfg.data.max_prompt_tokens, "eval")  # as in training
    if cfg.eval.max_problems:
        ev = ev[: cfg.eval.max_problems]
    return model, tok, sft, rl, ev


def _fitting_prompts(problems, tok, template, limit, what):
    """Problems whose chat prompt fits ``limit`` tokens; the others are skipped and counted."""
    from dirl_min.model import chat_prompt_ids

    kept = [p for p in problems if len(chat_prompt_ids(tok, data.render_prompt(template, p.question))) <= limit]
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
            unwrap(model), tok, problems, samples=cfg.eval.samples, temperature=cfg.eval.temperature,
            top_k=cfg.eval.top_k, top_p=cfg.eval.top_p, greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens,
            decode_cfg=cfg.decode, prompt_template=cfg.data.prompt_template, seed=cfg.run.seed * 1000,
            batch_size=cfg.eval.batch_size, rank=accel.process_index, world=accel.num_processes, gather=gather_object,
        )


def _start(argv):
    """Settings, launch, model and data — every check before any work; nothing is written to
    ``run.out`` until all of them pass. Returns ``(cfg, record, accel, out, built)``."""
    with one_line_errors("train"):
        cfg = parse_config(argv, description=__doc__.split("\n\n")[0], prog="python -m dirl_min.train")
        validate(cfg)
        progress_mode(sys.stderr.isatty(), os.environ.get("DIRL_PROGRESS"))  # a bad value fails here, not later
        record = runs.run_record(cfg)  # the settings and the data files' hashes
        runs.check_out(cfg, record)
    from accelerate import Accelerator

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    _seed_everything(cfg.run.seed)
    accel = Accelerator(cpu=not torch.cuda.is_available())
    with one_line_errors("train"):
        check_launch(cfg, launch_of(accel))  # processes, Accelerate backend, LMDeploy on this machine
        built = build(cfg)
    return cfg, record, accel, Path(cfg.run.out), built


@contextmanager
def _locked(out: Path, accel, what: str, check):
    """The output folder's lock (:func:`dirl_min.infra.atomic.folder_lock`), held by the main process for the
    block, which then runs ``check()`` again (another job may have written the folder since the first
    check). Refused on every process when another job holds the lock or the check fails (one decision)."""
    with ExitStack() as stack:
        busy = None
        if accel.is_main_process:
            try:
                stack.enter_context(folder_lock(out, f"{what}, {accel.num_processes} process(es)"))
                check()
            except (FolderBusy, SettingsError) as e:  # both DirlError
                busy = str(e)
        busy = all_ranks(accel, busy)[0]
        if busy:
            raise SystemExit(f"{what}: error: {busy}")
        yield


def _resume(cfg, record, accel, out, model) -> dict:
    """Under the lock: the stale temporaries of killed writes removed, the latest checkpoint loaded or
    a fresh run begun."""
    with one_line_errors("train"):
        found = runs.load_latest(out, record, lambda p: load_model(p)[0].state_dict()) if cfg.run.resume else None
    if accel.is_main_process:
        for p in remove_temporaries(out, recursive_into=("checkpoints",)):
            print(f"removed {p}, left by an interrupted write", file=sys.stderr)
    state = resume(out, model, found, cfg, accel.is_main_process)
    if accel.is_main_process and found is None:
        runs.start_fresh(out, cfg, record)  # a fresh run starts a fresh log (an earlier run's files: run.overwrite)
    accel.wait_for_everyone()
    return state


class _Seconds:
    """Timings in the summary (``wall_seconds``, ``<stage>_seconds``) summed over the processes of a
    resumed run: each checkpoint saves them as they are, and a resumed run continues from there."""

    def __init__(self, summary: dict):
        self.summary, self.base, self.t0 = summary, {}, {}

    def start(self, key: str, t0: float | None = None) -> None:
        self.base[key], self.t0[key] = self.summary.get(key, 0.0), time.perf_counter() if t0 is None else t0

    def update(self) -> None:
        for key, t0 in self.t0.items():
            self.summary[key] = self.base[key] + time.perf_counter() - t0

    def stop(self, key: str) -> None:
        self.update()
        del self.t0[key]


class _Stopped(Exception):
    """A stop asked by a signal: its checkpoint is saved (``args``: the signal number, the checkpoint)."""


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    cfg, record, accel, out, built = _start(argv)
    try:
        with _locked(out, accel, "dirl_min.train", lambda: runs.check_out(cfg, record)), Interrupts(accel) as stop:
            state = _resume(cfg, record, accel, out, built[0])
            summary = _train(cfg, record, accel, out, built, state, stop, t_start)
            _finish(cfg, summary)
            if accel.is_main_process:
                _write_outputs(out, summary)
    except _Stopped as e:
        signum, ck = e.args
        if accel.is_main_process:
            args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--resume", "--overwrite")]
            print(f"{signal.Signals(signum).name}: stopped; saved {ck}. Continue with the same settings and "
                  f"--resume:\n  python -m dirl_min.train {shlex.join(map(str, args))} --resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    return summary


def _train(cfg, record, accel, out, built, state, stop, t_start) -> dict:
    """The evaluations and stages; returns the summary. A stop (:class:`Interrupts`) ends the job
    after a checkpoint, with the command that continues it."""
    model, tok, sft_data, rl_problems, eval_problems = built
    model.to(accel.device)
    # Train mode for the updates (transformers checkpoints layers only in train mode; load_model
    # returns eval mode); rollouts and evaluation switch to eval mode themselves.
    model.train()
    summary = state.get("summary", {})
    seconds = _Seconds(summary)
    seconds.start("wall_seconds", t_start)
    mode = progress_mode(sys.stderr.isatty(), os.environ.get("DIRL_PROGRESS"))
    progress = mode == "bar"
    log = MetricsLog(out, accel.is_main_process, lines=mode == "lines", summary=summary if state else None)
    checkpoints = Checkpoints(out, cfg, accel, model, tok, summary, record=record)
    checkpoints.index = state.get("ckpt_index", 0)  # a resumed run numbers on from its checkpoint

    done = set(state.get("done", []))
    if "base" not in summary:
        _evaluated(cfg, accel, log, summary, "base", run_eval(cfg, accel, model, tok, eval_problems, "base"))
    job = Job(cfg, accel, log, progress, stop)
    stages = {"sft": lambda st: run_sft(job, model, tok, sft_data, st),
              "rl": lambda st: run_rl(job, model, tok, rl_problems, st)}
    for stage in cfg.run.stages:
        steps = getattr(cfg, stage).steps
        if stage in done or steps <= 0:
            continue
        seconds.start(f"{stage}_seconds")
        st = state if state.get("stage") == stage else {}
        log.begin(stage, st.get("step", 0), steps)
        for _, ck_state in stages[stage](st):
            seconds.update()
            checkpoints.save(f"{stage}-{ck_state['step']:06d}", {**ck_state, "done": sorted(done)})
        if stop.stopping:
            _stop(stop, checkpoints, log)
        done.add(stage)
        seconds.stop(f"{stage}_seconds")
        _evaluated(cfg, accel, log, summary, stage, run_eval(cfg, accel, model, tok, eval_problems, stage))
        seconds.update()
        checkpoints.save(f"{stage}-final", {"stage": f"{stage}-done", "step": steps, "done": sorted(done)})
        if stage != cfg.run.stages[-1] and stop():  # after the last stage only the outputs remain: finish
            _stop(stop, checkpoints, log)
    seconds.update()
    log.close()
    return summary


def _evaluated(cfg, accel, log, summary: dict, stage: str, result: dict) -> None:
    summary[stage] = result
    log.evaluation(stage, result)
    if accel.is_main_process:
        print(f"{stage}: {json.dumps({k: v for k, v in result.items() if k != 'per_problem'})}", file=sys.stderr)


def _stop(stop, checkpoints, log) -> None:
    log.close()
    raise _Stopped(stop.signum or signal.SIGTERM, checkpoints.last)  # no signum: another process got it


def _finish(cfg, summary: dict) -> None:
    """The summary's closing fields: samples, the paired RL − SFT difference, the seed."""
    summary["samples"] = cfg.eval.samples
    if "sft" in summary and "rl" in summary:  # paired: the same problems before and after DiPO
        diff = [b - a for a, b in zip(summary["sft"]["per_problem"], summary["rl"]["per_problem"])]
        summary["rl_minus_sft"] = {"mean": sum(diff) / len(diff), "ci": list(bootstrap_ci(diff))}
    summary["seed"] = cfg.run.seed


def _write_outputs(out: Path, summary: dict) -> None:
    """summary.json, curves.png, and the table on stdout (main process only)."""
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    plot_curves(out)
    print(print_table(summary))
    print(f"wall time {summary['wall_seconds']:.0f} s; outputs in {out}/ (summary.json, metrics.jsonl, curves.png)")


def cli(argv=None) -> None:
    """``python -m dirl_min.train``: a second interrupt stops at once, with one line instead of a traceback."""
    try:
        main(argv)
    except KeyboardInterrupt as e:
        print(f"\n{e or 'SIGINT'}: stopped at once, without a checkpoint; --resume continues from the last one",
              file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    cli()
