"""One RL objective's loss on a micro-batch of kept responses (the update half of an RL step)."""

from __future__ import annotations

import torch

from dirl_min.core.estimates import ObjectiveSpec
from dirl_min.core.objectives import clipped_loss, dipo_loss, loss_weights
from dirl_min.engine.score import rollout_views, rounds_logp

__all__ = ["policy_step", "dipo_step"]


def policy_step(model, rollout, keep: list[int], advantages: torch.Tensor, *, num_tokens: float, eps_low: float,
                eps_high: float, beta: float = 0.0, ref_model=None, logp_old: torch.Tensor | None = None,
                spec: ObjectiveSpec = ObjectiveSpec(), num_sequences: float = 0.0, iteration: int = 0,
                loss_mean: str = "token", kl_to_old: bool = False):
    """The RL loss of objective ``spec`` on the kept responses of a rollout, in one call of the model.

    The views of :mod:`dirl_min.core.estimates` (DiPO's exact step rounds by default,
    SPEC §4.4–4.6) are scored by :func:`~dirl_min.engine.score.rounds_logp`, and the clipped
    loss takes ``loss_mean`` (``rl.loss_mean``: ``token`` or ``sequence``).

    Args:
        model: the policy (possibly wrapped for distribution).
        keep: indices of the responses to train on; ``advantages``: float ``[len(keep)]``.
        num_tokens, num_sequences: response tokens and responses of the whole step (the
            normalisers of the token and the sequence mean).
        logp_old: float ``[targets]`` from an earlier pass (``num_iterations > 1``); default:
            the current log-probs, detached (one on-policy pass: ratio 1).
        iteration: the optimisation pass (random views are drawn afresh in each).
        kl_to_old: with ``beta > 0``, take the KL to ``logp_old`` (the sampling policy, TraceRL's
            reference) instead of to ``ref_model``.

    Returns:
        ``(loss, stats, logp)`` — ``logp`` detached, reusable as the next pass's ``logp_old``;
        ``stats["copies"]`` counts the noisy copies scored.
    """
    mask_id, block = rollout.mask_token_id, rollout.block_size
    views, labels = zip(*(rollout_views(rollout, i, spec, iteration) for i in keep))
    context, noisy, targets = zip(*views)
    logp, resp, _, entropy = rounds_logp(model, context, noisy, targets, mask_id, block, labels=labels)
    adv = advantages.to(logp.device)[resp.to(logp.device)]
    old = logp.detach() if logp_old is None else logp_old
    ref = None
    if beta > 0 and kl_to_old:
        ref = old
    elif beta > 0:
        with torch.no_grad():
            ref = rounds_logp(ref_model, context, noisy, targets, mask_id, block, labels=labels).logp
    if loss_mean == "token":
        loss, stats = dipo_loss(logp[:, None], old[:, None], adv, torch.ones_like(logp[:, None], dtype=torch.bool),
                                eps_low=eps_low, eps_high=eps_high, beta=beta,
                                logp_ref=None if ref is None else ref[:, None], num_tokens=num_tokens)
    else:
        weight, denom = loss_weights(resp, [len(rollout.response_ids[i]) for i in keep], loss_mean,
                                     num_tokens=num_tokens, num_sequences=num_sequences)
        loss, stats = clipped_loss(logp, old, adv, weight.to(logp.device), denom, eps_low=eps_low,
                                   eps_high=eps_high, beta=beta, logp_ref=ref)
    stats["entropy"] = float(entropy.mean())
    stats["copies"] = float(sum(len(nz) for nz in noisy))
    return loss, stats, logp.detach()


#: the DiPO step (the default objective), by its documented name
dipo_step = policy_step
