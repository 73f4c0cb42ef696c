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

Determinism, resume and sharding: the sampling seed of a sample is a pure function of
``(seed, benchmark, problem index, sample index)`` (:func:`sample_seed`) and the decoder
produces a sequence identically whatever its batch, so a record never depends on batch
composition, process count or on what was already done. Rerunning with the same ``--out``
skips finished samples; under ``accelerate launch`` the problems are split across
processes by index (:func:`shard_indices`), each process appends to its own
``samples.rank<r>.jsonl`` and the main process merges them (:func:`merge_shards`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from dirl_min.evaluation.benchmarks import BENCHMARKS, HubError
from dirl_min.metrics import avg_at_k, bootstrap_ci, format_percent, mean_pass_at_k, pass_ks
from dirl_min.model import stop_token_ids
from dirl_min.tasks import DataError, Problem, render_prompt

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
]

DIRL_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
CONFIG_FILE = "eval_config.json"
PLOT_FILE = "accuracy_vs_tokens_per_step.png"
#: per-record fields that depend on the machine, not on the settings
RUNTIME_FIELDS = ("decode_seconds",)


class EvalError(ValueError):
    """A usage problem (bad option, missing benchmark, incompatible --out); the message says what to do."""


# --------------------------------------------------------------------------------------
# Pure pieces: prompts, seeds, shards
# --------------------------------------------------------------------------------------


def sample_seed(seed: int, benchmark: str, problem: int, sample: int) -> int:
    """The decoding seed of one sample, in ``[0, 2^32)``: a pure function of its arguments.

    The threshold is deliberately not an input: a threshold sweep reuses the same noise
    (common random numbers), so differences between thresholds are not sampling noise.
    """
    h = hashlib.blake2b(f"{int(seed)}\x00{benchmark}\x00{int(problem)}\x00{int(sample)}".encode(), digest_size=4)
    return int.from_bytes(h.digest(), "little")


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Problem indices handled by process ``rank`` of ``world``: ``i % world == rank``.

    Strided rather than contiguous so that every process gets a mix of problems (benchmark
    files are often ordered by difficulty). The shards partition ``range(n)``.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_indices: need 0 <= rank < world, got rank={rank}, world={world}")
    if n < 0:
        raise ValueError(f"shard_indices: n must be >= 0, got {n}")
    return list(range(rank, n, world))


def record_key(rec: dict) -> tuple[str, float, int, int]:
    """``(benchmark, threshold, problem index, sample index)`` of a per-sample record."""
    return (str(rec["benchmark"]), float(rec["threshold"]), int(rec["problem"]), int(rec["sample"]))


def _deterministic(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in RUNTIME_FIELDS}


def merge_shards(shards: Iterable[Iterable[dict]]) -> list[dict]:
    """Merge per-process record lists into one list sorted by :func:`record_key`.

    A key present in several shards (a sample redone after an interruption) is kept
    once; the copies must agree on every deterministic field.

    Raises:
        ValueError: two records with the same key differ (mixed settings in one --out).
    """
    seen: dict[tuple, dict] = {}
    for shard in shards:
        for rec in shard:
            key = record_key(rec)
            old = seen.get(key)
            if old is None:
                seen[key] = rec
            elif _deterministic(old) != _deterministic(rec):
                diff = sorted(k for k in set(old) | set(rec) if k not in RUNTIME_FIELDS and old.get(k) != rec.get(k))
                raise ValueError(f"two different records for {key} (fields {diff} differ): "
                                 "the output folder mixes runs with different settings")
    return [seen[k] for k in sorted(seen)]


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def score_responses(responses: list[str], ground_truths: list[str], truncated: list[bool], *,
                    timeout: float = 5.0, num_workers: int = 0) -> list[tuple[str | None, bool]]:
    """``(extracted answer, correct)`` per response, with the training accuracy reward.

    The verdict is :func:`dirl_min.rewards.math_rewards` (last ``\\boxed{}`` vs the ground
    truth, math-verify, truncated responses score 0); the extracted answer is the content
    of that box (None when there is none).
    """
    from dirl_min.rewards import extract_boxed, math_rewards

    verdicts = math_rewards(responses, ground_truths, truncated, timeout=timeout, num_workers=num_workers)
    return [(extract_boxed(r), v == 1.0) for r, v in zip(responses, verdicts)]


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict]:
    """Records of a per-sample JSONL file. A last line without its newline (a write cut
    short by an interruption) is ignored; any other bad line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    lines = lines[:-1]  # the text after the last newline: empty, or a partial write
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            record_key(rec)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise EvalError(f"{path}:{lineno}: not a per-sample record ({e}); "
                            "remove the line or start a fresh --out") from None
        out.append(rec)
    return out


def _repair_tail(path: Path) -> None:
    """Cut a partial last line (no newline) so that appending starts on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _sample_files(out: Path) -> list[Path]:
    return [out / SAMPLES_FILE] + sorted(out.glob("samples.rank*.jsonl"))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------


