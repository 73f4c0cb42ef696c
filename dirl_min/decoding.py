"""Re-export of block-diffusion decoding (the public name ``dirl_min.decoding.generate``): the
pure unmasking rules live in :mod:`dirl_min.core.unmask`, the KV-cached loop in
:mod:`dirl_min.engine.decode`."""

from dirl_min.core.unmask import STRATEGIES, propose, select_unmask, uniform_noise  # noqa: F401
from dirl_min.engine.decode import Rollout, generate, generate_text  # noqa: F401

__all__ = ["STRATEGIES", "select_unmask", "uniform_noise", "propose", "Rollout", "generate", "generate_text"]
