"""Re-export of :mod:`dirl_min.core.masks` (the public name ``dirl_min.masking.block_causal_mask``)."""

from dirl_min.core.masks import (  # noqa: F401
    __all__,
    add_noise,
    block_causal_mask,
    block_diffusion_mask,
    layout_metadata,
    mask_from_metadata,
    mask_mod,
    packed_rounds_mask,
)