@dataclass
class Benchmark:
    """One evaluation set: its problems (after ``--limit``), where they came from, and the
    prompt template used for it. ``prompts`` (chat-rendered token ids) are filled by :func:`prepare`."""

    name: str
    source: str
    problems: list[Problem]
    template: str
    prompts: list[list[int]] = field(default_factory=list)
    prompt_texts: list[str] = field(default_factory=list)


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(DATA_SUFFIXES))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in DATA_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def resolve_benchmarks(spec: str, data_dir: Path | None) -> list[tuple[str, Path]]:
    """``(name, file)`` for each comma-separated item of ``spec``.

    An item is an existing file (name = its stem), an existing folder (every JSON/JSONL/
    parquet file in it), or a benchmark name looked up in ``data_dir`` as ``name.jsonl``,
    ``name.json`` or ``name.parquet`` (also DiRL's own spelling, e.g. ``MATH500.json``).

    Raises:
        EvalError: an item that is neither, no ``data_dir`` for a name, or two benchmarks
            with the same name.
    """
    out: list[tuple[str, Path]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path = Path(item).expanduser()
        if path.is_file():
            out.append((_stem(path), path))
            continue
        if path.is_dir():
            files = _data_files(path)
            if not files:
                raise EvalError(f"--benchmarks: folder {path} holds no {'/'.join(DATA_SUFFIXES)} file")
            out.extend((_stem(f), f) for f in files)
            continue
        if "/" in item or os.sep in item or item.endswith(DATA_SUFFIXES):
            raise EvalError(f"--benchmarks: no such file or folder: {item}")
        if data_dir is None:
            raise EvalError(
                f"--benchmarks: {item!r} is a benchmark name but no --data-dir was given; pass --hub (downloads "
                "DiRL's sets once, then reads the local cache), --data-dir DIR, or the files themselves "
                "(--benchmarks path/to/math500.jsonl,...)")
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise EvalError(f"--data-dir: {data_dir} is not a folder")
        names = [item] + ([BENCHMARKS[item.lower()]] if item.lower() in BENCHMARKS else [])
        found = next((data_dir / f"{n}{s}" for n in names for s in DATA_SUFFIXES if (data_dir / f"{n}{s}").is_file()), None)
        if found is None:
            have = ", ".join(_stem(f) for f in _data_files(data_dir)) or "nothing"
            raise EvalError(f"--benchmarks: no file for {item!r} in {data_dir} (looked for {item}.jsonl/.json/.parquet); "
                            f"it holds: {have}")
        out.append((item, found))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalError(f"--benchmarks: several files give the benchmark name(s) {dup}; rename one")
    if not out:
        raise EvalError("--benchmarks: no benchmark given")
    return out


def load_benchmarks(args) -> list[Benchmark]:
    """The benchmarks selected by the command line, with problems loaded and ``--limit`` applied.

    Raises:
        DataError: a malformed data file (the message names file, line and field).
        EvalError: a usage problem.
    """
    from dirl_min import tasks

    benches: list[Benchmark] = []
    spec = args.benchmarks
    if spec is None and not args.task:
        spec = ",".join(BENCHMARKS)
    if spec:
        if args.hub:
            from dirl_min.evaluation.benchmarks import fetch

            try:
                got = fetch([s.strip() for s in spec.split(",") if s.strip()])
            except HubError as e:
                raise EvalError(str(e)) from None
            files, sources = [(n, p) for n, p, _ in got], [src for _, _, src in got]
        else:
            data_dir = Path(args.data_dir) if args.data_dir else None
            files = resolve_benchmarks(spec, data_dir)
            sources = [str(p.resolve()) for _, p in files]
        template = args.prompt_template if args.prompt_template is not None else DIRL_PROMPT
        for (name, path), source in zip(files, sources):
            benches.append(Benchmark(name, source, tasks.load_problems(path), template))
    if args.task == "embedded":
        levels = tuple(int(x) for x in str(args.task_levels).split(",") if x.strip())
        problems = tasks.arithmetic_problems(args.task_max_operand, levels)
        _, held = tasks.split_problems(problems, args.held_out, args.split_seed)
        template = args.prompt_template if args.prompt_template is not None else _embedded_template()
        source = (f"embedded arithmetic task, levels {list(levels)}, operands 0..{args.task_max_operand}, "
                  f"held-out {args.held_out} (split seed {args.split_seed})")
        if any(b.name == "embedded" for b in benches):
            raise EvalError("--task embedded: a benchmark file is already called 'embedded'; rename it")
        benches.append(Benchmark("embedded", source, held, template))
    if args.limit:
        for b in benches:
            b.problems = b.problems[: args.limit]
    return benches


def _embedded_template() -> str:
    from dirl_min.config import DataConfig

    return DataConfig().prompt_template


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def _resolve_dtype(name: str, device=None):
    """``--dtype``: auto = bfloat16 on GPU, float32 on CPU (as dirl_min.train's model.dtype)."""
    import torch

    from dirl_min.model import resolve_dtype

    try:
        return resolve_dtype(name, cuda=device is not None and torch.device(device).type == "cuda")
    except ValueError as e:
        raise EvalError(f"--{e}") from None


def _weights_digest(path: Path) -> str:
    """A cheap content digest of a checkpoint folder: config.json, and per weight file its
    size and the sha256 of its first and last MiB (retrained weights change both)."""
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.name == "config.json" or p.suffix == ".safetensors":
            size = p.stat().st_size
            h.update(f"{p.name}:{size}:".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read())
    return h.hexdigest()[:16]


def load_eval_model(spec: str, *, dtype: str = "auto", device=None):
    """``(model, tokenizer, identity)`` for ``--model``.

    ``''`` / ``'tiny'``: :func:`dirl_min.model.build_tiny` (random weights, seed 0; smoke
    tests only). Otherwise the checkpoint folder ``spec`` via :func:`dirl_min.model.load_model`,
    found by :func:`dirl_min.model.checkpoint_folder` (the rule train and check use too: a
    ``dirl_min.train`` checkpoint means its ``model`` subfolder). ``identity`` names exactly
    what was loaded (resolved path and a content digest).
    """
    from dirl_min.model import build_tiny, checkpoint_folder, load_model

    want = _resolve_dtype(dtype, device)
    if spec in ("", "tiny"):
        model, tok = build_tiny(seed=0, dtype=want)
        identity = {"model": "tiny", "path": None, "digest": "build_tiny(seed=0)"}
    else:
        try:
            path = checkpoint_folder(spec)
        except ValueError as e:
            raise EvalError(f"--model: {e}") from None
        model, tok = load_model(path, dtype=want)
        identity = {"model": str(spec), "path": str(path.resolve()), "digest": _weights_digest(path)}
    if device is not None:
        model.to(device)
    model.eval()
    identity["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return model, tok, identity


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


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
    from dirl_min.decoding import STRATEGIES

    dc = DataConfig()
    ec, dec = EvalConfig(), DecodeConfig()  # one source for the defaults the main job's evaluation shares
    p = argparse.ArgumentParser(
        prog="python -m dirl_min.eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a block-diffusion model with DiRL's protocol (docs/method.md §6): sampled answers per "
                    "problem, math-verify accuracy (avg@k, pass@k), tokens per step, response length, "
                    "truncation rate and throughput. Defaults are DiRL's settings.",
        epilog="Outputs in --out: samples.jsonl (one record per sample, appended as batches finish), "
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
    g = p.add_argument_group("model")
    g.add_argument("--model", default="", metavar="PATH",
                   help="checkpoint folder to evaluate (SDAR / DiRL / TraDo / Qwen3, or a dirl_min.train checkpoint, "
                        "whose model/ subfolder is used); '' or 'tiny' = a random tiny model, for smoke tests "
                        "(default: '')")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="parameter dtype; auto = bfloat16 on GPU, float32 on CPU (default: auto)")
    g.add_argument("--backend", default="native", choices=["native", "lmdeploy"],
                   help="native = dirl_min's batched KV-cached decoder; lmdeploy needs the lmdeploy package and "
                        "CUDA (default: native)")
    g = p.add_argument_group("data")
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
    g = p.add_argument_group("decoding")
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
    return p


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


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


@dataclass
class EvalRun:
    """Everything a process needs to decode its shard and the main process needs to merge."""

    args: argparse.Namespace
    benchmarks: list[Benchmark]
    identity: dict
    settings: dict
    out: Path


def _settings(args, identity: dict, model, stop_ids: list[int]) -> dict:
    """The settings that determine every sample (checked against an existing --out)."""
    from dirl_min.model import diffusion_settings

    block, mask = diffusion_settings(model)
    return {
        "model": identity,
        "backend": args.backend,
        "block_size": block,
        "mask_token_id": mask,
        "stop_token_ids": stop_ids,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "strategy": args.strategy,
        "steps": args.steps,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }


def _fingerprint(settings: dict) -> dict:
    """The settings compared on resume: a checkpoint counts by its content digest and dtype,
    not by the path it was given under (a moved folder still resumes)."""
    model = settings.get("model") or {}
    return {**settings, "model": {"digest": model.get("digest"), "dtype": model.get("dtype")}}


def prepare(args, model, tok, identity: dict, benchmarks: list[Benchmark] | None = None, *,
            is_main: bool = True) -> EvalRun:
    """Render the prompts of the benchmarks (loaded here unless given), and check (main
    process: record) the settings of ``--out`` so that a resumed run never mixes settings."""
    from dirl_min.model import chat_prompt_ids

    benches = load_benchmarks(args) if benchmarks is None else benchmarks
    for b in benches:
        b.prompts = [chat_prompt_ids(tok, render_prompt(b.template, p.question)) for p in b.problems]
        b.prompt_texts = [tok.decode(ids, skip_special_tokens=False) for ids in b.prompts]
    out = Path(args.out)
    settings = _settings(args, identity, model, stop_token_ids(tok))
    cfg_path = out / CONFIG_FILE
    if cfg_path.is_file():
        old, new = _fingerprint(json.loads(cfg_path.read_text())), _fingerprint(settings)
        diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        if diff:
            desc = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise EvalError(f"{out} holds samples made with other settings ({desc}); "
                            "use another --out, or --overwrite to discard them")
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(cfg_path, json.dumps(settings, indent=2) + "\n")
    return EvalRun(args, benches, identity, settings, out)


def _existing(out: Path) -> dict[tuple, dict]:
    return {record_key(r): r for r in merge_shards(read_records(p) for p in _sample_files(out))}


def _check_reused(rec: dict, b: Benchmark, i: int) -> None:
    p = b.problems[i]
    if rec.get("question") != p.question or rec.get("ground_truth") != p.answer or rec.get("prompt") != b.prompt_texts[i]:
        what = "question" if rec.get("question") != p.question else (
            "ground truth" if rec.get("ground_truth") != p.answer else "prompt (template or chat template)")
        raise EvalError(f"{b.name} problem {i}: the {what} differs from the one in the existing samples of this "
                        "--out (another data file or template); use another --out, or --overwrite")


def _step_stats(step_map: list[int], block_size: int) -> tuple[int, int, list[int]]:
    """(distinct steps, most tokens committed in one step, histogram of tokens per step [1..B])."""
    per_step = Counter(step_map)
    hist = [0] * block_size
    for count in per_step.values():
        hist[min(count, block_size) - 1] += 1
    return len(per_step), max(per_step.values(), default=0), hist


def _records(b: Benchmark, thr: float, items: list[tuple[int, int, int]], roll, scores, stop_ids, seconds) -> list[dict]:
    recs = []
    stop = set(stop_ids)
    for row, (i, j, seed) in enumerate(items):
        ids = roll.response_ids[row]
        n_steps, max_commit, hist = _step_stats(roll.step_map[row], roll.block_size)
        length = next((t for t, tok in enumerate(ids) if tok in stop), len(ids))
        extracted, correct = scores[row]
        recs.append({
            "benchmark": b.name, "threshold": thr, "problem": i, "sample": j, "seed": seed,
            "question": b.problems[i].question, "ground_truth": b.problems[i].answer,
            "prompt": b.prompt_texts[i], "response": roll.text[row],
            "extracted": extracted, "correct": bool(correct), "truncated": bool(roll.truncated[row]),
            "num_tokens": len(ids), "length": length, "num_steps": n_steps,
            "tokens_per_step": len(ids) / max(1, n_steps), "max_tokens_per_step": max_commit,
            "steps_by_tokens": hist,
            "decode_seconds": seconds / len(items),
        })
    return recs


def run_shard(run: EvalRun, model, tok, rank: int = 0, world: int = 1, *, progress: bool = True) -> int:
    """Decode and score this process's unfinished samples, appending records as batches finish.

    Process ``rank`` of ``world`` takes problems :func:`shard_indices` ``(n, rank, world)`` of
    every benchmark. With one process the records go to ``samples.jsonl``, otherwise to
    ``samples.rank<rank>.jsonl``. Returns the number of samples decoded.
    """
    from tqdm.auto import tqdm

    from dirl_min.decoding import generate

    args, out = run.args, run.out
    out.mkdir(parents=True, exist_ok=True)
    done = _existing(out)
    todo: list[tuple[Benchmark, float, list[tuple[int, int, int]]]] = []
    for b in run.benchmarks:
        for thr in args.thresholds:
            items = []
            for i in shard_indices(len(b.problems), rank, world):
                for j in range(args.samples):
                    rec = done.get((b.name, thr, i, j))
                    if rec is not None:
                        _check_reused(rec, b, i)
                    else:
                        items.append((i, j, sample_seed(args.seed, b.name, i, j)))
            for s in range(0, len(items), args.batch_size):
                todo.append((b, thr, items[s:s + args.batch_size]))
    total = sum(len(items) for _, _, items in todo)
    if not total:
        return 0
    own = out / (SAMPLES_FILE if world == 1 else f"samples.rank{rank}.jsonl")
    _repair_tail(own)
    stop_ids = stop_token_ids(tok)
    n_correct = n_done = 0
    bar = tqdm(total=total, desc=f"eval[{rank}]" if world > 1 else "eval", unit="sample", dynamic_ncols=True,
               disable=not progress or rank != 0)
    model.eval()
    decode = _lmdeploy_engine(args, model).generate if args.backend == "lmdeploy" else partial(generate, model)
    try:
        with open(own, "a", encoding="utf-8") as f:
            for b, thr, items in todo:
                bar.set_description(f"{b.name} t={thr:g}")
                t0 = time.perf_counter()
                roll = decode(
                    [b.prompts[i] for i, _, _ in items], seeds=[s for _, _, s in items],
                    max_new_tokens=args.max_new_tokens, strategy=args.strategy, threshold=thr,
                    steps=args.steps or None, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    stop_token_ids=stop_ids, tokenizer=tok)
                seconds = time.perf_counter() - t0
                scores = score_responses(roll.text, [b.problems[i].answer for i, _, _ in items], roll.truncated,
                                         timeout=args.verify_timeout, num_workers=args.verify_workers)
                recs = _records(b, thr, items, roll, scores, stop_ids, seconds)
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
                f.flush()
                n_done += len(recs)
                n_correct += sum(r["correct"] for r in recs)
                bar.update(len(recs))
                bar.set_postfix(acc=f"{100 * n_correct / n_done:.1f}%",
                                speed=f"{sum(r['num_tokens'] for r in recs) / max(1e-9, seconds):.0f}tok/s")
    finally:
        bar.close()
    return n_done


def _metrics(b: Benchmark, thr: float, recs: list[dict], samples: int) -> dict:
    n = len(b.problems)
    counts = [(samples, sum(recs[i * samples + j]["correct"] for j in range(samples))) for i in range(n)]
    tokens = sum(r["num_tokens"] for r in recs)
    steps = sum(r["num_steps"] for r in recs)
    secs = sum(r.get("decode_seconds", 0.0) for r in recs)
    m = len(recs)
    return {
        "benchmark": b.name,
        "threshold": thr,
        "source": b.source,
        "prompt_template": b.template,
        "problems": n,
        "samples": samples,
        "accuracy": avg_at_k(counts),
        "accuracy_ci": list(bootstrap_ci([c / n_ for n_, c in counts])),  # 95%, over problems
        f"avg@{samples}": avg_at_k(counts),
        "pass@k": {str(k): mean_pass_at_k(counts, k) for k in pass_ks(samples)},
        "tokens_per_step": sum(r["tokens_per_step"] for r in recs) / m,
        "tokens_per_step_pooled": tokens / max(1, steps),
        "mean_length": sum(r["length"] for r in recs) / m,
        "mean_generated_tokens": tokens / m,
        "truncation_rate": sum(r["truncated"] for r in recs) / m,
        "no_answer_rate": sum(r["extracted"] is None for r in recs) / m,
        "max_tokens_per_step": max(r["max_tokens_per_step"] for r in recs),
        "runtime": {"decode_seconds": secs, "tokens_per_second": tokens / secs if secs > 0 else None},
    }


def finalize(run: EvalRun, *, wall_seconds: float | None = None, world: int = 1, plot: bool = True) -> dict:
    """Main process: merge the shard files into ``samples.jsonl`` (sorted, one record per
    sample), compute the metrics of the requested evaluation, write ``results.json`` (and the
    sweep plot). Records of other benchmarks/thresholds already in ``--out`` are kept in
    ``samples.jsonl`` but not reported.

    Raises:
        EvalError: a requested sample is missing (a process failed).
    """
    out, args = run.out, run.args
    files = _sample_files(out)
    merged = merge_shards(read_records(p) for p in files)
    _atomic_write(out / SAMPLES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    for p in files[1:]:
        p.unlink()
    by_key = {record_key(r): r for r in merged}
    runs = []
    for b in run.benchmarks:
        for thr in args.thresholds:
            keys = [(b.name, thr, i, j) for i in range(len(b.problems)) for j in range(args.samples)]
            missing = [k for k in keys if k not in by_key]
            if missing:
                raise EvalError(f"{len(missing)} samples of {b.name} (threshold {thr:g}) are missing, e.g. {missing[0]}; "
                                "a process did not finish — rerun the same command to complete them")
            runs.append(_metrics(b, thr, [by_key[k] for k in keys], args.samples))
    results = {
        "settings": {**run.settings, "samples": args.samples, "limit": args.limit, "thresholds": args.thresholds},
        "runs": runs,
        "runtime": {"wall_seconds": wall_seconds, "processes": world, "batch_size": args.batch_size},
    }
    _atomic_write(out / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if plot and len(args.thresholds) > 1:
        plot_sweep(runs, out / PLOT_FILE)
    return results


def plot_sweep(runs: list[dict], path: Path) -> Path:
    """Accuracy (avg@k, %) against tokens per step, one line per benchmark, one labelled point per threshold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["benchmark"] for r in runs):
        pts = sorted((r["tokens_per_step"], 100 * r["accuracy"], r["threshold"]) for r in runs if r["benchmark"] == name)
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=name)
        for x, y, t in pts:
            ax.annotate(f"t={t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("tokens per step")
    ax.set_ylabel(f"accuracy (avg@{runs[0]['samples']}, %)")
    ax.set_title("Dynamic threshold sweep (labels: threshold)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def summarize(results: dict) -> str:
    """The summary table printed at the end of a run."""
    runs = results["runs"]
    if not runs:
        return "(nothing evaluated)"
    samples = runs[0]["samples"]
    kmax = max(int(k) for k in runs[0]["pass@k"])
    head = ["benchmark", "thr", "problems", f"avg@{samples}", "95% CI", f"pass@{kmax}", "tok/step", "length", "trunc %",
            "tok/s"]
    rows = []
    for r in runs:
        tps = r["runtime"]["tokens_per_second"]
        ci = r.get("accuracy_ci")
        rows.append([r["benchmark"], f"{r['threshold']:g}", str(r["problems"]), format_percent(r["accuracy"]),
                     f"[{format_percent(ci[0])}, {format_percent(ci[1])}]" if ci else "-",
                     format_percent(r["pass@k"][str(kmax)]), f"{r['tokens_per_step']:.2f}", f"{r['mean_length']:.1f}",
                     format_percent(r["truncation_rate"]), "-" if tps is None else f"{tps:.1f}"])
    widths = [max(len(h), *(len(row[c]) for row in rows)) for c, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def _check_lmdeploy() -> None:
    """``--backend lmdeploy``: exit with a clear message when lmdeploy or CUDA is missing."""
    try:
        import lmdeploy
    except ImportError:
        raise SystemExit("dirl_min.eval: --backend lmdeploy needs the lmdeploy package (pip install -e '.[lmdeploy]'; "
                         "lmdeploy 0.18 needs CUDA and torch <= 2.12.1). Use --backend native (the default).") from None
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("dirl_min.eval: --backend lmdeploy needs a CUDA GPU and none is visible. "
                         "Use --backend native (the default).")
    from dirl_min.lmdeploy_engine import check_version

    try:
        check_version(lmdeploy.__version__)
    except RuntimeError as exc:
        raise SystemExit(f"dirl_min.eval: {exc}") from None


def _lmdeploy_engine(args, model):
    """The LMDeploy engine for ``--backend lmdeploy`` (one confidence threshold per engine)."""
    from dirl_min.lmdeploy_engine import LMDeployEngine
    from dirl_min.model import diffusion_settings

    if len(args.thresholds) != 1:
        raise SystemExit("dirl_min.eval: --backend lmdeploy takes one --thresholds value per run")
    if not args.model or args.model == "tiny":
        raise SystemExit("dirl_min.eval: --backend lmdeploy needs --model: a checkpoint folder LMDeploy can load")
    block, mask_id = diffusion_settings(model)
    return LMDeployEngine(args.model, block_size=block, mask_token_id=mask_id, strategy=args.strategy,
                          threshold=args.thresholds[0], steps=args.steps)


def _remove_outputs(out: Path) -> None:
    for p in [*_sample_files(out), out / RESULTS_FILE, out / CONFIG_FILE, out / PLOT_FILE]:
        if p.is_file():
            p.unlink()


def evaluate_main(args) -> dict | None:
    """The whole evaluation for parsed ``args``; returns the results on the main process."""
    if args.backend == "lmdeploy":
        _check_lmdeploy()
    t0 = time.perf_counter()
    benches = load_benchmarks(args)  # data errors before the (slow) model load
    import torch
    from accelerate import PartialState

    # cpu=True lets a CPU-only machine run several processes (gloo) under accelerate launch / torchrun.
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    if args.overwrite and state.is_main_process:
        _remove_outputs(Path(args.out))
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
