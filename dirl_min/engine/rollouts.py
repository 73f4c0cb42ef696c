"""Sampling groups of responses and rewarding them: the rollout half of an RL step and of evaluation."""

from __future__ import annotations

import time
from functools import partial

import torch

from dirl_min.core.rewards import RewardInput
from dirl_min.engine.decode import generate
from dirl_min.engine.grading import compute_rewards
from dirl_min.model import chat_prompt_ids, stop_token_ids
from dirl_min.data import render_prompt

__all__ = ["rollout_and_reward"]


def rollout_and_reward(policy, tokenizer, problems, *, group_size, prompt_template, decode_cfg, temperature, top_k,
                       top_p, max_new_tokens, rewards, generator=None, seeds=None, reward_workers=0, batch_size=0,
                       timings: dict | None = None, engine=None):
    """Sample ``group_size`` responses per problem and score them.

    The per-response sampling seeds are ``seeds`` (``n·G`` ints) or drawn from ``generator``.
    ``engine``: an object with :func:`dirl_min.decoding.generate`'s signature minus the model
    (e.g. :class:`dirl_min.engine.lmdeploy_engine.LMDeployEngine`); default: decode with ``policy``.
    ``timings``, if given, receives the seconds spent in ``rollout`` and ``rewards``.

    Returns:
        ``(rollout, total_rewards [n·G], correct [n·G], parts)`` — groups contiguous.
    """

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
