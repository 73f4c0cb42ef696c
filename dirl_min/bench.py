"""Decoding and rescoring benchmark: ``python -m dirl_min.bench`` (``--help`` for the options).

Every figure is measured side by side in one run, on one device (CPU, float32), on
randomly initialised models built by :func:`dirl_min.model.build_tiny`: the default
tiny one and a mid-size one. Rows, per model size:

1. KV-cached :func:`dirl_min.decoding.generate` vs the uncached reference decoder
   (``reference.decoding.decode``, the same weights wrapped as a denoiser), tokens/s.
2. Fused vs unfused commit: forwards per block (from ``Rollout.num_forwards``), tokens/s.
3. Dynamic (threshold) vs static (one token per step) unmasking: tokens per step, tokens/s.
4. Batch 1 vs batch 16 throughput.
5. The same weights decoding autoregressively with transformers' ``model.generate``
   (KV cache, greedy): the baseline a user would otherwise pick.
6. Packed vs per-round DiPO rescoring (:func:`dirl_min.dipo.rescore`): time and the
   largest difference of the values.

A random model predicts almost uniformly, so its confidences never reach a threshold:
the output head is untied and multiplied by ``--sharpen`` (as the engine tests do), and
decoding runs to ``max_new_tokens`` with no stop tokens, so every run of a row decodes
the same number of blocks. Timings are medians over ``--repeats`` after a warm-up, the
configurations of a row interleaved repeat by repeat, so that load from other processes
falls on all of them alike; only the ratios inside one run are meant to be compared.

``--shape qwen3-0.6b`` (or ``sdar-1.7b``) runs a different benchmark instead: one SFT and one
DiPO step on a real checkpoint's shape, see :mod:`dirl_min.bench_shape`
(``python -m dirl_min.bench_shape --help``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

# The pieces live in dirl_min.benchmarking; the names stay importable from here.
from dirl_min.atomic import atomic_write
from dirl_min.benchmarking.measures import (
    PROMPTS,
    SIZES,
    bench_model,
    bench_prompts,
    choose_reference_tokens,
    decoded_blocks,
    forwards_per_block,
    fused_commit_check,
    mean_tokens_per_step,
    rescore_agreement,
    steps_per_block,
)
from dirl_min.benchmarking.rows import bench_size
from dirl_min.benchmarking.timing import Case, time_cases

__all__ = [
    "SIZES",
    "bench_model",
    "bench_prompts",
    "decoded_blocks",
    "forwards_per_block",
    "mean_tokens_per_step",
    "fused_commit_check",
    "rescore_agreement",
    "steps_per_block",
    "choose_reference_tokens",
    "time_cases",
    "main",
]


def _print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(f"\n== {result['size']}: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, MLP {cfg['intermediate_size']}, "
          f"vocab {cfg['vocab_size']}, {result['params'] / 1e6:.2f}M params, B={cfg['block_size']}, "
          f"prompt {result['prompt_tokens']} tok ==")
    head = ("#", "comparison (A vs B)", "A", "B", "A/B", "target / check")
    rows = [(str(r["row"]), r["name"], r["a"], r["b"], r["ratio"], r["check"]) for r in result["rows"]]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(5)]
    for line in [head] + rows:
        print(" | ".join(x.ljust(w) for x, w in zip(line[:5], widths)) + " | " + line[5])


def _parser_kw() -> dict:
    from dirl_min.command_config import BENCH_ALIASES, BenchCommand

    return dict(prog="python -m dirl_min.bench", root=BenchCommand, aliases=BENCH_ALIASES,
                description="Benchmark block-diffusion decoding and DiPO rescoring on CPU (float32), figures measured "
                            "side by side in one run on random models with a sharpened output head. --shape NAME runs "
                            "the real-shape training-step benchmark instead (python -m dirl_min.bench_shape --help).")


def build_parser() -> argparse.ArgumentParser:
    """The command line: :class:`dirl_min.command_config.BenchCommand`'s settings and their flags."""
    from dirl_min.config import build_parser as config_parser

    return config_parser(**_parser_kw())


def parse_args(argv=None) -> argparse.Namespace:
    """The checked settings (:data:`dirl_min.settings.BENCH_RULES`) under the flags' names; ``--quick``
    replaces the defaults of :data:`~dirl_min.command_config.BENCH_QUICK`, not settings given explicitly."""
    from dirl_min.command_config import BENCH_ALIASES, BENCH_QUICK, BenchCommand, parse_command
    from dirl_min.config import _apply as apply_setting, flat
    from dirl_min.settings import BENCH_RULES

    cfg = parse_command(argv, BENCH_RULES, **_parser_kw())
    if cfg.run.quick:  # parse again from the quick defaults: the options given still win
        base = BenchCommand()
        for dotted, value in BENCH_QUICK.items():
            apply_setting(base, dotted, value, "--quick")
        cfg = parse_command(argv, BENCH_RULES, base=base, **_parser_kw())
    args = flat(cfg, BENCH_ALIASES)
    args.size_list = list(cfg.model.sizes)
    args.json = args.json or None
    return args


def main(argv=None) -> dict[str, Any] | list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--shape" or a.startswith("--shape=") for a in argv):
        from dirl_min import bench_shape  # real-shape training steps: a separate benchmark

        return bench_shape.main(argv)
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    t_start = time.perf_counter()
    meta = {
        "device": "cpu",
        "dtype": "float32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k != "size_list"},
    }
    print(f"dirl_min bench — device cpu, float32, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()} (of {os.cpu_count()} CPUs), repeats {args.repeats} (median, "
          f"after a warm-up), clock {'wall (perf_counter)' if args.clock == 'wall' else 'CPU (process_time)'}, "
          f"{args.new_tokens} new tokens, load average {os.getloadavg()[0]:.1f}")
    print(f"models: random weights, untied lm_head ×{args.sharpen:g} (sharpened so that confidences spread "
          f"over (0,1)); {'greedy' if args.temperature <= 0 else f'temperature {args.temperature}'}; "
          f"decoding runs to max_new_tokens with no stop tokens, so every run decodes the same number of blocks; "
          f"rows 1-3 and 5 use batch 1")
    results = []
    for size in args.size_list:
        res = bench_size(size, args)
        _print_table(res)
        results.append(res)
    total = time.perf_counter() - t_start
    print(f"\nA/B: ratio of A to B (tokens/s, or B's time over A's for rescoring); "
          f"total wall time {total:.0f} s")
    out = {"meta": {**meta, "wall_s": total}, "results": results, "failed_checks": failed_checks(results)}
    print("correctness checks: " + ("all MET" if not out["failed_checks"] else
                                    "NOT MET: " + "; ".join(out["failed_checks"]) + " (exit status 1)"))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(out, indent=2, default=str) + "\n")
        print(f"results written to {path}")
    return out


def failed_checks(results: list[dict]) -> list[str]:
    """The correctness checks that failed (``"size row n: name"``): same tokens as the reference decoder
    (row 1), fused commit saving one forward per block with the same tokens (row 2), packed rescoring
    within float32 tolerance of per-round (row 6). Speed targets are not among them: they depend on the machine."""
    return [f"{res['size']} row {r['row']}: {r['name']}" for res in results for r in res["rows"] if r.get("correct") is False]


def cli(argv=None) -> int:
    """``python -m dirl_min.bench``: exit status 1 when a correctness check fails (:func:`failed_checks`)."""
    out = main(argv)
    return 1 if isinstance(out, dict) and out.get("failed_checks") else 0


if __name__ == "__main__":
    raise SystemExit(cli())
