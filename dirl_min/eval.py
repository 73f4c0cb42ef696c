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
from pathlib import Path

from dirl_min.evaluation.benchmarks import (BENCHMARKS, DIRL_PROMPT, Benchmark, load_benchmarks,
                                            resolve_benchmarks)
from dirl_min.evaluation.decode import load_eval_model, score_responses
from dirl_min.evaluation.errors import EvalError
from dirl_min.evaluation.report import plot_sweep, summarize
from dirl_min.evaluation.run import (PLOT_FILE, RESULTS_FILE, RUNTIME_FIELDS, EvalRun, finalize, merge_shards, prepare,
                                     read_records, record_key, remove_outputs, run_shard, sample_seed,
                                     shard_indices)
from dirl_min.tasks import DataError

__all__ = [
    "DIRL_PROMPT",
    "BENCHMARKS",
    "EvalError",
    "Benchmark",
    "EvalRun",
    "plot_sweep",
    "build_parser",
    "parse_args",
    "sample_seed",
    "shard_indices",
    "merge_shards",
    "record_key",
    "read_records",
    "score_responses",
    "resolve_benchmarks",
    "load_benchmarks",
    "load_eval_model",
    "prepare",
    "run_shard",
    "finalize",
    "summarize",
    "main",
    "PLOT_FILE",
    "RUNTIME_FIELDS",
]
# All but build_parser, parse_args and main live in dirl_min.evaluation; importable from here as before.


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


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def build_parser() -> argparse.ArgumentParser:
    from dirl_min.config import DataConfig, DecodeConfig, EvalConfig

    dc = DataConfig()
    ec, dec = EvalConfig(), DecodeConfig()  # one source for the defaults the main job's evaluation shares
    p = argparse.ArgumentParser(
        prog="python -m dirl_min.eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a block-diffusion model with DiRL's protocol (docs/method.md §6): sampled answers per "
                    "problem, math-verify accuracy (avg@k, pass@k), tokens per step, response length, "
                    "truncation rate and throughput. Defaults are DiRL's settings.",
        epilog=EPILOG)
    _model_options(p.add_argument_group("model"))
    _data_options(p.add_argument_group("data"), dc)
    _decoding_options(p.add_argument_group("decoding"), ec, dec)
    _output_options(p)
    return p


def _model_options(g) -> None:
    """Which model, in which dtype, decoded by which backend."""
    g.add_argument("--model", default="", metavar="PATH",
                   help="checkpoint folder to evaluate (SDAR / DiRL / TraDo / Qwen3, or a dirl_min.train checkpoint, "
                        "whose model/ subfolder is used); '' or 'tiny' = a random tiny model, for smoke tests "
                        "(default: '')")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="parameter dtype; auto = bfloat16 on GPU, float32 on CPU (default: auto)")
    g.add_argument("--backend", default="native", choices=["native", "lmdeploy"],
                   help="native = dirl_min's batched KV-cached decoder; lmdeploy needs the lmdeploy package and "
                        "CUDA (default: native)")


def _data_options(g, dc) -> None:
    """Which problems: benchmark names/files, the embedded task, --limit, the prompt."""
    g.add_argument("--benchmarks", default=None, metavar="LIST",
                   help="comma-separated benchmark names, fetched with --hub or looked up in --data-dir (math500, "
                        "gsm8k, aime2024, aime2025, olympiadbench), and/or files (JSON/JSONL/parquet records with "
                        "question and ground_truth_answer) or folders of such files (default: "
                        f"{','.join(BENCHMARKS)}, unless --task is given)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding the benchmark files, one per name: math500.jsonl (or DiRL's MATH500.json), "
                        "gsm8k.jsonl, ... (default: none; see --hub)")
    g.add_argument("--hub", action="store_true",
                   help="get the benchmarks from DiRL's Hugging Face datasets Auraithm/{MATH500,GSM8K,AIME2024,"
                        "AIME2025,OlympiadBench} with `datasets`, converted to JSONL and cached in $DIRL_MIN_DATA "
                        "(default ~/.cache/dirl_min/benchmarks); cached copies are read offline")
    g.add_argument("--task", default=None, choices=["embedded"],
                   help="also evaluate the embedded arithmetic task's held-out split (the one dirl_min.train "
                        "evaluates and never trains on); alone unless --benchmarks is given (default: none)")
    g.add_argument("--task-levels", default=",".join(map(str, dc.task_levels)), metavar="LIST",
                   help=f"embedded task: levels, as in dirl_min.train's data.task_levels (default: "
                        f"{','.join(map(str, dc.task_levels))})")
    g.add_argument("--task-max-operand", type=int, default=dc.task_max_operand, metavar="N",
                   help=f"embedded task: operands 0..N (default: {dc.task_max_operand})")
    g.add_argument("--held-out", type=int, default=dc.held_out, metavar="N",
                   help=f"embedded task: size of the held-out split (default: {dc.held_out})")
    g.add_argument("--split-seed", type=int, default=dc.split_seed, metavar="N",
                   help=f"embedded task: seed of the train/held-out split (default: {dc.split_seed})")
    g.add_argument("--limit", type=int, default=0, metavar="N",
                   help="evaluate only the first N problems of each benchmark (0 = all; default: 0)")
    g.add_argument("--prompt-template", default=None, metavar="TEXT",
                   help="user message; {question} is replaced by the question and the result is rendered with "
                        "the model's chat template (default for benchmark files: DiRL's "
                        f"{DIRL_PROMPT!r}; for --task embedded: {dc.prompt_template!r}, dirl_min.train's default)")


