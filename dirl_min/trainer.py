"""The two training stages as thin loops over the core: random-masking SFT, then DiPO.

Each optimizer step's loss is normalised by the token count of the *whole* step
(all micro-batches, all processes), so accumulation and data parallelism give the
same update as one big batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import torch

from dirl_min.decoding import generate
from dirl_min.core.estimates import ObjectiveSpec
from dirl_min.core.objectives import LOSS_MEANS, clipped_loss, dipo_loss, loss_weights
from dirl_min.engine.score import build_layout, layout_logp, rollout_views, rounds_logp
from dirl_min.masking import add_noise
from dirl_min.model import chat_prompt_ids, stop_token_ids
from dirl_min.tasks import render_prompt

__all__ = ["SFTExample", "tokenize_sft", "sft_noise", "sft_loss", "make_scheduler", "rollout_and_reward", "policy_step", "dipo_step",
           "evaluate"]


@dataclass
class SFTExample:
    """Token ids of prompt + response, right-padded with the pad token to whole blocks."""

    ids: torch.Tensor  # int64 [L], L a multiple of B
    prompt_len: int


def tokenize_sft(records: list[dict], tokenizer, block_size: int, max_len: int) -> tuple[list[SFTExample], int]:
    """Tokenise ``{prompt, response}`` records; returns the examples and how many were skipped as too long.

    The response is padded with the pad token to a multiple of B counted on the whole
    sequence; those pad positions are trained (SPEC §2).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out, skipped = [], 0
    for rec in records:
        p = tokenizer.encode(rec["prompt"], add_special_tokens=False)
        r = tokenizer.encode(rec["response"], add_special_tokens=False)
        total = -(-(len(p) + len(r)) // block_size) * block_size
        if total > max_len:
            skipped += 1
            continue
        out.append(SFTExample(torch.tensor(p + r + [pad] * (total - len(p) - len(r)), dtype=torch.long), len(p)))
    return out, skipped


def sft_noise(examples: list[SFTExample], mask_token_id: int, *, t_min: float = 0.0, eps: float = 1e-3,
              generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Draw the SFT noise (SPEC §2) for a batch: per example a bool ``[L_i]`` mask of the
    masked response positions, and the masking probabilities ``p``, float ``[N]``."""
    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = e.ids
        loss_mask[i, e.prompt_len: len(e.ids)] = True
    _, is_masked, p = add_noise(ids, loss_mask, mask_token_id, eps=eps, t_min=t_min, generator=generator)
    return [is_masked[i, : len(e.ids)] for i, e in enumerate(examples)], p


def sft_loss(model, examples: list[SFTExample], mask_token_id: int, block_size: int, *, num_response_tokens: float,
             masks: list[torch.Tensor] | None = None, p: torch.Tensor | None = None,
             t_min: float = 0.0, eps: float = 1e-3, generator: torch.Generator | None = None, pack_tokens: int = 0):
    """The random-masking loss of SPEC §2 on a micro-batch.

    ``L = (1 / N_resp) Σ_{masked i} −log p(x0_i | x_t ; x_0) / p``, with ``N_resp`` the
    response tokens of the whole optimizer step (``num_response_tokens``), so the
    micro-batch losses of one step add up to the step's loss. The noise is drawn here
    unless ``masks`` and ``p`` (from :func:`sft_noise`) are given. ``pack_tokens > 0`` packs
    several examples into one row (see :func:`dirl_min.core.rounds.build_layout`).

    Returns:
        ``(loss, stats)``: scalar tensor (with grad) and floats ``masked`` (count) and
        ``nll`` (mean per masked token, unweighted).
    """
    if masks is None:
        masks, p = sft_noise(examples, mask_token_id, t_min=t_min, eps=eps, generator=generator)
    ids, rounds = [e.ids for e in examples], [m[None] for m in masks]
    if pack_tokens:
        batch = build_layout(ids, rounds, rounds, mask_token_id, block_size, pack_tokens=pack_tokens)
        logp = layout_logp(model, batch)[0]
        owner = batch.example[batch.select]
    else:  # the same numbers, with x_0 run once and x_t's response blocks as queries against it
        scored = rounds_logp(model, ids, rounds, rounds, mask_token_id, block_size)
        logp, owner = scored.logp, scored.resp
    weight = (1.0 / p[owner]).to(logp.device)
    loss = -(logp * weight).sum() / num_response_tokens
    return loss, {"masked": float(len(owner)), "nll": float(-logp.detach().mean())}


def make_scheduler(optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rollout_and_reward(policy, tokenizer, problems, *, group_size, prompt_template, decode_cfg, temperature, top_k,
                       top_p, max_new_tokens, rewards, generator=None, seeds=None, reward_workers=0, batch_size=0,
                       timings: dict | None = None, engine=None):
    """Sample ``group_size`` responses per problem and score them.

    The per-response sampling seeds are ``seeds`` (``n·G`` ints) or drawn from ``generator``.
    ``engine``: an object with :func:`dirl_min.decoding.generate`'s signature minus the model
    (e.g. :class:`dirl_min.lmdeploy_engine.LMDeployEngine`); default: decode with ``policy``.
    ``timings``, if given, receives the seconds spent in ``rollout`` and ``rewards``.

    Returns:
        ``(rollout, total_rewards [n·G], correct [n·G], parts)`` — groups contiguous.
    """
    from dirl_min.rewards import RewardInput, compute_rewards

    prompts = [chat_prompt_ids(tokenizer, render_prompt(prompt_template, p.question)) for p in problems]
    prompts = [p for p in prompts for _ in range(group_size)]
    kw = dict(max_new_tokens=max_new_tokens, strategy=decode_cfg.strategy, threshold=decode_cfg.threshold,
              steps=decode_cfg.steps or None, temperature=temperature, top_k=top_k, top_p=top_p,
              stop_token_ids=stop_token_ids(tokenizer), fused_commit=decode_cfg.fused_commit, tokenizer=tokenizer)
    t0 = time.perf_counter()
    policy_was_training = policy.training
    policy.eval()
    chunk = batch_size or len(prompts)
    if seeds is None:
        seeds = torch.randint(0, 2**32, (len(prompts),), generator=generator).tolist()
    decode = engine.generate if engine is not None else partial(generate, policy)
    parts_out = [decode(prompts[s:s + chunk], seeds=seeds[s:s + chunk], **kw) for s in range(0, len(prompts), chunk)]
    policy.train(policy_was_training)
    rollout = parts_out[0]
    for extra in parts_out[1:]:
        for name in ("prompt_ids", "response_ids", "step_map", "logp", "truncated", "stopped_at", "text", "seeds",
                     "text_lengths"):
            getattr(rollout, name).extend(getattr(extra, name))
        rollout.num_forwards += extra.num_forwards
    t1 = time.perf_counter()
    block_size = rollout.block_size
    samples = [
        RewardInput(response=rollout.text[i], ground_truth=problems[i // group_size].answer,
                    num_tokens=len(rollout.response_ids[i]), num_steps=rollout.num_steps(i),
                    block_size=block_size, truncated=rollout.truncated[i], max_tokens=max_new_tokens)
        for i in range(len(rollout))
    ]
    total, parts = compute_rewards(samples, rewards, num_workers=reward_workers)
    if timings is not None:
        timings["rollout"] = timings.get("rollout", 0.0) + t1 - t0
        timings["rewards"] = timings.get("rewards", 0.0) + time.perf_counter() - t1
    return rollout, torch.tensor(total, dtype=torch.float32), torch.tensor(parts["correct"], dtype=torch.float32), parts


def policy_step(model, rollout, keep: list[int], advantages: torch.Tensor, *, num_tokens: float, eps_low: float,
                eps_high: float, beta: float = 0.0, ref_model=None, logp_old: torch.Tensor | None = None,
                spec: ObjectiveSpec = ObjectiveSpec(), num_sequences: float = 0.0, iteration: int = 0):
    """The RL loss of objective ``spec`` on the kept responses of a rollout, in one call of the model.

    The views of :mod:`dirl_min.core.estimates` (DiPO's exact step rounds by default,
    SPEC §4.4–4.6) are scored by :func:`~dirl_min.engine.score.rounds_logp`, and the clipped
    loss takes the objective's mean (:data:`~dirl_min.core.objectives.LOSS_MEANS`).

    Args:
        model: the policy (possibly wrapped for distribution).
        keep: indices of the responses to train on; ``advantages``: float ``[len(keep)]``.
        num_tokens, num_sequences: response tokens and responses of the whole step (the
            normalisers of the token and the sequence mean).
        logp_old: float ``[targets]`` from an earlier pass (``num_iterations > 1``); default:
            the current log-probs, detached (one on-policy pass: ratio 1).
        iteration: the optimisation pass (random views are drawn afresh in each).

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
    if beta > 0:
        with torch.no_grad():
            ref = rounds_logp(ref_model, context, noisy, targets, mask_id, block, labels=labels).logp
    if LOSS_MEANS[spec.name] == "token":
        loss, stats = dipo_loss(logp[:, None], old[:, None], adv, torch.ones_like(logp[:, None], dtype=torch.bool),
                                eps_low=eps_low, eps_high=eps_high, beta=beta,
                                logp_ref=None if ref is None else ref[:, None], num_tokens=num_tokens)
    else:
        weight, denom = loss_weights(resp, [len(rollout.response_ids[i]) for i in keep], LOSS_MEANS[spec.name],
                                     num_tokens=num_tokens, num_sequences=num_sequences)
        loss, stats = clipped_loss(logp, old, adv, weight.to(logp.device), denom, eps_low=eps_low,
                                   eps_high=eps_high, beta=beta, logp_ref=ref)
    stats["entropy"] = float(entropy.mean())
    stats["copies"] = float(sum(len(nz) for nz in noisy))
    return loss, stats, logp.detach()


#: the DiPO step (the default objective), by its documented name
dipo_step = policy_step


@torch.no_grad()
def evaluate(model, tokenizer, problems, *, samples: int, temperature: float, top_k: int, top_p: float,
             greedy: bool, max_new_tokens: int, decode_cfg, prompt_template: str, seed: int, batch_size: int = 256,
             rank: int = 0, world: int = 1, gather=None):
    """DiRL's protocol at small scale: avg@k at temperature T, pass@k, greedy accuracy,
    tokens per step, mean response length (to the stop token) and truncation rate.

    ``accuracy_ci`` is the 95% bootstrap interval of avg@k over problems, and
    ``per_problem`` the avg@k of each problem (float ``[n]``, for paired comparisons).

    Several processes: process ``rank`` of ``world`` decodes problems ``rank::world`` with the
    seeds drawn for the whole set, and ``gather`` (a list per process -> their concatenation,
    e.g. ``accelerate.utils.gather_object``) collects the per-sample results, so every process
    returns the 1-process numbers whatever ``world`` is.
    """
    from dirl_min.metrics import bootstrap_ci

    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    mine = list(range(rank, len(problems), world))
    kw = dict(prompt_template=prompt_template, decode_cfg=decode_cfg, max_new_tokens=max_new_tokens,
              rewards={"accuracy": 1.0}, batch_size=batch_size)
    # drawn for the global problem set (problem-major), then this process's rows
    seeds = torch.randint(0, 2**32, (len(problems), samples), generator=gen)
    rows = _sample_rows(model, tokenizer, problems, mine, seeds, dict(temperature=temperature, top_k=top_k, top_p=top_p), kw)
    if world > 1:
        rows = sorted(gather(rows))
    correct = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    per_problem = correct.view(-1, samples)
    n = len(rows)
    per_problem_acc = per_problem.mean(dim=1).tolist()  # [n]
    out = {
        "accuracy": float(per_problem.mean()),
        "accuracy_ci": list(bootstrap_ci(per_problem_acc)),
        "per_problem": per_problem_acc,
        f"pass@{samples}": float((per_problem.max(dim=1).values > 0).float().mean()),
        "tokens_per_step": sum(r[3] for r in rows) / n,
        "mean_length": sum(r[4] for r in rows) / n,
        "truncation_rate": sum(r[5] for r in rows) / n,
        "samples": samples,
        "problems": len(problems),
    }
    if greedy:
        g_seeds = torch.randint(0, 2**32, (len(problems), 1), generator=gen)  # unused by greedy decoding
        g_rows = _sample_rows(model, tokenizer, problems, mine, g_seeds, dict(temperature=0.0, top_k=0, top_p=1.0), kw)
        if world > 1:
            g_rows = sorted(gather(g_rows))
        out["greedy_accuracy"] = float(torch.tensor([r[2] for r in g_rows], dtype=torch.float32).mean())
        out["greedy_tokens_per_step"] = sum(r[3] for r in g_rows) / len(g_rows)
    out["seconds"] = time.perf_counter() - t0
    return out


def _sample_rows(model, tokenizer, problems, mine, seeds, sampling, kw) -> list[tuple]:
    """``(problem, sample, correct, tokens_per_step, length_to_stop, truncated)`` per sample of
    problems ``mine``; ``seeds``: int64 ``[len(problems), samples]``."""
    if not mine:
        return []
    k = seeds.shape[1]
    rollout, _, correct, _ = rollout_and_reward(
        model, tokenizer, [problems[i] for i in mine], group_size=k, seeds=seeds[mine].reshape(-1).tolist(),
        **sampling, **kw)
    return [(mine[j // k], j % k, float(correct[j]), rollout.tokens_per_step(j), rollout.length_to_stop(j),
             bool(rollout.truncated[j])) for j in range(len(rollout))]

