"""The SFT and RL steps under their first home's names (re-exported; the code lives in the layers).

:mod:`dirl_min.loops.sft` (examples, noise, loss), :mod:`dirl_min.loops.policy` (the RL
objectives' step), :mod:`dirl_min.loops.state` (the learning-rate schedule),
:mod:`dirl_min.engine.rollouts` (sampling and rewarding groups), :mod:`dirl_min.evaluation.protocol`.
"""

from dirl_min.engine.rollouts import rollout_and_reward
from dirl_min.evaluation.protocol import evaluate
from dirl_min.loops.policy import MicroBatch, PolicySettings, StepTotals, dipo_step, policy_step
from dirl_min.loops.sft import SFTExample, SFTNoise, sft_loss, sft_noise, tokenize_sft
from dirl_min.loops.state import make_scheduler

__all__ = ["SFTExample", "SFTNoise", "tokenize_sft", "sft_noise", "sft_loss", "make_scheduler", "rollout_and_reward",
           "MicroBatch", "StepTotals", "PolicySettings", "policy_step", "dipo_step", "evaluate"]
