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
DiPO step on a real checkpoint's shape, see :mod:`dirl_min.speed.shapes`
(``python -m dirl_min.bench --shape qwen3-0.6b --help``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dirl_min.infra.atomic import atomic_write
from dirl_min.speed import shapes
from dirl_min.speed.rows import bench_size

if TYPE_CHECKING:
    from dirl_min.settings.commands import BenchCommand, ShapeCommand

__all__ = ["build_parser", "parse_args", "json_args", "main", "shape_build_parser", "shape_parse_args", "shape_main", "failed_checks", "cli"]


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


def _shape_option() -> argparse.ArgumentParser:
    """``--shape NAME`` in ``bench --help``: ``main`` hands such a command line to :func:`shape_main`
    before these options are parsed."""
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--shape", metavar="NAME", default=argparse.SUPPRESS,
                       help="run the real-shape training-step benchmark instead (" + ", ".join(shapes.SHAPES)
                            + "); python -m dirl_min.bench --shape NAME --help lists its options")
    return shape


def _parser_kw() -> dict:
    from dirl_min.settings.commands import BENCH_ALIASES, BenchCommand

    return dict(prog="python -m dirl_min.bench", root=BenchCommand, aliases=BENCH_ALIASES, parents=[_shape_option()],
                description="Benchmark block-diffusion decoding and DiPO rescoring on CPU (float32), figures measured "
                            "side by side in one run on random models with a sharpened output head. --shape NAME runs "
                            "the real-shape training-step benchmark instead (python -m dirl_min.bench --shape qwen3-0.6b --help).")


def build_parser() -> argparse.ArgumentParser:
    """The command line: :class:`dirl_min.settings.commands.BenchCommand`'s settings and their flags."""
    from dirl_min.settings.config import build_parser as config_parser

    return config_parser(**_parser_kw())


def parse_args(argv=None) -> BenchCommand:
    """The checked settings (:data:`dirl_min.settings.checks.BENCH_RULES`); ``--quick`` replaces the defaults
    of :data:`~dirl_min.settings.commands.BENCH_QUICK`, not settings given explicitly."""
    from dirl_min.settings.commands import BENCH_QUICK, BenchCommand, parse_command
    from dirl_min.settings.config import _apply as apply_setting
    from dirl_min.settings.checks import BENCH_RULES

    cfg = parse_command(argv, BENCH_RULES, **_parser_kw())
    if cfg.run.quick:  # parse again from the quick defaults: the options given still win
        base = BenchCommand()
        for dotted, value in BENCH_QUICK.items():
            apply_setting(base, dotted, value, "--quick")
        cfg = parse_command(argv, BENCH_RULES, base=base, **_parser_kw())
    return cfg


def json_args(cfg: BenchCommand) -> dict[str, Any]:
    """``meta.args`` of the ``--json`` file: the file's format, each setting under its flag's name
    (:data:`~dirl_min.settings.commands.BENCH_ALIASES`; those taking a value first, then the
    true/false ones; no file is ``null``), so a new flag reaches the file without an edit here."""
    from dirl_min.settings.commands import BENCH_ALIASES
    from dirl_min.settings.rules import get_setting

    named = [(flag.lstrip("-").replace("-", "_"), get_setting(cfg, dotted)) for flag, dotted in BENCH_ALIASES.items()]
    out = dict(sorted(named, key=lambda kv: isinstance(kv[1], bool)))  # stable: keeps the table's order
    out["json"] = out["json"] or None
    return out


def main(argv=None) -> dict[str, Any] | list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--shape" or a.startswith("--shape=") for a in argv):
        return shape_main(argv)  # real-shape training steps: a separate benchmark
    cfg = parse_args(argv)
    d, run = cfg.decode, cfg.run
    if run.threads > 0:
        torch.set_num_threads(run.threads)
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
        "args": json_args(cfg),
    }
    print(f"dirl_min bench — device cpu, float32, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()} (of {os.cpu_count()} CPUs), repeats {run.repeats} (median, "
          f"after a warm-up), clock {'wall (perf_counter)' if run.clock == 'wall' else 'CPU (process_time)'}, "
          f"{d.new_tokens} new tokens, load average {os.getloadavg()[0]:.1f}")
    print(f"models: random weights, untied lm_head ×{cfg.model.sharpen:g} (sharpened so that confidences spread "
          f"over (0,1)); {'greedy' if d.temperature <= 0 else f'temperature {d.temperature}'}; "
          f"decoding runs to max_new_tokens with no stop tokens, so every run decodes the same number of blocks; "
          f"rows 1-3 and 5 use batch 1")
    results = []
    for size in cfg.model.sizes:
        res = bench_size(size, cfg)
        _print_table(res)
        results.append(res)
    total = time.perf_counter() - t_start
    print(f"\nA/B: ratio of A to B (tokens/s, or B's time over A's for rescoring); "
          f"total wall time {total:.0f} s")
    out = {"meta": {**meta, "wall_s": total}, "results": results, "failed_checks": failed_checks(results)}
    print("correctness checks: " + ("all MET" if not out["failed_checks"] else
                                    "NOT MET: " + "; ".join(out["failed_checks"]) + " (exit status 1)"))
    if run.json:
        path = Path(run.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(out, indent=2, default=str) + "\n")
        print(f"results written to {path}")
    return out


