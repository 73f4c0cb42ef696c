"""Slow, obviously-correct block decoding: one sequence, no cache, dense mask, plain loops.

The denoiser is any callable ``denoiser(ids, mask) -> logits`` with ``ids`` int64 ``[T]``
(positions ``0..T-1``), ``mask`` bool ``[T, T]`` (True = may attend) and logits
``[T, V]``. At every step the whole sequence so far (prompt, finished blocks and the
working block) is recomputed with the block-causal mask.
"""

from __future__ import annotations

import math

import torch

M32 = 0xFFFFFFFF


def hash32(x: int) -> int:
    """lowbias32 on Python ints (an independent implementation of the core's torch hash)."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def uniform(seed: int, position: int, step: int, token: int) -> float:
    h = hash32(seed)
    h = hash32(h ^ position)
    h = hash32(h ^ step)
    return (hash32(h ^ token) + 0.5) / 2.0**32


def select_unmask(confidence, is_masked, strategy, threshold=0.9, steps=None):
    """One block's commit choice by sorting a Python list (SPEC §3, step 4)."""
    b = len(is_masked)
    k = max(1, b // (steps or b))
    masked = [j for j in range(b) if is_masked[j]]
    if strategy == "sequential":
        chosen = masked[:k]
    elif strategy == "low_confidence_static":
        chosen = sorted(masked, key=lambda j: (-confidence[j], j))[:k]
    elif strategy == "low_confidence_dynamic":
        best = sorted(masked, key=lambda j: (-confidence[j], j))[:1]
        chosen = best + [j for j in masked if confidence[j] >= threshold]
    else:
        raise ValueError(strategy)
    return [j in chosen for j in range(b)]


def commit_margin(confidence, is_masked, strategy, threshold=0.9, steps=None):
    """How far :func:`select_unmask`'s choice is from a tie: the smallest change of one
    confidence that could change which positions are committed (``inf``: none could)."""
    b = len(is_masked)
    k = max(1, b // (steps or b))
    mc = sorted((confidence[j] for j in range(b) if is_masked[j]), reverse=True)
    if strategy == "low_confidence_static" and len(mc) > k:
        return mc[k - 1] - mc[k]  # the k-th and the (k+1)-th confidence
    if strategy == "low_confidence_dynamic" and mc:
        margin = min(abs(c - threshold) for c in mc)
        if mc[0] < threshold and len(mc) > 1:  # the forced commit of the most confident
            margin = min(margin, mc[0] - mc[1])
        return margin
    return math.inf


def block_causal(length: int, block_size: int) -> torch.Tensor:
    mask = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        for k in range(length):
            mask[q, k] = k // block_size <= q // block_size
    return mask


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _sample(logits, temperature, top_k, top_p, noise, gaps=None):
    """Candidate token index by Gumbel-max over the truncated, tempered logits.

    ``gaps``: a list to which the gap between the best and the second-best perturbed score
    is appended (how far the draw is from a tie)."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda v: -scaled[v])
    top_k = top_k if top_k and top_k < len(scaled) else 0
    allowed = set(order[:top_k]) if top_k else set(order)
    if top_k:  # ties with the k-th value stay in
        kth = scaled[order[top_k - 1]]
        allowed |= {v for v in order if scaled[v] >= kth}
    if top_p < 1.0:
        probs = _softmax([scaled[v] if v in allowed else -math.inf for v in range(len(scaled))])
        nucleus, mass = set(), 0.0
        for v in sorted(allowed, key=lambda v: -probs[v]):
            if mass >= top_p:
                break
            nucleus.add(v)
            mass += probs[v]
        allowed = nucleus
    best, best_v = -math.inf, None
    for v in allowed:
        g = scaled[v] - math.log(-math.log(noise[v]))
        if g > best:
            best, best_v = g, v
    if gaps is not None:
        rest = [scaled[v] - math.log(-math.log(noise[v])) for v in allowed if v != best_v]
        gaps.append(best - max(rest) if rest else math.inf)
    return best_v


def decode(
    denoiser,
    prompt_ids,
    *,
    block_size,
    mask_token_id,
    max_new_tokens=256,
    strategy="low_confidence_dynamic",
    threshold=0.9,
    steps=None,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    stop_token_ids=(),
    seed=0,
):
    """Decode one prompt. Returns dict(response_ids, step_map, logp, truncated, num_forwards, margins).

    ``margins[s - 1]``: how far step ``s`` was from a tie — the smallest gap between the best and
    the second-best candidate token (logit, or perturbed score when sampling) at a masked
    position, or :func:`commit_margin`. Another implementation may decide a step within
    float rounding of a tie differently."""
    B = block_size
    seq = list(prompt_ids)
    given = len(seq)
    first_block = len(seq) // B
    max_blocks = max(1, -(-max_new_tokens // B))
    step_of, logp_of = {}, {}
    step = 0
    truncated = True
    forwards = 0
    margins = []
    for blk in range(first_block, first_block + max_blocks):
        start, end = blk * B, (blk + 1) * B
        seq = seq + [mask_token_id] * (end - len(seq))
        while any(j >= given and j not in step_of for j in range(start, end)):
            logits = denoiser(torch.tensor(seq), block_causal(len(seq), B)).double()
            forwards += 1
            step += 1
            conf, cand, lp, gaps = [], [], [], []
            for j in range(start, end):
                row = logits[j].tolist()
                logp_all = torch.log_softmax(logits[j], dim=-1).tolist()
                proposable = [v for v in range(len(row)) if v != mask_token_id]  # never propose M
                if temperature <= 0:
                    c = max(proposable, key=lambda v: (row[v], -v))
                    conf.append(math.exp(logp_all[c]))
                    gaps.append(row[c] - max((row[v] for v in proposable if v != c), default=-math.inf))
                else:
                    noise = [uniform(seed, j, step, v) for v in range(len(row))]
                    c = _sample([x if v != mask_token_id else -math.inf for v, x in enumerate(row)],
                                temperature, top_k, top_p, noise, gaps)
                    conf.append(_softmax([x / temperature for x in row])[c])
                cand.append(c)
                lp.append(logp_all[c])
            masked = [j >= given and j not in step_of for j in range(start, end)]
            commit = select_unmask(conf, masked, strategy, threshold, steps)
            margins.append(min([g for g, m in zip(gaps, masked) if m]
                               + [commit_margin(conf, masked, strategy, threshold, steps)]))
            for o, j in enumerate(range(start, end)):
                if commit[o]:
                    seq[j] = cand[o]
                    step_of[j], logp_of[j] = step, lp[o]
        if any(seq[j] in stop_token_ids for j in range(max(start, given), end)):
            truncated = False
            break
    resp = range(given, len(seq))
    return {
        "response_ids": [seq[j] for j in resp],
        "step_map": [step_of[j] for j in resp],
        "logp": [logp_of[j] for j in resp],
        "truncated": truncated,
        "num_forwards": forwards,
        "margins": margins,
    }
