"""dirl_min: block-diffusion SFT and DiPO reinforcement learning, small, exact and fast.

Core modules (pure functions): :mod:`dirl_min.masking`, :mod:`dirl_min.decoding`,
:mod:`dirl_min.dipo`, :mod:`dirl_min.rewards`. Model-specific code:
:mod:`dirl_min.model` (checkpoints, tokenizers) and :mod:`dirl_min.forward`.
"""

__version__ = "0.1.0"