def _shape_parser_kw() -> dict:
    from dirl_min.settings.commands import SHAPE_ALIASES, ShapeCommand

    return dict(prog="python -m dirl_min.bench --shape", description=shapes.__doc__.split("\n\n")[0], root=ShapeCommand,
                aliases=SHAPE_ALIASES)


def shape_build_parser() -> argparse.ArgumentParser:
    """The command line: :class:`dirl_min.settings.commands.ShapeCommand`'s settings and their flags."""
    from dirl_min.settings.config import build_parser as config_parser

    return config_parser(**_shape_parser_kw())


def shape_parse_args(argv=None) -> ShapeCommand:
    """The checked settings (:data:`dirl_min.settings.checks.SHAPE_RULES`)."""
    from dirl_min.settings.commands import parse_command
    from dirl_min.settings.checks import SHAPE_RULES

    return parse_command(argv, SHAPE_RULES, **_shape_parser_kw())


def _worker_argv(cfg: ShapeCommand, stage: str, ckpt: str) -> list[str]:
    """The command line of the child process that measures one configuration (``--worker stage:on|off``)."""
    m, st = cfg.model, cfg.step
    opts = {"--shape": m.shape, "--layers": m.layers, "--dtype": m.dtype, "--responses": st.responses,
            "--response-tokens": st.response_tokens, "--threads": cfg.run.threads, "--device": m.device,
            "--attn": m.attn, "--peak-tflops": st.peak_tflops, "--lmdeploy": st.lmdeploy}
    return [sys.executable, "-m", "dirl_min.bench", "--worker", f"{stage}:{ckpt}",
            *[x for flag, value in opts.items() for x in (flag, str(value))]]


def shape_main(argv=None) -> list[dict]:
    cfg = shape_parse_args(argv)
    m, st, run = cfg.model, cfg.step, cfg.run
    if run.threads:
        torch.set_num_threads(run.threads)
    if run.worker:  # a child: one configuration, one JSON line
        stage, ckpt = run.worker.split(":")
        res = shapes.run_step(m.shape, m.layers, m.dtype, stage, ckpt == "on", st.responses,
                              st.response_tokens, m.device, m.attn, st.peak_tflops, st.lmdeploy)
        print("RESULT " + json.dumps(res))
        return [res]
    if run.save:
        from dirl_min.model import resolve_dtype, save_model

        model, tok = shapes.build_shaped(m.shape, m.layers, resolve_dtype(m.dtype))
        save_model(model, tok, run.save)
        print(f"saved a random {m.shape}-shaped model to {run.save}")
        return []
    if st.lmdeploy:
        from dirl_min.engine.lmdeploy_engine import require_lmdeploy

        require_lmdeploy("dirl_min.bench --shape --lmdeploy")  # here, not in each child process
    depth = shapes.SHAPES[m.shape]["num_hidden_layers"]
    layers = min(m.layers or depth, depth)
    print(f"{m.shape} shape (hidden {shapes.SHAPES[m.shape]['hidden_size']}, vocab {shapes.VOCAB}, Qwen tokenizer), "
          f"{layers} of its {depth} layers{' (REDUCED DEPTH)' if layers < depth else ''}, {m.dtype}, "
          f"{m.device}, {m.attn}; {st.responses} responses × {st.response_tokens} tokens; "
          f"torch threads {run.threads or torch.get_num_threads()}; one optimizer step per child process", flush=True)
    rows = []
    for stage in st.stages:
        cks = st.checkpointing
        for ckpt in cks[:1] if stage == "rollout" else cks:  # decoding never checkpoints (no gradient)
            done = subprocess.run(_worker_argv(cfg, stage, ckpt), capture_output=True, text=True)
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"{stage} checkpointing {ckpt}: FAILED (exit {done.returncode})\n{done.stderr[-2000:]}")
                rows.append({"stage": stage, "checkpointing": ckpt == "on", "failed": done.returncode})
                continue
            r = json.loads(lines[-1][7:])
            rows.append(r)
            cuda = (f", peak CUDA {r['peak_cuda_gib']:.2f} GiB, MFU {r['mfu']:.1%} (attention FLOPs not counted)"
                    if "peak_cuda_gib" in r else "")
            print(f"{stage:>4}  checkpointing {ckpt:>3}: {r['seconds']:8.1f} s/step ({r['cpu_seconds']:.0f} s CPU), "
                  f"{r['trained_tokens'] / r['seconds']:8.1f} {'generated' if stage == 'rollout' else 'trained'} tokens/s, peak RSS {r['peak_rss_gib']:6.2f} GiB "
                  f"(model alone {r['rss_after_build_gib']:.2f} GiB){cuda}; {r['params'] / 1e6:.0f} M params", flush=True)
    if run.json:
        with open(run.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


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
