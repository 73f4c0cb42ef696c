"""The benchmark's models, prompts and deterministic measures (tested in tests/test_bench.py).

Nothing here is timed: these are the counts (blocks, forwards, tokens per step, layout
sizes) and the agreement checks the rows of :mod:`dirl_min.bench` report beside the timings.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable

import torch

from dirl_min.engine.decode import Rollout, generate
from dirl_min.engine.score import rescore
from dirl_min.model import build_tiny, chat_prompt_ids

# Model sizes (keyword arguments of build_tiny).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {},  # build_tiny defaults: hidden 64, 2 layers, 4 heads (2 KV), head_dim 16, MLP 256
    "mid": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1536),
}

# Prompts of varied lengths (with the chat template: 40 to 100 tokens of the tiny tokenizer).
PROMPTS = [
    "Solve: If x + 5 = 12, what is x?",
    "What is 2+3?",
    "Hi",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "Compute 17 * 23.",
    "How many positive divisors does 36 have?",
    "Simplify (x^2 - 9) / (x - 3).",
    "What is the sum of the first 10 positive odd numbers?",
    "If a rectangle has perimeter 30 and width 5, what is its area?",
    "Find the remainder when 2^10 is divided by 7.",
    "Tom has 3 apples and buys twice as many. How many apples does he have now?",
    "What is 15% of 80?",
    "Solve for y: 3y - 7 = 2y + 4.",
    "Write 0.375 as a fraction in lowest terms.",
    "The angles of a triangle are in the ratio 1:2:3. What is the largest angle?",
    "What is the least common multiple of 12 and 18?",
]


def bench_model(size: str = "tiny", *, sharpen: float = 25.0, block_size: int = 4, seed: int = 0):
    """A random model of a named size with a sharpened, untied output head, in eval mode, float32.

    Args:
        size: a key of :data:`SIZES`.
        sharpen: ``lm_head.weight`` is multiplied by this (1 = the plain random model, whose
            near-uniform predictions commit one token per step).
        block_size, seed: passed to :func:`build_tiny`.

    Returns:
        (model, tokenizer).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    model, tok = build_tiny(block_size=block_size, seed=seed, tie_word_embeddings=False, dtype=torch.float32,
                            **SIZES[size])
    with torch.no_grad():
        model.lm_head.weight.mul_(float(sharpen))
    return model.eval(), tok


