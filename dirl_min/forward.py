"""Re-export of :mod:`dirl_min.model.forward` (the public names ``dirl_min.forward.*``): the one
model-specific seam (masks, positions, ``lm_head`` only where needed; SDPA / eager / flex_attention)."""

from dirl_min.model.forward import (  # noqa: F401
    LOGP_CHUNK,
    SelectedLogits,
    __all__,
    _unwrap,
    attention_backend,
    backbone_hidden,
    dense_denoiser,
    layout_attention_mask,
    layout_logits,
    layout_logp_entropy,
    selected_logp,
)
