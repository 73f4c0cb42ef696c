"""Drive a transformers backbone with dirl_min's masks (the one model-specific seam).

The backbone is used as is (transformers' Qwen3); dirl_min only chooses the
attention mask, the position ids and where ``lm_head`` is applied. A prepared mask
is passed as ``{"full_attention": mask}``, which transformers uses verbatim.

Attention back ends, chosen from ``model.config._attn_implementation``:

* ``sdpa`` (CPU default): an explicit bool mask ``[N, 1, Tq, Tk]``.
* ``eager``: the same mask as an additive float mask.
* ``flex_attention`` (GPU): a ``BlockMask`` built from :func:`dirl_min.masking.mask_mod`,
  never a dense ``T × T`` tensor.
"""

from __future__ import annotations

import torch

from dirl_min.masking import mask_from_metadata, mask_mod

__all__ = ["attention_backend", "backbone_hidden", "layout_logits", "layout_attention_mask"]


def attention_backend(model) -> str:
    """The attention implementation transformers will run: 'sdpa', 'eager' or 'flex_attention'."""
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def _prepare_mask(model, mask: torch.Tensor, dtype: torch.dtype):
    if attention_backend(model) == "eager":
        # eager adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def backbone_hidden(model, input_ids, position_ids, attention_mask, cache=None) -> torch.Tensor:
    """Final hidden states of the backbone (before ``lm_head``).

    Args:
        model: a transformers causal LM (``model.model`` is the backbone).
        input_ids: int64 ``[N, Tq]``.
        position_ids: int64 ``[N, Tq]`` (absolute positions; the RoPE angle).
        attention_mask: bool ``[N, 1, Tq, Tk]`` (True = may attend), or a flex ``BlockMask``.
        cache: an object with transformers' ``Cache.update`` signature, or None.

    Returns:
        float ``[N, Tq, H]``.
    """
    if isinstance(attention_mask, torch.Tensor):
        attention_mask = _prepare_mask(model, attention_mask, model.get_input_embeddings().weight.dtype)
    out = model.model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask={"full_attention": attention_mask},
        cache=cache,
        use_cache=cache is not None,
    )
    return out.last_hidden_state


def layout_attention_mask(model, seg, pos, copy, clean_copy, block_size):
    """The attention mask for a training layout, in the form the back end wants.

    Args: int64 ``[N, T]`` metadata as in :mod:`dirl_min.masking`; ``clean_copy`` int or ``[N]``.

    Returns:
        bool ``[N, 1, T, T]`` for sdpa/eager, a ``BlockMask`` for flex_attention.
    """
    if attention_backend(model) == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        n, t = seg.shape
        return create_block_mask(
            mask_mod(seg, pos, copy, clean_copy, block_size), n, None, t, t, device=seg.device
        )
    return mask_from_metadata(seg, pos, copy, clean_copy, block_size)[:, None]


def layout_logits(model, input_ids, seg, pos, copy, clean_copy, block_size, select) -> torch.Tensor:
    """Logits at selected positions of a training layout; ``lm_head`` runs only there.

    Args:
        input_ids, seg, pos, copy: int64 ``[N, T]`` (the layout and its metadata).
        clean_copy: copy id of the clean copy (int or int64 ``[N]``).
        block_size: B.
        select: bool ``[N, T]``, where logits are needed (e.g. masked noisy positions).

    Returns:
        float ``[select.sum(), V]`` in row-major order of ``select``.
    """
    mask = layout_attention_mask(model, seg, pos, copy, clean_copy, block_size)
    hidden = backbone_hidden(model, input_ids, pos.clamp(min=0), mask)
    return model.get_output_embeddings()(hidden[select])
