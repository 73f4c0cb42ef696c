"""What RL changed: per-token entropy and accuracy at temperatures 0, 0.6, 1.0, SFT vs RL.

    PYTHONPATH=. python docs/evidence/sharpening.py runs/seed0 [runs/seed1 ...] > sharpening.json

For each run folder of ``python -m dirl_min.train`` it loads ``checkpoints/sft-final`` and
``checkpoints/rl-final`` and samples the run's held-out problems (its ``config.json``: task,
split, decoding, top-k, 16 samples, the same sampling seeds for both models) at each temperature.
Entropy is that of the untempered, untruncated policy at every response token up to the stop
token, in the context it was decoded in (the DiPO rounds of the recorded ``step_map``), averaged
over tokens; ``nll`` is the mean −log p of the sampled tokens (the decoder's record).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from dirl_min.settings.config import parse_config
from dirl_min.data import tasks
from dirl_min.engine.rollouts import rollout_and_reward
from dirl_min.engine.score import rollout_rounds, rounds_logp
from dirl_min.model import load_model

TEMPERATURES = (0.0, 0.6, 1.0)


@torch.no_grad()
def response_entropy(model, rollout, batch: int = 64) -> tuple[float, float]:
    """(mean entropy, mean −log p) over every response token before the stop token (inclusive)."""
    ent_sum, nll_sum, count = 0.0, 0.0, 0
    for start in range(0, len(rollout), batch):
        idx = list(range(start, min(start + batch, len(rollout))))
        items = [rollout_rounds(rollout, i) for i in idx]
        out = rounds_logp(model, *zip(*items), rollout.mask_token_id, rollout.block_size)
        for k, i in enumerate(idx):
            keep = min(len(rollout.response_ids[i]), rollout.length_to_stop(i) + 1)  # + the stop token
            lo = len(rollout.prompt_ids[i])
            sel = (out.resp == k) & (out.position >= lo) & (out.position < lo + keep)
            ent_sum += float(out.entropy[sel].sum())
            nll_sum -= sum(rollout.logp[i][:keep])
            count += int(sel.sum())
    return ent_sum / count, nll_sum / count


def measure(run: Path, limit: int | None = None) -> dict:
    saved = json.loads((run / "config.json").read_text())
    d, e = saved["data"], saved["eval"]
    problems = tasks.arithmetic_problems(d["task_max_operand"], tuple(d["task_levels"]))
    held = tasks.split_problems(problems, d["held_out"], d["split_seed"])[1][:limit]
    decode = parse_config([]).decode
    for k, v in saved["decode"].items():
        setattr(decode, k, v)
    res = {"run": str(run), "seed": saved["run"]["seed"], "problems": len(held)}
    for stage in ("sft", "rl"):
        model, tok = load_model(run / "checkpoints" / f"{stage}-final")
        model.eval()
        for t in TEMPERATURES:
            k = 1 if t == 0 else e["samples"]
            seeds = torch.randint(0, 2**32, (len(held) * k,), generator=torch.Generator().manual_seed(1234)).tolist()
            rollout, _, correct, _ = rollout_and_reward(
                model, tok, held, group_size=k, prompt_template=d["prompt_template"], decode_cfg=decode,
                temperature=t, top_k=e["top_k"] if t else 0, top_p=1.0, max_new_tokens=e["max_new_tokens"],
                rewards={"accuracy": 1.0}, seeds=seeds, batch_size=256)
            ent, nll = response_entropy(model, rollout)
            tps = sum(rollout.tokens_per_step(i) for i in range(len(rollout))) / len(rollout)
            res[f"{stage}@T{t:g}"] = {"accuracy": float(correct.mean()), "entropy": ent, "nll": nll,
                                      "tokens_per_step": tps, "samples": k}
            print(stage, t, res[f"{stage}@T{t:g}"], file=sys.stderr)
    return res


if __name__ == "__main__":
    torch.set_num_threads(2)
    limit = int(os.environ["LIMIT"]) if os.environ.get("LIMIT") else None  # fewer problems, for a quick look
    print(json.dumps([measure(Path(r), limit) for r in sys.argv[1:]], indent=1))
