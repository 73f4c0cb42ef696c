"""DiPO: step-level policy optimisation for block diffusion (SPEC §4) — the names, re-exported.

The pure parts live in :mod:`dirl_min.core.rounds` (step rounds, the layout) and
:mod:`dirl_min.core.objectives` (advantages, dynamic sampling, the loss); the parts that run
the model in :mod:`dirl_min.engine.score` (layout / rounds log-probs, :func:`rescore`).
"""

from dirl_min.core.objectives import GROUP_FILTERS, dipo_loss, filter_groups, group_advantages
from dirl_min.core.rounds import LayoutBatch, build_layout, step_rounds
from dirl_min.engine.score import RoundsLogp, layout_logp, rescore, rollout_rounds, rounds_logp

__all__ = [
    "step_rounds",
    "group_advantages",
    "filter_groups",
    "GROUP_FILTERS",
    "dipo_loss",
    "LayoutBatch",
    "build_layout",
    "layout_logp",
    "RoundsLogp",
    "rounds_logp",
    "rollout_rounds",
    "rescore",
]
