"""Slow, obviously-correct attention masks written straight from SPEC §2 and §4.5.

Every function is a Python double loop over (query, key) that applies the SPEC's
clauses literally; nothing is shared with ``dirl_min.masking``.
"""

from __future__ import annotations

import torch


def block_causal_mask(L: int, B: int) -> torch.Tensor:
    """One clean sequence: query q may attend key k iff ``k // B <= q // B``."""
    mask = [[False] * L for _ in range(L)]
    for q in range(L):
        for k in range(L):
            mask[q][k] = (k // B) <= (q // B)
    return torch.tensor(mask, dtype=torch.bool).reshape(L, L)


def block_diffusion_mask(L: int, B: int) -> torch.Tensor:
    """SFT layout ``[x_t ; x_0]`` of length 2L (SPEC §2), the three clauses verbatim."""
    n = 2 * L
    mask = [[False] * n for _ in range(n)]
    for q in range(n):
        for k in range(n):
            hq, hk = q >= L, k >= L  # False = noisy half, True = clean half
            bq, bk = (q - hq * L) // B, (k - hk * L) // B
            ok = False
            if hq == hk and bk == bq:  # inside a block, both halves
                ok = True
            if (not hq) and hk and bk < bq:  # noisy sees earlier clean blocks
                ok = True
            if hq and hk and bk <= bq:  # clean half is block-causal
                ok = True
            mask[q][k] = ok
    return torch.tensor(mask, dtype=torch.bool).reshape(n, n)


def packed_rounds_mask(R: int, L: int, B: int) -> torch.Tensor:
    """DiPO packed layout ``[x_t^1; …; x_t^R; x_0]`` (SPEC §4.5): copies 0..R-1 noisy, copy R clean.

    A noisy copy sees its own block in its own copy and earlier blocks of the clean
    copy, never another noisy copy; the clean copy is block-causal.
    """
    n = (R + 1) * L
    mask = [[False] * n for _ in range(n)]
    for q in range(n):
        for k in range(n):
            cq, ck = q // L, k // L
            bq, bk = (q % L) // B, (k % L) // B
            q_clean, k_clean = cq == R, ck == R
            if not q_clean:
                if cq == ck:
                    ok = bk == bq
                elif k_clean:
                    ok = bk < bq
                else:
                    ok = False
            else:
                ok = k_clean and bk <= bq
            mask[q][k] = ok
    return torch.tensor(mask, dtype=torch.bool).reshape(n, n)


def packed_mask(examples: list[tuple[int, int]], B: int, total: int | None = None) -> torch.Tensor:
    """Several examples packed in one row, each ``(R, L)`` laid out as ``packed_rounds_mask(R, L, B)``.

    ``R = 0`` is a plain block-causal sequence. Block-diagonal over examples; ``total``
    pads the row with padding tokens (no real query sees them; padding queries see
    everything, as the core documents).
    """
    sizes = [(R + 1) * L for R, L in examples]
    n = sum(sizes) if total is None else total
    mask = [[False] * n for _ in range(n)]
    start = 0
    for (R, L), size in zip(examples, sizes):
        sub = (block_causal_mask(L, B) if R == 0 else packed_rounds_mask(R, L, B)).tolist()
        for q in range(size):
            for k in range(size):
                mask[start + q][start + k] = sub[q][k]
        start += size
    for q in range(start, n):  # padding queries
        for k in range(n):
            mask[q][k] = True
    return torch.tensor(mask, dtype=torch.bool).reshape(n, n)