def bench_prompts(tokenizer, n: int) -> list[list[int]]:
    """``n`` chat prompts (token ids) of varied lengths, cycling through :data:`PROMPTS`."""
    return [chat_prompt_ids(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def decoded_blocks(rollout: Rollout) -> int:
    """Working blocks the batch decoded: the most any sequence decoded (its forwards are shared).

    A sequence's working blocks run from its first incomplete prompt block to ``stopped_at``.
    """
    b = rollout.block_size
    counts = [
        (end - (len(p) // b) * b) // b
        for p, end in zip(rollout.prompt_ids, rollout.stopped_at)
        if end is not None
    ]
    return max(counts, default=0)


def forwards_per_block(rollout: Rollout) -> float:
    """Model calls per decoded block (``Rollout.num_forwards`` / :func:`decoded_blocks`)."""
    return rollout.num_forwards / max(1, decoded_blocks(rollout))


def mean_tokens_per_step(rollout: Rollout) -> float:
    """Tokens per step (SPEC §3: response tokens / distinct steps), averaged over sequences."""
    return statistics.fmean(rollout.tokens_per_step(i) for i in range(len(rollout)))


def steps_per_block(rollout: Rollout, i: int = 0) -> list[int]:
    """Denoising steps each working block of sequence ``i`` took (= the reference decoder's forwards)."""
    b = rollout.block_size
    prompt = rollout.prompt_ids[i]
    full = [0] * len(prompt) + list(rollout.step_map[i])
    first = len(prompt) // b
    out = []
    for k in range(first, len(full) // b):
        out.append(len({s for s in full[k * b:(k + 1) * b] if s > 0}))
    return out


def fused_commit_check(model, prompt_ids: list[int], max_new_tokens: int, **decode_kw) -> dict[str, Any]:
    """Decode once fused and once unfused (no timing) and compare their forward counts.

    With a prompt holding at least one complete block, the unfused decoder pays one extra
    forward per block (the prefill pass for the first, a cache pass between blocks), so
    the check is ``unfused - fused == blocks``, and both must produce the same tokens.

    Returns:
        dict with ``blocks``, ``forwards_fused``, ``forwards_unfused``, ``per_block_fused``,
        ``per_block_unfused``, ``saved_per_block`` (exact fraction as a float),
        ``same_output`` and ``met`` (saved exactly one per block and same output).
    """
    fused = generate(model, [prompt_ids], max_new_tokens=max_new_tokens, fused_commit=True, seeds=[0], **decode_kw)
    unfused = generate(model, [prompt_ids], max_new_tokens=max_new_tokens, fused_commit=False, seeds=[0],
                       **decode_kw)
    blocks = decoded_blocks(fused)
    same = (fused.response_ids == unfused.response_ids and fused.step_map == unfused.step_map
            and decoded_blocks(unfused) == blocks)
    saved = unfused.num_forwards - fused.num_forwards
    return {
        "blocks": blocks,
        "forwards_fused": fused.num_forwards,
        "forwards_unfused": unfused.num_forwards,
        "per_block_fused": fused.num_forwards / blocks,
        "per_block_unfused": unfused.num_forwards / blocks,
        "saved_per_block": saved / blocks,
        "same_output": same,
        "met": same and saved == blocks,
    }


def rescore_agreement(model, rollout: Rollout, *, batch_size: int = 8) -> dict[str, float]:
    """Packed and per-round rescoring of the same rollouts (no timing), compared.

    Returns:
        dict with ``max_abs_diff`` (packed vs per-round), ``max_abs_diff_recorded`` (packed vs
        the decoder's recorded ``logp``: the consistency invariant), ``tokens`` scored.
    """
    with torch.no_grad():
        packed = rescore(model, rollout, packed=True, batch_size=batch_size)
        per_round = rescore(model, rollout, packed=False, batch_size=batch_size)
    return _agreement(packed, per_round, rollout)


def _agreement(packed, per_round, rollout) -> dict[str, float]:
    diff, diff_rec, n = 0.0, 0.0, 0
    for i, (a, b) in enumerate(zip(packed, per_round)):
        if a.shape != b.shape:
            return {"max_abs_diff": math.inf, "max_abs_diff_recorded": math.inf, "tokens": n}
        if a.numel():
            diff = max(diff, float((a - b).abs().max()))
            diff_rec = max(diff_rec, float((a - torch.tensor(rollout.logp[i])).abs().max()))
        n += a.numel()
    return {"max_abs_diff": diff, "max_abs_diff_recorded": diff_rec, "tokens": n}


def _layout_tokens(rollout: Rollout, batch_size: int = 8) -> dict[str, int]:
    """Sizes of the rescoring layouts: max rounds R, and per variant the tokens of the layouts
    (``sum (R_i+1)·L_i`` packed, ``sum R_i·2·L_i`` per round) and the tokens actually computed
    (rows × padded width, per forward of ``batch_size`` responses, as :func:`rescore` batches them)."""
    from dirl_min.core.rounds import step_rounds

    out = {"max_rounds": 0, "packed": 0, "per_round": 0, "packed_padded": 0, "per_round_padded": 0}
    for start in range(0, len(rollout), batch_size):
        w_packed, w_round, n_round = 0, 0, 0
        idx = range(start, min(start + batch_size, len(rollout)))
        for i in idx:
            length = len(rollout.prompt_ids[i]) + len(rollout.response_ids[i])
            steps = torch.tensor([0] * len(rollout.prompt_ids[i]) + rollout.step_map[i])
            r = step_rounds(steps, rollout.block_size)[0].shape[0]
            out["max_rounds"] = max(out["max_rounds"], r)
            out["packed"] += (r + 1) * length
            out["per_round"] += r * 2 * length
            w_packed, w_round, n_round = max(w_packed, (r + 1) * length), max(w_round, 2 * length), n_round + r
        out["packed_padded"] += len(idx) * w_packed
        out["per_round_padded"] += n_round * w_round
    return out


def choose_reference_tokens(
    new_tokens: int, block_size: int, estimate: Callable[[int], float], budget_s: float
) -> int:
    """Largest of ``new_tokens, new_tokens/2, …`` (whole blocks, at least one) whose estimated
    reference-decoding time fits ``budget_s`` (the smallest candidate if none does)."""
    n = max(block_size, -(-new_tokens // block_size) * block_size)
    while n > block_size and estimate(n) > budget_s:
        n = max(block_size, -(-(n // 2) // block_size) * block_size)
    return n


def _subset(rollout: Rollout, k: int) -> Rollout:
    """The first ``k`` sequences of a rollout (for cheap warm-ups)."""
    lists = {f: getattr(rollout, f)[:k] for f in ("prompt_ids", "response_ids", "step_map", "logp", "truncated",
                                                  "stopped_at", "seeds")}
    return dataclasses.replace(rollout, **lists, text=None if rollout.text is None else rollout.text[:k])


def _n_tokens(rollout: Rollout) -> int:
    return sum(len(r) for r in rollout.response_ids)
