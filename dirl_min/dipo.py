"""DiPO: step-level policy optimisation for block diffusion (SPEC §4).

A rollout records, for each generated token, the denoising step that committed it
(``step_map``). :func:`step_rounds` turns that into rounds: in round ρ every block
shows the state it had just before its ρ-th step, and the targets are the tokens
that step committed. Scoring the rounds in the layout ``[x_t^1; …; x_t^R; x_0]``
(:func:`build_layout`, :func:`rescore`) gives every token's log-probability in the
very context in which it was decoded, so the trainer's ``ℓ`` equals the decoder's
recorded ``logp`` (the consistency invariant, tested). :func:`dipo_loss` is the
clipped, token-mean objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dirl_min.forward import SelectedLogits, attention_backend, layout_attention_mask, layout_logits
from dirl_min.sharding import fsdp_states

__all__ = [
    "step_rounds",
    "group_advantages",
    "filter_groups",
    "GROUP_FILTERS",
    "dipo_loss",
    "LayoutBatch",
    "build_layout",
    "layout_logp",
    "rounds_logp",
    "rollout_rounds",
    "rescore",
]


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


def group_advantages(rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages ``(r - mean_G) / (std_G + eps)`` (population std).

    Args:
        rewards: float ``[num_groups · G]``, groups contiguous.
        group_size: G.

    Returns:
        float ``[num_groups · G]``; exactly 0 in groups whose rewards are all equal.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64).view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    # "all equal" is tested directly: a rounded mean would leave std ≈ 1e-17, not 0
    spread = ~(r == r[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(spread, (r - mean) / (std + eps), torch.zeros_like(r))
    return adv.view(-1).float()


#: ``rl.group_filter`` rules of :func:`filter_groups`.
GROUP_FILTERS = ("reward_std", "accuracy")


def filter_groups(rewards: torch.Tensor, group_size: int, *, correct: torch.Tensor | None = None,
                  rule: str = "reward_std") -> torch.Tensor:
    """Dynamic sampling: which groups carry a learning signal.

    ``reward_std`` (DiRL, "zero advantage standard deviation" filtered out): keep groups
    whose rewards are not all equal, i.e. whose :func:`group_advantages` are not all zero.
    With the speed reward an all-correct group whose responses decoded at different speeds
    is kept: speed is all it can teach. ``accuracy`` (DAPO): keep groups whose accuracy is
    neither all 0 nor all 1. The two agree when the reward is accuracy alone.

    Args:
        rewards: float ``[num_groups · G]``, groups contiguous.
        group_size: G.
        correct: float/bool ``[num_groups · G]`` (1 = correct), same order; needed by ``accuracy``.
        rule: ``reward_std`` or ``accuracy``.

    Returns:
        bool ``[num_groups]``.
    """
    if rule == "reward_std":
        r = torch.as_tensor(rewards, dtype=torch.float64).view(-1, group_size)
        return ~(r == r[:, :1]).all(dim=1)  # the same "all equal" test as group_advantages
    if rule == "accuracy":
        if correct is None:
            raise ValueError("filter_groups(rule='accuracy') needs correct (0/1 per response)")
        acc = torch.as_tensor(correct, dtype=torch.float32).view(-1, group_size).mean(dim=1)
        return (acc > 0) & (acc < 1)
    raise ValueError(f"rl.group_filter must be one of {GROUP_FILTERS}, not {rule!r}")


def dipo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    beta: float = 0.0,
    logp_ref: torch.Tensor | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DiPO objective (SPEC §4.6): clipped surrogate, token mean, optional k3 KL.

    Args:
        logp: float ``[N, L]`` current log-probs (with grad).
        logp_old: float ``[N, L]`` log-probs of the sampling policy (no grad).
        advantages: float ``[N]``, one per sequence.
        target_mask: bool ``[N, L]``, the response tokens that count.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``.
        beta: weight of the k3 KL to ``logp_ref`` (float ``[N, L]``, required if beta > 0).
        num_tokens: the normaliser ``N_tok``; default ``target_mask.sum()``. Pass the
            whole batch's count when a batch is split into micro-batches or processes.

    Returns:
        ``(loss, stats)``: a scalar tensor, and floats ``clip_frac`` (targets where the
        clip is active), ``ratio_mean``, ``approx_kl`` (k3 of old vs new), ``kl_ref``.
    """
    mask = target_mask.to(logp.dtype)
    n_tok = mask.sum().clamp(min=1) if num_tokens is None else torch.as_tensor(float(num_tokens))
    adv = advantages.to(logp.dtype)[:, None]
    log_ratio = (logp - logp_old).clamp(-10.0, 10.0)
    ratio = log_ratio.exp()
    surr_unclipped = ratio * adv
    surr_clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    surr = torch.minimum(surr_unclipped, surr_clipped)
    loss = -(surr * mask).sum() / n_tok
    kl_ref = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if beta > 0:
        if logp_ref is None:
            raise ValueError("beta > 0 needs logp_ref (log-probs of the frozen reference model)")
        d = logp_ref - logp
        kl_ref = ((d.exp() - 1 - d) * mask).sum() / n_tok
        loss = loss + beta * kl_ref
    with torch.no_grad():
        denom = mask.sum().clamp(min=1)
        d_old = (-log_ratio).detach()
        stats = {
            "clip_frac": float(((surr_clipped < surr_unclipped).to(logp.dtype) * mask).sum() / denom),
            "ratio_mean": float((ratio * mask).sum() / denom),
            "approx_kl": float(((d_old.exp() - 1 - d_old) * mask).sum() / denom),
            "kl_ref": float(kl_ref),
        }
    return loss, stats


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


