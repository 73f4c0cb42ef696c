"""Slow, obviously-correct pieces of the RL objectives (dirl_min.core.estimates / objectives), in loops."""

from __future__ import annotations

import math


def merge_rounds(step_map: list[int], B: int, s: int) -> tuple[list[list[bool]], list[list[bool]]]:
    """TraceRL's shrinkage by loops over blocks: in block k, with ``steps`` its sorted distinct nonzero
    steps, round ρ reads the tokens of steps ``steps[ρs : (ρ+1)s]`` from the state before
    ``steps[ρs]`` (masked: positions with a step >= it). Rounds = max over blocks of ⌈distinct/s⌉."""
    L = len(step_map)
    blocks = [list(range(b, min(b + B, L))) for b in range(0, L, B)]
    distinct = [sorted({step_map[j] for j in blk if step_map[j] > 0}) for blk in blocks]
    R = max((math.ceil(len(d) / s) for d in distinct), default=0)
    noisy = [[False] * L for _ in range(R)]
    targets = [[False] * L for _ in range(R)]
    for blk, steps in zip(blocks, distinct):
        for rho in range(math.ceil(len(steps) / s)):
            group = steps[rho * s:(rho + 1) * s]
            for j in blk:
                targets[rho][j] = step_map[j] in group
                noisy[rho][j] = step_map[j] >= group[0]
    return noisy, targets


def policy_loss(logp, logp_old, adv, resp, lengths, mean, num_tokens, num_sequences, eps_low, eps_high):
    """The clipped surrogate token by token in Python floats: ``token`` mean = Σ_j surr_j / N_tok,
    ``sequence`` mean = Σ_i (1/|o_i|) Σ_{j∈i} surr_j / N_seq (GRPO). ``adv`` is per token."""
    total = 0.0
    for j in range(len(logp)):
        ratio = math.exp(min(max(logp[j] - logp_old[j], -10.0), 10.0))
        surr = min(ratio * adv[j], min(max(ratio, 1 - eps_low), 1 + eps_high) * adv[j])
        total += surr if mean == "token" else surr / lengths[resp[j]]
    return -total / (num_tokens if mean == "token" else num_sequences)
