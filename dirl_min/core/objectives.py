"""RL objectives (SPEC §4.3, §4.6): group advantages, the dynamic-sampling filter, the clipped losses."""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "filter_groups", "GROUP_FILTERS", "ACCURACY_BAND", "dipo_loss", "clipped_loss",
           "LOSS_MEANS", "loss_weights"]


def group_advantages(rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """Group advantages ``(r - mean_G) / (std_G + eps)`` (population std; ``rl.scale_advantages``),
    or ``r - mean_G`` with ``scale=False`` (d1 and DiffuCoder, which do not divide by the std).

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
    adv = torch.where(spread, (r - mean) / (std + eps) if scale else r - mean, torch.zeros_like(r))
    return adv.view(-1).float()


#: ``rl.group_filter`` rules of :func:`filter_groups`.
GROUP_FILTERS = ("reward_std", "accuracy", "accuracy_band", "none")
#: ``accuracy_band`` keeps groups whose accuracy lies in this closed range (TraceRL's reward/rl_reward.py)
ACCURACY_BAND = (0.2, 0.8)


def filter_groups(rewards: torch.Tensor, group_size: int, *, correct: torch.Tensor | None = None,
                  rule: str = "reward_std") -> torch.Tensor:
    """Dynamic sampling: which groups carry a learning signal.

    ``reward_std`` (DiRL, "zero advantage standard deviation" filtered out): keep groups
    whose rewards are not all equal, i.e. whose :func:`group_advantages` are not all zero.
    With the speed reward an all-correct group whose responses decoded at different speeds
    is kept: speed is all it can teach. ``accuracy`` (DAPO): keep groups whose accuracy is
    neither all 0 nor all 1. The two agree when the reward is accuracy alone. ``accuracy_band``
    (TraceRL): keep groups whose accuracy is in :data:`ACCURACY_BAND`. ``none`` (d1, DiffuCoder):
    keep every group (one whose rewards are all equal has zero advantages: it only adds to the
    loss's denominator).

    Args:
        rewards: float ``[num_groups · G]``, groups contiguous.
        group_size: G.
        correct: float/bool ``[num_groups · G]`` (1 = correct), same order; needed by ``accuracy``.
        rule: one of :data:`GROUP_FILTERS`.

    Returns:
        bool ``[num_groups]``.
    """
    if rule == "reward_std":
        r = torch.as_tensor(rewards, dtype=torch.float64).view(-1, group_size)
        return ~(r == r[:, :1]).all(dim=1)  # the same "all equal" test as group_advantages
    if rule == "none":
        return torch.ones(torch.as_tensor(rewards).numel() // group_size, dtype=torch.bool)
    if rule in ("accuracy", "accuracy_band"):
        if correct is None:
            raise ValueError(f"filter_groups(rule={rule!r}) needs correct (0/1 per response)")
        if rule == "accuracy_band":  # in float64, as TraceRL's Python floats: 4/5 is then exactly 0.8
            acc = torch.as_tensor(correct, dtype=torch.float64).view(-1, group_size).mean(dim=1)
            return (acc >= ACCURACY_BAND[0]) & (acc <= ACCURACY_BAND[1])
        acc = torch.as_tensor(correct, dtype=torch.float32).view(-1, group_size).mean(dim=1)
        return (acc > 0) & (acc < 1)
    raise ValueError(f"rl.group_filter must be one of {GROUP_FILTERS}, not {rule!r}")


#: ``rl.loss_mean`` values: ``token`` = over all response tokens of the step (DAPO / DiRL, and
#: d1's and DiffuCoder's code: the micro-batch's token mean), ``sequence`` = within each response,
#: then over responses (GRPO's paper form; TraceRL's code with one response per micro-batch)
LOSS_MEANS = ("token", "sequence")


def loss_weights(resp: torch.Tensor, lengths: torch.Tensor, mean: str, *, num_tokens: float,
                 num_sequences: float) -> tuple[torch.Tensor, float]:
    """Per-token weights and the normaliser of :func:`clipped_loss` for a loss mean.

    Args:
        resp: int64 ``[num_targets]``, the response each token belongs to.
        lengths: ``[num_responses]``, each response's token count.
        mean: ``token`` or ``sequence`` (:data:`LOSS_MEANS`).
        num_tokens, num_sequences: the whole step's response tokens and responses (all
            micro-batches and processes), so that micro-batch losses add up to the step's.

    Returns:
        ``(weight [num_targets] float64, denominator)``: ``token`` gives ``(1, num_tokens)``,
        ``sequence`` gives ``(1 / |o_i|, num_sequences)``.
    """
    if mean == "token":
        return torch.ones(resp.shape, dtype=torch.float64), float(num_tokens)
    if mean == "sequence":
        return 1.0 / torch.as_tensor(lengths, dtype=torch.float64)[resp], float(num_sequences)
    raise ValueError(f"the loss mean must be token or sequence, not {mean!r}")


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
    return clipped_loss(logp, logp_old, advantages.to(logp.dtype)[:, None], mask, n_tok, eps_low=eps_low,
                        eps_high=eps_high, beta=beta, logp_ref=logp_ref)


def clipped_loss(logp, logp_old, advantages, weight, denominator, *, eps_low: float, eps_high: float,
                 beta: float = 0.0, logp_ref=None) -> tuple[torch.Tensor, dict[str, float]]:
    """``−Σ_j w_j · min(ρ_j A_j, clip(ρ_j) A_j) / D  +  β · Σ_j w_j · k3_j / D``.

    The PPO-clipped surrogate shared by every objective; ``ρ_j = exp(clamp(ℓ_j − ℓ_j^old, ±10))``.
    :func:`dipo_loss` is the token mean (``w = 1``, ``D = N_tok``); :func:`loss_weights`
    gives the sequence mean of GRPO.

    Args:
        logp, logp_old: float, the same shape (e.g. ``[N, L]`` or ``[num_targets]``).
        advantages: float, broadcastable to ``logp``.
        weight: float, the shape of ``logp``: 0 where a position does not count.
        denominator: ``D``, a float or scalar tensor.
        logp_ref: like ``logp``; required if ``beta > 0``.

    Returns:
        ``(loss, stats)`` as :func:`dipo_loss` (stats over the positions with ``w > 0``).
    """
    mask = weight.to(logp.dtype)
    n_tok = torch.as_tensor(denominator)
    adv = advantages.to(logp.dtype)
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
        counted = (mask > 0).to(logp.dtype)
        denom = counted.sum().clamp(min=1)
        d_old = (-log_ratio).detach()
        stats = {
            "clip_frac": float(((surr_clipped < surr_unclipped).to(logp.dtype) * counted).sum() / denom),
            "ratio_mean": float((ratio * counted).sum() / denom),
            "approx_kl": float(((d_old.exp() - 1 - d_old) * counted).sum() / denom),
            "kl_ref": float(kl_ref),
        }
    return loss, stats
