"""One RL objective's loss on a micro-batch of kept responses (the update half of an RL step), and the
named pieces an RL step passes around: the micro-batch, the step's totals, the loss's settings."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from dirl_min.core.estimates import ObjectiveSpec, spec_of
from dirl_min.core.objectives import clipped_loss, dipo_loss, loss_weights
from dirl_min.engine.score import rollout_views, rounds_logp

__all__ = ["MicroBatch", "StepTotals", "PolicySettings", "policy_step", "dipo_step"]


class MicroBatch(NamedTuple):
    """Responses of one rollout scored together: a kept group (with its ``place``) or a micro-batch
    of the update (with ``real``)."""

    rollout: object  #: the :class:`~dirl_min.engine.decode.Rollout` the responses come from
    indices: list  #: int: the responses of ``rollout`` to train on
    advantages: torch.Tensor  #: float [len(indices)]
    real: bool = True  #: False: a zero-weight filler, run so every process runs as many micro-batches
    place: int = 0  #: a kept group's place among all processes' kept groups of the step


class StepTotals(NamedTuple):
    """The normalisers of the token and the sequence mean: the whole step's, over all processes."""

    tokens: float  #: response tokens
    sequences: float = 0.0  #: responses


@dataclass(frozen=True)
class PolicySettings:
    """The loss's settings: clip range, KL weight and reference, the objective, the mean."""

    eps_low: float
    eps_high: float
    beta: float = 0.0
    spec: ObjectiveSpec = ObjectiveSpec()
    loss_mean: str = "token"  #: ``rl.loss_mean``: ``token`` or ``sequence``
    kl_to_old: bool = False  #: with beta > 0, the KL to ``logp_old`` (TraceRL's) instead of to ``ref_model``

    @classmethod
    def from_rl(cls, rl) -> PolicySettings:
        """The settings of an RL section (``cfg.rl``)."""
        return cls(eps_low=rl.eps_low, eps_high=rl.eps_high, beta=rl.beta, spec=spec_of(rl),
                   loss_mean=rl.loss_mean, kl_to_old=rl.kl_reference == "old")

    def without_kl(self) -> PolicySettings:
        return replace(self, beta=0.0, kl_to_old=False)


def policy_step(model, batch: MicroBatch, totals: StepTotals, settings: PolicySettings, *, ref_model=None,
                logp_old: torch.Tensor | None = None, iteration: int = 0):
    """The RL loss of objective ``settings.spec`` on the responses of ``batch``, in one call of the model.

    The views of :mod:`dirl_min.core.estimates` (DiPO's exact step rounds by default,
    SPEC §4.4–4.6) are scored by :func:`~dirl_min.engine.score.rounds_logp`, and the clipped
    loss takes ``settings.loss_mean``.

    Args:
        model: the policy (possibly wrapped for distribution).
        batch: the responses (``batch.real`` and ``batch.place`` are not read here).
        totals: response tokens and responses of the whole step.
        ref_model: the KL reference (``settings.beta > 0`` and not ``settings.kl_to_old``).
        logp_old: float ``[targets]`` from an earlier pass (``num_iterations > 1``); default:
            the current log-probs, detached (one on-policy pass: ratio 1).
        iteration: the optimisation pass (random views are drawn afresh in each).

    Returns:
        ``(loss, stats, logp)`` — ``logp`` detached, reusable as the next pass's ``logp_old``;
        ``stats["copies"]`` counts the noisy copies scored.
    """
    rollout, keep, advantages = batch.rollout, batch.indices, batch.advantages
    eps_low, eps_high, beta, spec = settings.eps_low, settings.eps_high, settings.beta, settings.spec
    mask_id, block = rollout.mask_token_id, rollout.block_size
    views, labels = zip(*(rollout_views(rollout, i, spec, iteration) for i in keep))
    context, noisy, targets = zip(*views)
    logp, resp, _, entropy = rounds_logp(model, context, noisy, targets, mask_id, block, labels=labels)
    adv = advantages.to(logp.device)[resp.to(logp.device)]
    old = logp.detach() if logp_old is None else logp_old
    ref = None
    if beta > 0 and settings.kl_to_old:
        ref = old
    elif beta > 0:
        with torch.no_grad():
            ref = rounds_logp(ref_model, context, noisy, targets, mask_id, block, labels=labels).logp
    if settings.loss_mean == "token":
        loss, stats = dipo_loss(logp[:, None], old[:, None], adv, torch.ones_like(logp[:, None], dtype=torch.bool),
                                eps_low=eps_low, eps_high=eps_high, beta=beta,
                                logp_ref=None if ref is None else ref[:, None], num_tokens=totals.tokens)
    else:
        weight, denom = loss_weights(resp, [len(rollout.response_ids[i]) for i in keep], settings.loss_mean,
                                     num_tokens=totals.tokens, num_sequences=totals.sequences)
        loss, stats = clipped_loss(logp, old, adv, weight.to(logp.device), denom, eps_low=eps_low,
                                   eps_high=eps_high, beta=beta, logp_ref=ref)
    stats["entropy"] = float(entropy.mean())
    stats["copies"] = float(sum(len(nz) for nz in noisy))
    return loss, stats, logp.detach()


#: the DiPO step (the default objective), by its documented name
dipo_step = policy_step
