"""The real-shape benchmark's synthetic batch (dirl_min.speed.shapes). Nothing here is timed."""

from __future__ import annotations

import torch

from dirl_min.speed.shapes import BLOCK, synthetic_batch
from dirl_min.dipo import rollout_rounds
from dirl_min.model import build_tiny_tokenizer


def test_synthetic_rollouts_commit_each_block_in_two_steps_of_two_tokens():
    tok = build_tiny_tokenizer()
    sft, roll = synthetic_batch(tok, 3, 32)
    assert [len(r) for r in roll.response_ids] == [32] * 3
    for i in range(3):
        assert len(roll.prompt_ids[i]) % BLOCK == 0
        steps = torch.tensor(roll.step_map[i]).view(-1, BLOCK)
        for k, block in enumerate(steps):
            assert sorted(block.tolist()) == [2 * k + 1] * 2 + [2 * k + 2] * 2
        clean, noisy, targets = rollout_rounds(roll, i)
        assert noisy.shape[0] == 2  # two rounds
        assert targets.sum() == 32 and (targets.sum(0) <= 1).all()  # every response token a target once
        assert torch.equal(sft[i].ids, clean) and sft[i].prompt_len == len(roll.prompt_ids[i])
