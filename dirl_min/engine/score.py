"""Scoring rollouts with the model (SPEC §4.5): log-probs of the layout rows and of step rounds, rescore.

Scoring the rounds of :func:`dirl_min.core.rounds.step_rounds` in the layout
``[x_t^1; …; x_t^R; x_0]`` (:func:`rounds_logp`, :func:`rescore`) gives every token's
log-probability in the very context in which it was decoded, so the trainer's ``ℓ``
equals the decoder's recorded ``logp`` (the consistency invariant, tested). SFT scores its
masked copies the same way (the case ``R = 1``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dirl_min.core.estimates import ObjectiveSpec, Views, objective_views, record, view_seed
from dirl_min.core.rounds import LayoutBatch, build_layout, round_queries, step_rounds
from dirl_min.model.forward import SelectedLogits, attention_backend, layout_attention_mask, layout_logp_entropy
from dirl_min.infra.sharding import fsdp_states

__all__ = ["LayoutBatch", "build_layout", "layout_logp", "RoundsLogp", "rounds_logp", "rollout_rounds", "rollout_views",
           "rescore"]


def layout_logp(model, batch: LayoutBatch, *, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the clean tokens at the selected positions, and their entropies.

    Returns:
        ``(logp, entropy)``: float32 ``[batch.select.sum()]`` each, in row-major order of
        ``batch.select``; ``logp`` with grad if the model is in a grad context, ``entropy``
        (of the predicted distribution at each of those positions) detached.
    """
    dev = next(model.parameters()).device  # works through DDP / SelectedLogits wrappers too
    b = {k: getattr(batch, k).to(dev) for k in ("input_ids", "seg", "pos", "copy", "clean_copy", "select", "target_ids")}
    logp, entropy = layout_logp_entropy(
        model, b["input_ids"], b["seg"], b["pos"], b["copy"], b["clean_copy"], batch.block_size, b["select"],
        b["target_ids"][b["select"]], temperature=temperature)
    return logp, entropy


class RoundsLogp(NamedTuple):
    """What :func:`rounds_logp` returns: one entry per target, all ``[num_targets]``."""

    logp: torch.Tensor  #: float32, with grad in a grad context
    resp: torch.Tensor  #: int64, the index of the response (into ``clean_ids``) the target belongs to
    position: torch.Tensor  #: int64, the target's position in its response's clean sequence
    entropy: torch.Tensor  #: float32, detached: entropy of the predicted distribution


