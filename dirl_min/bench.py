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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dirl_min.bench",
        description="Benchmark block-diffusion decoding and DiPO rescoring on CPU (float32), figures measured "
                    "side by side in one run on random models with a sharpened output head.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", default="tiny,mid",
                   help=f"comma-separated model sizes to benchmark, from: {', '.join(SIZES)} "
                        "(tiny = build_tiny defaults; mid = hidden 512, 8 layers, 8/4 heads, MLP 1536)")
    p.add_argument("--new-tokens", type=int, default=256,
                   help="max_new_tokens of every decoding run (whole blocks; no stop tokens, so every run of a "
                        "row decodes the same number of blocks)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed repeats per configuration (after one short warm-up), interleaved across the "
                        "configurations of a row; medians are reported. 2 keeps the default run near 5 minutes "
                        "on 2 busy cores; use 3 or more for steadier figures")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0 = torch's default for this machine). 1 by default: on a "
                        "machine shared with other work, several threads make timings erratic")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what the figures divide by: 'wall' = time.perf_counter (what a user waits); 'cpu' = "
                        "time.process_time, this process's CPU time, which other processes' load barely "
                        "disturbs when --threads is 1 (with more threads it sums their work). Both are kept in --json")
    p.add_argument("--batch", type=int, default=16, help="batch size of the large-batch row (row 4)")
    p.add_argument("--block-size", type=int, default=4, help="diffusion block size B")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of the dynamic strategy")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="decoding temperature for rows 1-5 (0 = greedy); rescoring rollouts always use 1.0")
    p.add_argument("--top-k", type=int, default=0, help="top-k for rows 1-5 when sampling (0 = off)")
    p.add_argument("--sharpen", type=float, default=25.0,
                   help="factor applied to the untied lm_head weights so that the random model is confident")
    p.add_argument("--seed", type=int, default=0, help="model weight seed")
    p.add_argument("--ref-max-seconds", type=float, default=60.0,
                   help="if the uncached reference decoder is estimated to take longer than this at "
                        "--new-tokens, halve its token count until it fits (the value used is printed)")
    p.add_argument("--ref-tokens", type=int, default=0,
                   help="new tokens for the reference comparison (row 1), overriding the estimate (0 = auto)")
    p.add_argument("--no-reference", action="store_true", help="skip the uncached reference decoder (row 1)")
    p.add_argument("--rescore-batch", type=int, default=8,
                   help="rollouts rescored in row 6 (sampled: temperature 1, top-k 50, as DiRL's rollouts); "
                        "0 skips the row")
    p.add_argument("--rescore-new-tokens", type=int, default=64, help="new tokens of each rescored rollout")
    p.add_argument("--quick", action="store_true",
                   help="a fast smoke run (about a minute): --new-tokens 64 --repeats 1 --ref-max-seconds 15 "
                        "--rescore-batch 4 --rescore-new-tokens 32 (explicitly given options still win)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write all results (and raw timings) here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


QUICK = {"new_tokens": 64, "repeats": 1, "ref_max_seconds": 15.0, "rescore_batch": 4, "rescore_new_tokens": 32}


def parse_args(argv=None) -> argparse.Namespace:
    """Parse options; ``--quick`` replaces the defaults of :data:`QUICK` but not options given explicitly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == parser.get_default(k):
                setattr(args, k, v)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        parser.error(f"--sizes: unknown size(s) {bad}; choose from {', '.join(SIZES)}")
    args.size_list = sizes
    for name in ("new_tokens", "repeats", "batch", "block_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
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
    out = {"meta": {**meta, "wall_s": total}, "results": results}
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"results written to {path}")
    return out


if __name__ == "__main__":
    main()
