"""Running an evaluation over processes: per-sample records, shards, resume and merging.

Determinism, resume and sharding: the sampling seed of a sample is a pure function of
``(seed, benchmark, problem index, sample index)`` (:func:`sample_seed`) and the decoder
produces a sequence identically whatever its batch, so a record never depends on batch
composition, process count or on what was already done. Rerunning with the same ``--out``
skips finished samples (:func:`prepare` refuses an ``--out`` made with other settings);
process ``rank`` of ``world`` decodes problems :func:`shard_indices` of every benchmark
(:func:`run_shard`) and appends to its own ``samples.rank<r>.jsonl``; the main process merges
them (:func:`merge_shards`) and writes the results (:func:`finalize`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dirl_min.infra.atomic import atomic_write
from dirl_min.evaluation.benchmarks import Benchmark, load_benchmarks
from dirl_min.evaluation.responses import decode_batch, decoder
from dirl_min.infra.errors import EvalError
from dirl_min.evaluation.report import plot_sweep, run_metrics
from dirl_min.model import stop_token_ids
from dirl_min.data import render_prompt

__all__ = ["SAMPLES_FILE", "RESULTS_FILE", "CONFIG_FILE", "PLOT_FILE", "RUNTIME_FIELDS", "sample_seed",
           "shard_indices", "record_key", "merge_shards", "read_records", "EvalRun", "prepare", "run_shard",
           "finalize", "remove_outputs"]

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
CONFIG_FILE = "eval_config.json"
PLOT_FILE = "accuracy_vs_tokens_per_step.png"
#: per-record fields that depend on the machine, not on the settings
RUNTIME_FIELDS = ("decode_seconds",)


# --------------------------------------------------------------------------------------
# Pure pieces: seeds, shards, records
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


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def remove_outputs(out: Path) -> None:
    """``--overwrite``: delete the samples, results, settings and plot of an earlier run in ``out``."""
    for p in [*_sample_files(out), out / RESULTS_FILE, out / CONFIG_FILE, out / PLOT_FILE]:
        if p.is_file():
            p.unlink()


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


@dataclass
class EvalRun:
    """Everything a process needs to decode its shard and the main process needs to merge."""

    cfg: Any  # dirl_min.settings.commands.EvalCommand
    benchmarks: list[Benchmark]
    identity: dict
    settings: dict
    out: Path


def _settings(cfg, identity: dict, model, stop_ids: list[int]) -> dict:
    """The settings that determine every sample (checked against an existing --out): the format of
    ``eval_config.json``."""
    from dirl_min.model import diffusion_settings

    block, mask = diffusion_settings(model)
    return {
        "model": identity,
        "backend": cfg.model.backend,
        "block_size": block,
        "mask_token_id": mask,
        "stop_token_ids": stop_ids,
        "temperature": cfg.eval.temperature,
        "top_k": cfg.eval.top_k,
        "top_p": cfg.eval.top_p,
        "strategy": cfg.decode.strategy,
        "steps": cfg.decode.steps,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "seed": cfg.eval.seed,
    }


def _fingerprint(settings: dict) -> dict:
    """The settings compared on resume: a checkpoint counts by its content digest and dtype,
    not by the path it was given under (a moved folder still resumes)."""
    model = settings.get("model") or {}
    return {**settings, "model": {"digest": model.get("digest"), "dtype": model.get("dtype")}}


def prepare(cfg, model, tok, identity: dict, benchmarks: list[Benchmark] | None = None, *,
            is_main: bool = True) -> EvalRun:
    """Render the prompts of the benchmarks (loaded here unless given), and check (main
    process: record) the settings of ``--out`` so that a resumed run never mixes settings. ``cfg``: the
    command's settings (:class:`dirl_min.settings.commands.EvalCommand`)."""
    from dirl_min.model import chat_prompt_ids

    benches = load_benchmarks(cfg) if benchmarks is None else benchmarks
    for b in benches:
        b.prompts = [chat_prompt_ids(tok, render_prompt(b.template, p.question)) for p in b.problems]
        b.prompt_texts = [tok.decode(ids, skip_special_tokens=False) for ids in b.prompts]
    out = Path(cfg.run.out)
    settings = _settings(cfg, identity, model, stop_token_ids(tok))
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
        atomic_write(cfg_path, json.dumps(settings, indent=2) + "\n")
    return EvalRun(cfg, benches, identity, settings, out)


def _existing(out: Path) -> dict[tuple, dict]:
    return {record_key(r): r for r in merge_shards(read_records(p) for p in _sample_files(out))}


