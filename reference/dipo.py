"""Slow, obviously-correct DiPO pieces written straight from SPEC §4 (plain Python loops)."""

from __future__ import annotations

import math
import statistics


def step_rounds(step_map: list[int], B: int) -> tuple[list[list[bool]], list[list[bool]]]:
    """Step rounds by loops over blocks (SPEC §4.4).

    For block k, ``s_k`` = its sorted distinct nonzero steps. Round ρ: targets are the
    positions of block k with ``step == s_k(ρ)``; noisy are the positions of block k with
    ``step >= s_k(ρ)`` and ``step > 0``. Blocks with fewer than ρ+1 distinct steps have
    nothing noisy and no targets in round ρ. R = max distinct steps in any block.
    """
    L = len(step_map)
    blocks = [list(range(s, min(s + B, L))) for s in range(0, L, B)]
    distinct = [sorted({step_map[j] for j in blk if step_map[j] > 0}) for blk in blocks]
    R = max((len(d) for d in distinct), default=0)
    noisy = [[False] * L for _ in range(R)]
    targets = [[False] * L for _ in range(R)]
    for blk, steps in zip(blocks, distinct):
        for rho, s in enumerate(steps):
            for j in blk:
                if step_map[j] == s:
                    targets[rho][j] = True
                if step_map[j] >= s and step_map[j] > 0:
                    noisy[rho][j] = True
    return noisy, targets


def group_advantages(rewards: list[float], G: int, eps: float = 1e-6) -> list[float]:
    """``(r - mean) / (std + eps)`` per contiguous group, population std; 0 if std == 0."""
    out = []
    for g in range(0, len(rewards), G):
        grp = [float(r) for r in rewards[g:g + G]]
        # statistics computes mean and pstdev exactly (rationals), so all-equal -> std == 0.0
        mean = statistics.mean(grp)
        std = statistics.pstdev(grp)
        for r in grp:
            out.append(0.0 if std == 0 else (r - mean) / (std + eps))
    return out


def filter_groups(rewards: list[float], G: int, correct: list[float] | None = None,
                  rule: str = "reward_std") -> list[bool]:
    """Per group: ``reward_std`` keeps it if the population std of its rewards is > 0 (DiRL);
    ``accuracy`` keeps it if its mean accuracy is strictly between 0 and 1 (DAPO)."""
    keep = []
    for g in range(0, len(rewards), G):
        if rule == "reward_std":
            # statistics works in exact rationals: all-equal rewards give exactly 0.0
            keep.append(statistics.pstdev([float(r) for r in rewards[g:g + G]]) > 0)
        else:
            grp = [float(c) for c in correct[g:g + G]]
            keep.append(0 < sum(grp) / len(grp) < 1)
    return keep


def dipo_loss(
    logp: list[list[float]],
    logp_old: list[list[float]],
    advantages: list[float],
    target_mask: list[list[bool]],
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    beta: float = 0.0,
    logp_ref: list[list[float]] | None = None,
    num_tokens: float | None = None,
) -> tuple[float, float]:
    """Token-by-token DiPO loss (SPEC §4.6) in Python floats. Returns ``(loss, clip_frac)``.

    ``clip_frac`` = fraction of target tokens where the clipped surrogate is strictly
    smaller than the unclipped one (the clip is what the min picks and it changes the value).
    """
    if beta > 0 and logp_ref is None:
        raise ValueError("beta > 0 needs logp_ref")
    surr_sum, kl_sum, n, clipped = 0.0, 0.0, 0, 0
    for i, row in enumerate(target_mask):
        A = float(advantages[i])
        for j, is_target in enumerate(row):
            if not is_target:
                continue
            n += 1
            l, lo = float(logp[i][j]), float(logp_old[i][j])
            ratio = math.exp(min(max(l - lo, -10.0), 10.0))
            unclipped = ratio * A
            clipped_v = min(max(ratio, 1 - eps_low), 1 + eps_high) * A
            surr_sum += min(unclipped, clipped_v)
            if clipped_v < unclipped:
                clipped += 1
            if beta > 0:
                d = float(logp_ref[i][j]) - l
                kl_sum += math.exp(d) - 1 - d
    n_tok = max(n, 1) if num_tokens is None else float(num_tokens)
    loss = -surr_sum / n_tok + beta * kl_sum / n_tok
    return loss, clipped / max(n, 1)