def rounds_logp(model, clean_ids, noisy, targets, mask_token_id: int, block_size: int, *,
                labels=None) -> RoundsLogp:
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
        noisy, targets: per response, bool ``[R_i, L_i]`` (:func:`~dirl_min.core.rounds.step_rounds`).
        labels: per response, int64 ``[L_i]``: the tokens whose log-probs are read; default
            ``clean_ids``. They differ when the context row is itself partly masked (d1's view,
            :func:`dirl_min.core.estimates.one_step_views`).

    With flex_attention (GPU) the single packed row ``[x_t^1; …; x_t^R; x_0]`` is used
    instead: its ``BlockMask`` skips the masked-out blocks, so it wastes nothing there.
    A model sharded by FSDP2 also gets the packed row: the prefix's K/V reach the rounds as
    side outputs of its layers, which FSDP2's backward hooks (on layer outputs) do not see, so
    the layers' parameters would be sharded again when the gradient reaches them.

    Returns:
        a :class:`RoundsLogp` ``(logp, resp, position, entropy)``, each ``[num_targets]``.
    """
    if attention_backend(model) == "flex_attention" or fsdp_states(model):
        batch = build_layout(clean_ids, noisy, targets, mask_token_id, block_size)
        if labels is not None:
            lab = _padded(labels)
            batch.target_ids = torch.where(batch.example >= 0, lab[batch.example.clamp(min=0), batch.pos], 0)
        logp, entropy = layout_logp(model, batch)
        row, col = batch.select.nonzero(as_tuple=True)
        return RoundsLogp(logp, batch.example[row, col], batch.pos[row, col], entropy)
    dev = next(model.parameters()).device
    q = round_queries(clean_ids, noisy, targets, mask_token_id, block_size)
    # pass 1: clean rows, block-causal (copy 0 is the clean copy here)
    zeros = torch.zeros_like(q.seg0)
    mask0 = layout_attention_mask(model, q.seg0.to(dev), q.pos.to(dev), zeros.to(dev), 0, block_size)
    # pass 2: each round row's queries against [its clean row ; itself] (clean = copy 1, noisy = copy 0)
    mask2 = layout_attention_mask(model, q.seg2.to(dev), q.pos2.to(dev), q.copy2.to(dev), 1, block_size,
                                  num_queries=q.cols.shape[1])
    net = model if isinstance(model, SelectedLogits) or hasattr(model, "module") else SelectedLogits(model)
    row, col = q.select.nonzero(as_tuple=True)
    col = q.cols[row, col]
    logp, entropy = net(q.xt.to(dev), q.cols.to(dev), mask2, q.select.to(dev),
                        prefix=(q.x0.to(dev), q.pos.to(dev), mask0, q.owner.to(dev)),
                        targets=(q.x0 if labels is None else _padded(labels))[q.owner[row], col].to(dev))
    return RoundsLogp(logp, q.owner[row], col, entropy)


def _padded(rows) -> torch.Tensor:
    """int64 ``[n, max L_i]``: the rows, right-padded with 0."""
    return torch.nn.utils.rnn.pad_sequence([torch.as_tensor(r, dtype=torch.long) for r in rows], batch_first=True)


def rollout_rounds(rollout, i: int):
    """Sequence ``i`` of a rollout as ``(clean ids [L], noisy [R, L], targets [R, L])`` (:func:`~dirl_min.core.rounds.step_rounds`)."""
    x0 = torch.tensor(rollout.prompt_ids[i] + rollout.response_ids[i], dtype=torch.long)
    full_steps = torch.tensor([0] * len(rollout.prompt_ids[i]) + rollout.step_map[i], dtype=torch.long)
    noisy, targets = step_rounds(full_steps, rollout.block_size)
    return x0, noisy, targets


def rollout_views(rollout, i: int, spec: ObjectiveSpec, iteration: int = 0) -> tuple[Views, torch.Tensor]:
    """Sequence ``i`` of a rollout as the views ``spec`` scores (:func:`~dirl_min.core.estimates.objective_views`)
    and its clean ids ``[L]`` (the labels); random views are seeded by the response's sampling seed and ``iteration``."""
    x0 = torch.tensor(rollout.prompt_ids[i] + rollout.response_ids[i], dtype=torch.long)
    full_steps = torch.tensor([0] * len(rollout.prompt_ids[i]) + rollout.step_map[i], dtype=torch.long)
    gen = None
    if record(spec.name).random:
        gen = torch.Generator().manual_seed(view_seed(rollout.seeds[i], iteration))
    return objective_views(spec, x0, full_steps, rollout.block_size, rollout.mask_token_id, gen), x0


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
            logp, resp, position, _ = rounds_logp(model, *zip(*items), rollout.mask_token_id, rollout.block_size)
            owner = torch.tensor(idx)[resp]
        else:
            # each round of each response is its own [x_t^ρ ; x_0] row
            examples = [(x0, nz[r:r + 1], tg[r:r + 1]) for x0, nz, tg in items for r in range(len(nz))]
            batch = build_layout(*zip(*examples), rollout.mask_token_id, rollout.block_size)
            logp = layout_logp(model, batch)[0]
            row, col = batch.select.nonzero(as_tuple=True)
            owner = torch.tensor([i for i, (_, nz, _) in zip(idx, items) for _ in range(len(nz))])[batch.example[row, col]]
            position = batch.pos[row, col]
        logp = logp.cpu()
        for i in idx:
            sel = owner == i
            # each generated position is a target exactly once: sorting by position aligns it
            out.append(logp[sel][torch.argsort(position[sel])])
    return out