def _decoding_options(g, ec, dec) -> None:
    """How each sample is decoded (defaults: DiRL's, shared with the main job's evaluation)."""
    from dirl_min.decoding import STRATEGIES

    g.add_argument("--samples", type=int, default=ec.samples, metavar="N",
                   help=f"sampled responses per problem: avg@N accuracy and pass@k (default: {ec.samples})")
    g.add_argument("--temperature", type=float, default=ec.temperature,
                   help=f"sampling temperature; 0 = greedy (default: {ec.temperature})")
    g.add_argument("--top-k", type=int, default=ec.top_k, help=f"top-k truncation, 0 = off (default: {ec.top_k})")
    g.add_argument("--top-p", type=float, default=ec.top_p,
                   help=f"top-p (nucleus) truncation, 1 = off (default: {ec.top_p})")
    g.add_argument("--strategy", default=dec.strategy, choices=list(STRATEGIES),
                   help=f"which masked positions a denoising step commits (default: {dec.strategy})")
    g.add_argument("--threshold", type=float, default=dec.threshold,
                   help=f"confidence threshold of the dynamic strategy (default: {dec.threshold})")
    g.add_argument("--thresholds", type=_floats, default=None, metavar="LIST",
                   help="sweep several dynamic thresholds, e.g. 0.7,0.8,0.9,0.95 (replaces --threshold; "
                        "writes a plot of accuracy against tokens per step; default: off)")
    g.add_argument("--steps", type=int, default=0,
                   help="static/sequential strategies: denoising steps per block; 0 = block size (default: 0)")
    g.add_argument("--max-new-tokens", type=int, default=8192, metavar="N",
                   help="response length limit, counted in whole blocks (default: 8192, DiRL's; the main job's "
                        f"evaluation uses {ec.max_new_tokens} for the embedded task, pass --max-new-tokens "
                        f"{ec.max_new_tokens} with --task embedded to compare with its table)")
    g.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="sequences decoded together per process; results do not depend on it (default: 64)")
    g.add_argument("--seed", type=int, default=0,
                   help="sampling seed; each sample's seed is a function of (seed, benchmark, problem, sample) "
                        "(default: 0)")


def _output_options(p) -> None:
    """Scoring (math-verify) and the output folder."""
    g = p.add_argument_group("scoring")
    g.add_argument("--verify-timeout", type=float, default=5.0, metavar="S",
                   help="hard time bound per math-verify check, seconds (default: 5.0)")
    g.add_argument("--verify-workers", type=int, default=0, metavar="N",
                   help="math-verify checks run in parallel, each in its own process; 0 = one at a time (default: 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/eval", metavar="DIR",
                   help="output folder; rerunning with the same folder resumes (default: runs/eval)")
    g.add_argument("--overwrite", action="store_true",
                   help="discard earlier samples and results in --out instead of resuming")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line (argparse errors exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from dirl_min.settings import EVAL_CROSS_RULES, EVAL_RULES, problems

    msgs = problems(args, EVAL_RULES, prefix="--")
    for cross in EVAL_CROSS_RULES:
        msgs += cross(args)
    if msgs:
        parser.error("; ".join(msgs))
    args.thresholds = [float(t) for t in (args.thresholds or [args.threshold])]
    if len(set(args.thresholds)) != len(args.thresholds):
        parser.error("--thresholds has repeated values")
    return args


def evaluate_main(args) -> dict | None:
    """The whole evaluation for parsed ``args``; returns the results on the main process."""
    if args.backend == "lmdeploy":
        from dirl_min.lmdeploy_engine import require_lmdeploy

        require_lmdeploy("dirl_min.eval: --backend lmdeploy", "Use --backend native (the default).")
    t0 = time.perf_counter()
    benches = load_benchmarks(args)  # data errors before the (slow) model load
    import torch
    from accelerate import PartialState

    # cpu=True lets a CPU-only machine run several processes (gloo) under accelerate launch / torchrun.
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    if args.overwrite and state.is_main_process:
        remove_outputs(Path(args.out))
    state.wait_for_everyone()
    model, tok, identity = load_eval_model(args.model, dtype=args.dtype, device=state.device)
    run = prepare(args, model, tok, identity, benches, is_main=state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        total = sum(len(b.problems) for b in run.benchmarks) * args.samples * len(args.thresholds)
        print(f"dirl_min.eval: model {identity['path'] or identity['model']} ({identity['dtype']}), "
              f"{len(run.benchmarks)} benchmark(s), {total} samples, {world} process(es) -> {run.out}",
              file=sys.stderr)
    run_shard(run, model, tok, rank, world, progress=not args.no_progress)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    results = finalize(run, wall_seconds=time.perf_counter() - t0, world=world)
    print(summarize(results))
    print(f"results: {run.out / RESULTS_FILE}", file=sys.stderr)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        evaluate_main(args)
    except (DataError, EvalError) as e:
        raise SystemExit(f"dirl_min.eval: error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
