"""Decoding and scoring a benchmark's samples, and the model they come from.

:func:`load_eval_model` loads ``--model`` and names exactly what was loaded; :func:`decoder`
is the generate function of ``--backend`` (dirl_min's decoder, or LMDeploy's engine);
:func:`decode_batch` decodes one batch of samples and turns each into a per-sample record,
scored by the training accuracy reward (:func:`score_responses`).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from functools import partial
from pathlib import Path

from dirl_min.evaluation.benchmarks import Benchmark
from dirl_min.infra.errors import EvalError, ModelError, about

__all__ = ["load_eval_model", "score_responses", "decoder", "decode_batch"]


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
        with about("--model"):
            try:
                path = checkpoint_folder(spec)
            except ModelError as e:
                raise EvalError(str(e)) from None
            model, tok = load_model(path, dtype=want)
        identity = {"model": str(spec), "path": str(path.resolve()), "digest": _weights_digest(path)}
    if device is not None:
        model.to(device)
    model.eval()
    identity["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return model, tok, identity


# --------------------------------------------------------------------------------------
# Backends: the function that decodes a batch
# --------------------------------------------------------------------------------------


def decoder(cfg, model):
    """The generate function of ``--backend`` (``cfg``: :class:`dirl_min.settings.commands.EvalCommand`):
    :func:`dirl_min.decoding.generate` on ``model`` (native), or that of an LMDeploy engine on ``--model``
    (one threshold per engine: the settings allow one with ``--backend lmdeploy``); both take the same
    arguments and return a Rollout."""
    if cfg.model.backend == "lmdeploy":
        from dirl_min.engine.lmdeploy_engine import make_engine

        return make_engine(cfg.model.path, model, strategy=cfg.decode.strategy, threshold=cfg.decode.evaluated[0],
                           steps=cfg.decode.steps).generate
    from dirl_min.engine.decode import generate

    return partial(generate, model)


# --------------------------------------------------------------------------------------
# Scoring and records
# --------------------------------------------------------------------------------------


def score_responses(responses: list[str], ground_truths: list[str], truncated: list[bool], *,
                    timeout: float = 5.0, num_workers: int = 0) -> list[tuple[str | None, bool]]:
    """``(extracted answer, correct)`` per response, with the training accuracy reward.

    The verdict is :func:`dirl_min.rewards.math_rewards` (last ``\\boxed{}`` vs the ground
    truth, math-verify, truncated responses score 0); the extracted answer is the content
    of that box (None when there is none).
    """
    from dirl_min.core.answers import extract_boxed
    from dirl_min.engine.grading import math_rewards

    verdicts = math_rewards(responses, ground_truths, truncated, timeout=timeout, num_workers=num_workers)
    return [(extract_boxed(r), v == 1.0) for r, v in zip(responses, verdicts)]


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


def decode_batch(decode, cfg, tok, b: Benchmark, thr: float, items: list[tuple[int, int, int]],
                 stop_ids: list[int]) -> list[dict]:
    """Decode and score the samples ``items`` (``(problem, sample, seed)`` each) of benchmark ``b``
    at threshold ``thr`` with ``decode`` (:func:`decoder`) and the settings ``cfg``; one per-sample record per item."""
    t0 = time.perf_counter()
    ev = cfg.eval
    roll = decode(
        [b.prompts[i] for i, _, _ in items], seeds=[s for _, _, s in items],
        max_new_tokens=ev.max_new_tokens, strategy=cfg.decode.strategy, threshold=thr,
        steps=cfg.decode.steps or None, temperature=ev.temperature, top_k=ev.top_k, top_p=ev.top_p,
        stop_token_ids=stop_ids, tokenizer=tok)
    seconds = time.perf_counter() - t0
    scores = score_responses(roll.text, [b.problems[i].answer for i, _, _ in items], roll.truncated,
                             timeout=cfg.verify.timeout, num_workers=cfg.verify.workers)
    return _records(b, thr, items, roll, scores, stop_ids, seconds)