def layout_logp(model, batch: LayoutBatch, *, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probabilities of the clean tokens at the selected positions.

    Returns:
        float32 ``[batch.select.sum()]`` in row-major order of ``batch.select`` (with grad
        if the model is in a grad context); with ``with_entropy`` also the (detached)
        entropy of the predicted distribution at each of those positions.
    """
    dev = next(model.parameters()).device  # works through DDP / SelectedLogits wrappers too
    b = {k: getattr(batch, k).to(dev) for k in ("input_ids", "seg", "pos", "copy", "clean_copy", "select", "target_ids")}
    logp, entropy = layout_logits(
        model, b["input_ids"], b["seg"], b["pos"], b["copy"], b["clean_copy"], batch.block_size, b["select"],
        targets=b["target_ids"][b["select"]], temperature=temperature)
    return (logp, entropy) if with_entropy else logp


def rounds_logp(model, clean_ids, noisy, targets, mask_token_id: int, block_size: int, *,
                with_entropy: bool = False):
    """Log-probs of every round's targets, with each clean sequence run once (SPEC §4.5).

    A noisy copy only attends to itself inside its block and to *clean* earlier blocks,
    and clean tokens never attend to noisy ones. So the clean ``x_0`` of each response is
    run once (block-causally) and every round ``x_t^ρ`` is a row of queries against its
    keys/values plus its own: the same numbers as the packed layout
    ``[x_t^1; …; x_t^R; x_0]``. A round row holds only the blocks from the first generated
    token on (``L_r`` of them; prompt blocks are never targets), so the cost is
    ``L² + R·L_r(L + L_r)`` instead of ``(R+1)²L²``. SFT is the case ``R = 1``.

    Args:
        model: a causal LM or a (possibly distributed-wrapped) :class:`SelectedLogits`.
        clean_ids: per response, int64 ``[L_i]``.
        noisy, targets: per response, bool ``[R_i, L_i]`` (:func:`step_rounds`).

    With flex_attention (GPU) the single packed row ``[x_t^1; …; x_t^R; x_0]`` is used
    instead: its ``BlockMask`` skips the masked-out blocks, so it wastes nothing there.
    A model sharded by FSDP2 also gets the packed row: the prefix's K/V reach the rounds as
    side outputs of its layers, which FSDP2's backward hooks (on layer outputs) do not see, so
    the layers' parameters would be sharded again when the gradient reaches them.

    Returns:
        ``(logp, response, position)`` float32 / int64 / int64 ``[num_targets]`` (and the
        detached entropy ``[num_targets]`` as a fourth item with ``with_entropy``).
    """
    if attention_backend(model) == "flex_attention" or fsdp_states(model):
        batch = build_layout(clean_ids, noisy, targets, mask_token_id, block_size)
        out = layout_logp(model, batch, with_entropy=with_entropy)
        row, col = batch.select.nonzero(as_tuple=True)
        logp, rest = (out[0], out[1:]) if with_entropy else (out, ())
        return (logp, batch.example[row, col], batch.pos[row, col], *rest)
    dev = next(model.parameters()).device
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
    # pass 1: clean rows, block-causal (copy 0 is the clean copy here)
    zeros = torch.zeros_like(seg0)
    mask0 = layout_attention_mask(model, seg0.to(dev), pos.to(dev), zeros.to(dev), 0, block_size)
    # pass 2: each round row's queries against [its clean row ; itself] (clean = copy 1, noisy = copy 0)
    seg2 = torch.cat([seg0[owner], torch.where(valid, 0, -1)], dim=1)
    pos2 = torch.cat([pos[owner], cols], dim=1)
    copy2 = torch.cat([torch.ones(rows, width, dtype=torch.long), torch.zeros(rows, span, dtype=torch.long)], 1)
    mask2 = layout_attention_mask(model, seg2.to(dev), pos2.to(dev), copy2.to(dev), 1, block_size, num_queries=span)
    net = model if isinstance(model, SelectedLogits) or hasattr(model, "module") else SelectedLogits(model)
    row, col = select.nonzero(as_tuple=True)
    col = cols[row, col]
    logp, entropy = net(xt.to(dev), cols.to(dev), mask2, select.to(dev),
                        prefix=(x0.to(dev), pos.to(dev), mask0, owner.to(dev)), targets=x0[owner[row], col].to(dev))
    return (logp, owner[row], col, entropy) if with_entropy else (logp, owner[row], col)


def rollout_rounds(rollout, i: int):
    """Sequence ``i`` of a rollout as ``(clean ids [L], noisy [R, L], targets [R, L])`` (:func:`step_rounds`)."""
    x0 = torch.tensor(rollout.prompt_ids[i] + rollout.response_ids[i], dtype=torch.long)
    full_steps = torch.tensor([0] * len(rollout.prompt_ids[i]) + rollout.step_map[i], dtype=torch.long)
    noisy, targets = step_rounds(full_steps, rollout.block_size)
    return x0, noisy, targets


def rescore(model, rollout, *, packed: bool = True, batch_size: int = 8) -> list[torch.Tensor]:
    """Recompute every generated token's log-probability from its ``step_map``.

    Args:
        model: the policy (same weights as the decoder's for the consistency check).
        rollout: a :class:`dirl_min.decoding.Rollout`.
        packed: one ``[x_t^1; …; x_t^R; x_0]`` row per response (default), or one
            ``[x_t^ρ ; x_0]`` row per round (for comparison).
        batch_size: responses per forward.

    Returns:
        per sequence, float32 ``[len(response_ids[i])]`` aligned with ``rollout.logp[i]``
        (differentiable when called under grad).
    """
    out: list[torch.Tensor] = []
    for start in range(0, len(rollout), batch_size):
        idx = list(range(start, min(start + batch_size, len(rollout))))
        items = [rollout_rounds(rollout, i) for i in idx]
        if packed:
            logp, resp, position = rounds_logp(model, *zip(*items), rollout.mask_token_id, rollout.block_size)
            owner = torch.tensor(idx)[resp]
        else:
            # each round of each response is its own [x_t^ρ ; x_0] row
            examples = [(x0, nz[r:r + 1], tg[r:r + 1]) for x0, nz, tg in items for r in range(len(nz))]
            batch = build_layout(*zip(*examples), rollout.mask_token_id, rollout.block_size)
            logp = layout_logp(model, batch)
            row, col = batch.select.nonzero(as_tuple=True)
            owner = torch.tensor([i for i, (_, nz, _) in zip(idx, items) for _ in range(len(nz))])[batch.example[row, col]]
            position = batch.pos[row, col]
        logp = logp.cpu()
        for i in idx:
            sel = owner == i
            # each generated position is a target exactly once: sorting by position aligns it
            out.append(logp[sel][torch.argsort(position[sel])])
    return out
