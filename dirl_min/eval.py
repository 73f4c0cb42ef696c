"""``python -m dirl_min.eval``: DiRL's evaluation protocol (docs/method.md §6) on math benchmarks.

For every benchmark (and every dynamic-unmasking threshold of a sweep) each problem is
answered ``--samples`` times by block-diffusion decoding (:func:`dirl_min.decoding.generate`)
and scored by the training accuracy reward (:func:`dirl_min.rewards.math_reward`: the last
``\\boxed{}`` against the ground truth with math-verify; a truncated response scores 0).

Outputs, in ``--out``:

* ``samples.jsonl`` — one record per (benchmark, threshold, problem, sample): prompt,
  response, extracted answer, verdict, truncation, token and step counts, step_map
  statistics. Records are appended as batches finish.
* ``results.json`` — per benchmark and threshold: avg@k, pass@k (unbiased estimator, k a
  power of two up to ``--samples``), tokens per step, mean response length, truncation
  rate, throughput. Non-deterministic numbers (timings, process count) live under the
  ``runtime`` keys only; everything else is a pure function of the settings.
* ``accuracy_vs_tokens_per_step.png`` — when several thresholds are evaluated.
* ``eval_config.json`` — the settings that determine the samples (checked on resume).

Rerunning with the same ``--out`` resumes; under ``accelerate launch`` the problems are split
across processes and the main process merges (:mod:`dirl_min.evaluation.run`). This module is
the command: its options, and the composition of :mod:`dirl_min.evaluation`'s parts
(benchmarks, decode, run, report).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from dirl_min.evaluation.benchmarks import load_benchmarks
from dirl_min.infra.atomic import FolderBusy, folder_lock, remove_temporaries
from dirl_min.evaluation.responses import load_eval_model
from dirl_min.infra.errors import EvalError, one_line_errors
from dirl_min.evaluation.report import summarize
from dirl_min.evaluation.run import RESULTS_FILE, finalize, prepare, remove_outputs, run_shard

__all__ = ["build_parser", "parse_config", "evaluate_main", "main"]


EPILOG = ("Outputs in --out: samples.jsonl (one record per sample, appended as batches finish), "
          "results.json, eval_config.json, and accuracy_vs_tokens_per_step.png for a threshold sweep.\n"
          "Rerunning with the same --out skips finished samples (identical final results). Under "
          "'accelerate launch' the problems are split across processes by index; the main process merges.\n\n"
          "Examples:\n"
          "  python -m dirl_min.eval --model /ckpt/DiRL-8B-Instruct --hub --out runs/eval-dirl8b\n"
          "  python -m dirl_min.eval --model tiny --data-dir my_benchmarks --benchmarks gsm8k --limit 8 "
          "--samples 2 --max-new-tokens 32\n"
          "  python -m dirl_min.eval --model runs/default/checkpoints/rl-final --task embedded --samples 8 "
          "--max-new-tokens 16\n"
          "  accelerate launch -m dirl_min.eval --model /ckpt --hub --thresholds 0.7,0.8,0.9,0.95\n\n"
          "The method and the protocol: docs/method.md (benchmark sources: its section 6).")


DESCRIPTION = ("Evaluate a block-diffusion model with DiRL's protocol (docs/method.md §6): sampled answers per "
               "problem, math-verify accuracy (avg@k, pass@k), tokens per step, response length, truncation rate "
               "and throughput. Defaults are DiRL's settings. Every setting also has a dotted name "
               "(--eval.samples) and may come from a YAML file (--config; sections as below).")


def _parser_kw() -> dict:
    from dirl_min.settings.commands import EVAL_ALIASES, EvalCommand

    return dict(description=DESCRIPTION, prog="python -m dirl_min.eval", root=EvalCommand, aliases=EVAL_ALIASES,
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The command line: :class:`dirl_min.settings.commands.EvalCommand`'s settings and their flags."""
    from dirl_min.settings.config import build_parser as config_parser

    return config_parser(**_parser_kw())


def parse_config(argv=None):
    """The settings (:class:`~dirl_min.settings.commands.EvalCommand`), checked by
    :data:`dirl_min.settings.checks.EVAL_RULES`; errors exit with status 2."""
    from dirl_min.settings.commands import parse_command
    from dirl_min.settings.checks import EVAL_CROSS_RULES, EVAL_RULES

    return parse_command(argv, EVAL_RULES, EVAL_CROSS_RULES, **_parser_kw())


def evaluate_main(cfg) -> dict | None:
    """The whole evaluation for the settings ``cfg`` (:func:`parse_config`); returns the results on the main process."""
    if cfg.model.backend == "lmdeploy":
        from dirl_min.engine.lmdeploy_engine import require_lmdeploy

        require_lmdeploy("dirl_min.eval: --backend lmdeploy", "Use --backend native (the default).")
    t0 = time.perf_counter()
    benches = load_benchmarks(cfg)  # data errors before the (slow) model load
    import torch
    from accelerate import PartialState

    # cpu=True lets a CPU-only machine run several processes (gloo) under accelerate launch / torchrun.
    state = PartialState(cpu=not torch.cuda.is_available())
    model, tok, identity = load_eval_model(cfg.model.path, dtype=cfg.model.dtype, device=state.device)
    with ExitStack() as stack:
        _lock(Path(cfg.run.out), state, stack)
        if cfg.run.overwrite and state.is_main_process:
            remove_outputs(Path(cfg.run.out))
        state.wait_for_everyone()
        run = prepare(cfg, model, tok, identity, benches, is_main=state.is_main_process)
        state.wait_for_everyone()
        return _run(cfg, run, model, tok, state, t0)


def _lock(out: Path, state, stack: ExitStack) -> None:
    """The output folder's lock, held by the main process until ``stack`` closes; the stale temporaries
    of killed writes removed. Another job's lock refuses on every process (one decision for all)."""
    busy = None
    if state.is_main_process:
        try:
            stack.enter_context(folder_lock(out, f"dirl_min.eval, {state.num_processes} process(es)"))
            remove_temporaries(out)
        except FolderBusy as e:
            busy = str(e)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        busy = broadcast_object_list([busy])[0]
    if busy:
        raise EvalError(busy)


def _run(cfg, run, model, tok, state, t0) -> dict | None:
    """Decode this process's shard; the main process merges and reports."""
    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        total = sum(len(b.problems) for b in run.benchmarks) * cfg.eval.samples * len(cfg.decode.evaluated)
        print(f"dirl_min.eval: model {run.identity['path'] or run.identity['model']} ({run.identity['dtype']}), "
              f"{len(run.benchmarks)} benchmark(s), {total} samples, {world} process(es) -> {run.out}",
              file=sys.stderr)
    run_shard(run, model, tok, rank, world, progress=cfg.run.progress)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    results = finalize(run, wall_seconds=time.perf_counter() - t0, world=world)
    print(summarize(results))
    print(f"results: {run.out / RESULTS_FILE}", file=sys.stderr)
    return results


def main(argv=None) -> int:
    cfg = parse_config(argv)
    with one_line_errors("eval"):
        evaluate_main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
