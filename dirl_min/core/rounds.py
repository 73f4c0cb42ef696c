"""DiPO step rounds and the packed layout ``[x_t^1; …; x_t^R; x_0]`` (SPEC §4.4–4.5): index math only.

A rollout records, for each generated token, the denoising step that committed it
(``step_map``). :func:`step_rounds` turns that into rounds: in round ρ every block
shows the state it had just before its ρ-th step, and the targets are the tokens
that step committed. :func:`build_layout` stacks the rounds of several examples into
padded rows; the model is run on them in :mod:`dirl_min.engine.score`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["step_rounds", "LayoutBatch", "build_layout", "RoundQueries", "round_queries"]


def step_rounds(step_map: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand one sequence's step map into DiPO step rounds (SPEC §4.4).

    Args:
        step_map: int64 ``[L]`` over the whole sequence (prompt included): 0 on given
            tokens, the 1-based global step that committed each generated token.
        block_size: B; blocks are ``[kB, (k+1)B)`` from position 0.

    Returns:
        ``(noisy, targets)``, bool ``[R, L]`` each, ``R`` = the largest number of distinct
        steps in any block. In round ρ, block k's positions with ``step >= s_k(ρ)`` are
        masked (``noisy``) and those with ``step == s_k(ρ)`` are the targets, where
        ``s_k(ρ)`` is the ρ-th smallest distinct nonzero step of block k. Every generated
        token is a target exactly once.
    """
    step_map = torch.as_tensor(step_map, dtype=torch.long)
    length = step_map.shape[0]
    n_blocks = -(-length // block_size)
    s = torch.zeros(n_blocks * block_size, dtype=torch.long, device=step_map.device)
    s[:length] = step_map
    s = s.view(n_blocks, block_size)
    j = torch.arange(block_size, device=s.device)
    same = s[:, :, None] == s[:, None, :]  # [blocks, m, m']
    first = ~(same & (j[None, None, :] < j[None, :, None])).any(dim=2)  # m is its value's first occurrence
    distinct = first & (s > 0)
    # rank of position j = distinct nonzero steps in its block smaller than its own step
    rank = (distinct[:, None, :] & (s[:, None, :] < s[:, :, None])).sum(dim=2)
    rank = rank.view(-1)[:length]
    generated = step_map > 0
    num_rounds = int(rank[generated].max()) + 1 if generated.any() else 0
    rounds = torch.arange(num_rounds, device=s.device)[:, None]
    targets = generated[None] & (rank[None] == rounds)
    noisy = generated[None] & (rank[None] >= rounds)
    return noisy, targets


@dataclass
class LayoutBatch:
    """A padded batch of ``[x_t^1; …; x_t^R; x_0]`` layouts.

    Tensors are ``[N, T]``; ``clean_copy`` is ``[N]`` (= R of each row). ``select`` marks
    the target positions (in noisy copies) whose logits are needed, ``target_ids`` holds
    the clean token at every position, ``example`` the index of the example a token
    belongs to (-1 on padding): a row holds one example, or several when packed.
    """

    input_ids: torch.Tensor
    seg: torch.Tensor
    pos: torch.Tensor
    copy: torch.Tensor
    clean_copy: torch.Tensor
    select: torch.Tensor
    target_ids: torch.Tensor
    example: torch.Tensor
    block_size: int


def build_layout(
    clean_ids: list[torch.Tensor],
    noisy: list[torch.Tensor],
    targets: list[torch.Tensor],
    mask_token_id: int,
    block_size: int,
    *,
    pack_tokens: int = 0,
) -> LayoutBatch:
    """Stack examples into padded ``[x_t^1; …; x_t^R; x_0]`` rows.

    Args:
        clean_ids: per example, int64 ``[L_i]`` (prompt + response).
        noisy: per example, bool ``[R_i, L_i]``: which positions each noisy copy masks.
        targets: per example, bool ``[R_i, L_i]``: where each copy's logits are scored.
        mask_token_id, block_size: M and B.
        pack_tokens: if > 0, consecutive examples with the same R share a row while it
            holds at most this many tokens; each keeps its own positions (block grid) and
            the mask is block-diagonal over examples.

    Returns:
        a :class:`LayoutBatch` (SFT is the case ``R_i = 1``).
    """
    pieces = []
    for x0, nz, tg in zip(clean_ids, noisy, targets):
        r, length = nz.shape
        copies = torch.where(nz, torch.full_like(nz, mask_token_id, dtype=torch.long), x0[None].expand(r, length))
        pieces.append({
            "input_ids": torch.cat([copies.reshape(-1), x0]),
            "pos": torch.arange(length).repeat(r + 1),
            "copy": torch.arange(r + 1).repeat_interleave(length),
            "select": torch.cat([tg.reshape(-1), torch.zeros(length, dtype=torch.bool)]),
            "target_ids": x0.repeat(r + 1),
            "rounds": r,
        })
    rows: list[list[int]] = []
    for i, piece in enumerate(pieces):
        last = rows[-1] if rows else None
        if (pack_tokens and last and pieces[last[0]]["rounds"] == piece["rounds"]
                and sum(len(pieces[j]["input_ids"]) for j in last) + len(piece["input_ids"]) <= pack_tokens):
            last.append(i)
        else:
            rows.append([i])
    width = max(sum(len(pieces[j]["input_ids"]) for j in row) for row in rows)
    n = len(rows)
    out = {
        "input_ids": torch.full((n, width), mask_token_id, dtype=torch.long),
        "seg": torch.full((n, width), -1, dtype=torch.long),
        "pos": torch.zeros((n, width), dtype=torch.long),
        "copy": torch.zeros((n, width), dtype=torch.long),
        "select": torch.zeros((n, width), dtype=torch.bool),
        "target_ids": torch.zeros((n, width), dtype=torch.long),
        "example": torch.full((n, width), -1, dtype=torch.long),
    }
    for i, row in enumerate(rows):
        start = 0
        for k, j in enumerate(row):
            piece, t = pieces[j], len(pieces[j]["input_ids"])
            for name in ("input_ids", "pos", "copy", "select", "target_ids"):
                out[name][i, start:start + t] = piece[name]
            out["seg"][i, start:start + t] = k
            out["example"][i, start:start + t] = j
            start += t
    clean_copy = torch.tensor([pieces[row[0]]["rounds"] for row in rows], dtype=torch.long)
    return LayoutBatch(clean_copy=clean_copy, block_size=block_size, **out)


class RoundQueries(NamedTuple):
    """The two passes of :func:`dirl_min.engine.score.rounds_logp`, as index tensors.

    Pass 1 runs the clean sequences ``x0`` ``[n, W]`` block-causally (``seg0`` ``[n, W]``: 0 on
    tokens, -1 on padding; ``pos`` ``[n, W]``). Pass 2 runs one row per round (``owner``
    ``[rows]``: its response) of ``span`` queries ``xt`` ``[rows, span]`` at positions ``cols``
    ``[rows, span]`` against ``[its clean row ; itself]``, described by ``seg2``, ``pos2``,
    ``copy2`` ``[rows, W + span]`` (clean = copy 1, noisy = copy 0); ``select``
    ``[rows, span]`` marks the round's targets among the queries.
    """

    x0: torch.Tensor
    seg0: torch.Tensor
    pos: torch.Tensor
    owner: torch.Tensor
    xt: torch.Tensor
    cols: torch.Tensor
    select: torch.Tensor
    seg2: torch.Tensor
    pos2: torch.Tensor
    copy2: torch.Tensor


def round_queries(clean_ids: list[torch.Tensor], noisy: list[torch.Tensor], targets: list[torch.Tensor],
                  mask_token_id: int, block_size: int) -> RoundQueries:
    """The index tensors of :class:`RoundQueries` for responses ``clean_ids`` (int64 ``[L_i]``) and their
    rounds ``noisy``, ``targets`` (bool ``[R_i, L_i]``, :func:`step_rounds`)."""
    n, width = len(clean_ids), max(len(x) for x in clean_ids)
    x0 = torch.full((n, width), mask_token_id, dtype=torch.long)
    seg0 = torch.full((n, width), -1, dtype=torch.long)
    for i, x in enumerate(clean_ids):
        x0[i, : len(x)] = x
        seg0[i, : len(x)] = 0
    pos = torch.arange(width).expand(n, width)
    owner = torch.tensor([i for i, nz in enumerate(noisy) for _ in range(len(nz))], dtype=torch.long)
    rows = len(owner)
    masked = torch.zeros(rows, width, dtype=torch.bool)
    select = torch.zeros(rows, width, dtype=torch.bool)
    masked_rows = [m for nz in noisy for m in nz]
    for r, (m, t) in enumerate(zip(masked_rows, [t for tg in targets for t in tg])):
        masked[r, : len(m)] = m
        select[r, : len(t)] = t
    # A round row's prompt blocks are never targets and no target attends to them (they are
    # clean in x_0), so its queries start at the block holding the first generated token.
    lengths = torch.tensor([len(x) for x in clean_ids])
    starts = torch.tensor([int(nz.any(0).nonzero()[0]) // block_size * block_size if nz.any() else len(x)
                           for x, nz in zip(clean_ids, noisy)], dtype=torch.long)
    span = max(1, int((lengths - starts).max()))
    cols = starts[owner][:, None] + torch.arange(span)  # [rows, span]: each query's position
    valid = cols < lengths[owner][:, None]
    cols = cols.clamp(max=width - 1)
    masked, select = masked.gather(1, cols) & valid, select.gather(1, cols) & valid
    xt = x0[owner].gather(1, cols).masked_fill(masked, mask_token_id)
    seg2 = torch.cat([seg0[owner], torch.where(valid, 0, -1)], dim=1)
    pos2 = torch.cat([pos[owner], cols], dim=1)
    copy2 = torch.cat([torch.ones(rows, width, dtype=torch.long), torch.zeros(rows, span, dtype=torch.long)], 1)
    return RoundQueries(x0, seg0, pos, owner, xt, cols, select, seg2, pos2, copy2)
