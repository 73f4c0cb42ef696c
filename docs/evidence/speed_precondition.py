"""The speed reward's precondition: how much tokens per step vary among correct answers of one prompt.

    PYTHONPATH=. python docs/evidence/speed_precondition.py RUN [PROMPTS] [GROUP] > speed_precondition.json

RUN is a ``python -m dirl_min.train`` folder with ``checkpoints/sft-final`` (e.g. trained with
``configs/speed.yaml --run.stages '["sft"]'``). Samples GROUP responses (default 8, as
``rl.group_size``) for PROMPTS training problems (default 64, seeded) with the run's RL rollout
settings and reports, over groups with at least two correct answers, the within-group standard
deviation of tokens per step among the correct answers relative to their mean, and the range
(max − min) relative to the mean. Speed can only move a correct answer's advantage by what
these spreads allow.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

import torch

from dirl_min.settings.config import parse_config
from dirl_min.data import tasks
from dirl_min.engine.rollouts import rollout_and_reward
from dirl_min.model import load_model


def measure(run: Path, prompts: int = 64, group: int = 8) -> dict:
    saved = json.loads((run / "config.json").read_text())
    d, r = saved["data"], saved["rl"]
    problems = tasks.arithmetic_problems(d["task_max_operand"], tuple(d["task_levels"]))
    train = tasks.split_problems(problems, d["held_out"], d["split_seed"])[0]
    chosen = random.Random(0).sample(train, prompts)
    decode = parse_config([]).decode
    for k, v in saved["decode"].items():
        setattr(decode, k, v)
    model, tok = load_model(run / "checkpoints" / "sft-final")
    rollout, _, correct, _ = rollout_and_reward(
        model, tok, chosen, group_size=group, prompt_template=d["prompt_template"], decode_cfg=decode,
        temperature=r["temperature"], top_k=r["top_k"], top_p=r["top_p"], max_new_tokens=r["max_new_tokens"],
        rewards={"accuracy": 1.0}, generator=torch.Generator().manual_seed(0), batch_size=256)
    rel_sd, rel_range, all_correct, mixed = [], [], 0, 0
    for g in range(prompts):
        tps = [rollout.tokens_per_step(i) for i in range(g * group, (g + 1) * group) if correct[i] > 0]
        all_correct += len(tps) == group
        mixed += 0 < len(tps) < group
        if len(tps) >= 2:
            m = statistics.fmean(tps)
            rel_sd.append(statistics.pstdev(tps) / m)
            rel_range.append((max(tps) - min(tps)) / m)
    return {"run": str(run), "prompts": prompts, "group": group, "block_size": rollout.block_size,
            "accuracy": float(correct.mean()), "groups_with_2_correct": len(rel_sd),
            "all_correct_groups": all_correct, "mixed_groups": mixed,
            "within_group_sd_over_mean": statistics.fmean(rel_sd) if rel_sd else None,
            "within_group_range_over_mean": statistics.fmean(rel_range) if rel_range else None,
            "max_within_group_range_over_mean": max(rel_range) if rel_range else None,
            "tokens_per_step_correct": statistics.fmean(
                rollout.tokens_per_step(i) for i in range(len(rollout)) if correct[i] > 0)}


if __name__ == "__main__":
    torch.set_num_threads(2)
    a = sys.argv[1:]
    print(json.dumps(measure(Path(a[0]), *(int(x) for x in a[1:])), indent=1))
