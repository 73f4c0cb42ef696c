"""``dirl_min.train`` with a toy correctness: a response is "correct" when its token ids sum to a multiple of 4.

An untrained tiny model then gives DiPO groups with mixed accuracy (kept) next to uniform
ones (dropped) at random, on any process: the case where processes disagree. Run it as a
script (also under ``accelerate launch``) with ``dirl_min.train``'s arguments.
"""

from __future__ import annotations

import sys

import torch


def toy_correct(real):
    """Wrap ``rollout_and_reward``: correctness (and reward): is the response's id sum a multiple of 4?"""

    def rollout_and_reward(*args, **kwargs):
        roll, _, _, parts = real(*args, **kwargs)
        correct = torch.tensor([float(sum(ids) % 4 == 0) for ids in roll.response_ids])
        return roll, correct.clone(), correct, parts

    return rollout_and_reward


if __name__ == "__main__":
    from dirl_min import train
    from dirl_min.loops import rl as dipo

    dipo.rollout_and_reward = toy_correct(dipo.rollout_and_reward)  # where the DiPO loop looks it up
    train.main(sys.argv[1:])
