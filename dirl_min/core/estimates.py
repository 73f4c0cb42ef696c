"""Which noisy views of a rollout each RL objective scores (placeholder; filled in this session)."""

from __future__ import annotations

#: ``rl.objective`` values.
OBJECTIVES = ("dipo", "tracerl", "diffu_grpo", "coupled_grpo")