def _check_reused(rec: dict, b: Benchmark, i: int) -> None:
    p = b.problems[i]
    if rec.get("question") != p.question or rec.get("ground_truth") != p.answer or rec.get("prompt") != b.prompt_texts[i]:
        what = "question" if rec.get("question") != p.question else (
            "ground truth" if rec.get("ground_truth") != p.answer else "prompt (template or chat template)")
        raise EvalError(f"{b.name} problem {i}: the {what} differs from the one in the existing samples of this "
                        "--out (another data file or template); use another --out, or --overwrite")


def _pending(run: EvalRun, done: dict[tuple, dict], rank: int, world: int
             ) -> list[tuple[Benchmark, float, list[tuple[int, int, int]]]]:
    """This process's unfinished samples in batches ``(benchmark, threshold, [(problem, sample,
    seed)])`` of at most ``--batch-size``. Finished ones (``done``) must be of the same problems
    (else :class:`EvalError`)."""
    ev = run.cfg.eval
    todo: list[tuple[Benchmark, float, list[tuple[int, int, int]]]] = []
    for b in run.benchmarks:
        for thr in run.cfg.decode.evaluated:
            items = []
            for i in shard_indices(len(b.problems), rank, world):
                for j in range(ev.samples):
                    rec = done.get((b.name, thr, i, j))
                    if rec is not None:
                        _check_reused(rec, b, i)
                    else:
                        items.append((i, j, sample_seed(ev.seed, b.name, i, j)))
            for s in range(0, len(items), ev.batch_size):
                todo.append((b, thr, items[s:s + ev.batch_size]))
    return todo


def run_shard(run: EvalRun, model, tok, rank: int = 0, world: int = 1, *, progress: bool = True) -> int:
    """Decode and score this process's unfinished samples, appending records as batches finish.

    Process ``rank`` of ``world`` takes problems :func:`shard_indices` ``(n, rank, world)`` of
    every benchmark. With one process the records go to ``samples.jsonl``, otherwise to
    ``samples.rank<rank>.jsonl``. Returns the number of samples decoded.
    """
    from tqdm.auto import tqdm

    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    todo = _pending(run, _existing(out), rank, world)
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
    decode = decoder(run.cfg, model)
    try:
        with open(own, "a", encoding="utf-8") as f:
            for b, thr, items in todo:
                bar.set_description(f"{b.name} t={thr:g}")
                recs = decode_batch(decode, run.cfg, tok, b, thr, items, stop_ids)
                f.write(_jsonl(recs))
                f.flush()
                n_done += len(recs)
                n_correct += sum(r["correct"] for r in recs)
                bar.update(len(recs))
                seconds = sum(r["decode_seconds"] for r in recs)
                bar.set_postfix(acc=f"{100 * n_correct / n_done:.1f}%",
                                speed=f"{sum(r['num_tokens'] for r in recs) / max(1e-9, seconds):.0f}tok/s")
    finally:
        bar.close()
    return n_done


def finalize(run: EvalRun, *, wall_seconds: float | None = None, world: int = 1, plot: bool = True) -> dict:
    """Main process: merge the shard files into ``samples.jsonl`` (sorted, one record per
    sample), compute the metrics of the requested evaluation, write ``results.json`` (and the
    sweep plot). Records of other benchmarks/thresholds already in ``--out`` are kept in
    ``samples.jsonl`` but not reported.

    Raises:
        EvalError: a requested sample is missing (a process failed).
    """
    out, samples, thresholds = run.out, run.cfg.eval.samples, run.cfg.decode.evaluated
    files = _sample_files(out)
    merged = merge_shards(read_records(p) for p in files)
    atomic_write(out / SAMPLES_FILE, _jsonl(merged))
    for p in files[1:]:
        p.unlink()
    by_key = {record_key(r): r for r in merged}
    runs = []
    for b in run.benchmarks:
        for thr in thresholds:
            keys = [(b.name, thr, i, j) for i in range(len(b.problems)) for j in range(samples)]
            missing = [k for k in keys if k not in by_key]
            if missing:
                raise EvalError(f"{len(missing)} samples of {b.name} (threshold {thr:g}) are missing, e.g. {missing[0]}; "
                                "a process did not finish — rerun the same command to complete them")
            runs.append(run_metrics(b, thr, [by_key[k] for k in keys], samples))
    results = {  # the format of results.json
        "settings": {**run.settings, "samples": samples, "limit": run.cfg.data.limit, "thresholds": thresholds},
        "runs": runs,
        "runtime": {"wall_seconds": wall_seconds, "processes": world, "batch_size": run.cfg.eval.batch_size},
    }
    atomic_write(out / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if plot and len(thresholds) > 1:
        plot_sweep(runs, out / PLOT_FILE)
    return results
