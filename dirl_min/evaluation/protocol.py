"""DiRL's evaluation protocol at any scale: avg@k, pass@k, greedy accuracy, tokens per step."""

from __future__ import annotations

import time

import torch

from dirl_min.engine.rollouts import rollout_and_reward

__all__ = ["evaluate"]


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
    from dirl_min.evaluation.stats import bootstrap_ci

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
