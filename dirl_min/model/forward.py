"""Drive a transformers backbone with dirl_min's masks (the one model-specific seam).

The backbone is used as is (transformers' Qwen3); dirl_min only chooses the
attention mask, the position ids and where ``lm_head`` is applied. A prepared mask
is passed as ``{"full_attention": mask}``, which transformers uses verbatim.

Attention back ends, chosen from ``model.config._attn_implementation``:

* ``sdpa`` (CPU default): an explicit bool mask ``[N, 1, Tq, Tk]``.
* ``eager``: the same mask as an additive float mask.
* ``flex_attention`` (GPU): training layouts get a ``BlockMask`` built from
  :func:`dirl_min.core.masks.mask_mod`, never a dense ``T × T`` tensor; decoding (a few
  queries against the cache, a small dense mask) runs those calls on SDPA.
"""

from __future__ import annotations

import functools
import inspect

import torch

from dirl_min.core.masks import mask_from_metadata, mask_mod

__all__ = ["unwrap", "attention_backend", "backbone_hidden", "dense_denoiser", "SelectedLogits", "selected_hidden", "selected_logp",
           "layout_logits", "layout_logp_entropy", "layout_attention_mask"]


def unwrap(model):
    """The causal LM inside DDP / SelectedLogits wrappers."""
    while hasattr(model, "module") or isinstance(model, SelectedLogits):
        model = model.module if hasattr(model, "module") else model.lm
    return model


def attention_backend(model) -> str:
    """The attention implementation transformers will run: 'sdpa', 'eager' or 'flex_attention'."""
    return getattr(unwrap(model).config, "_attn_implementation", None) or "sdpa"


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
    config = model.config
    backend = attention_backend(model)
    if isinstance(attention_mask, torch.Tensor):
        attention_mask = _prepare_mask(model, attention_mask, model.get_input_embeddings().weight.dtype)
        if backend == "flex_attention":
            # a dense mask (decoding: a few queries against the cache) runs on SDPA
            config._attn_implementation = "sdpa"
    layers = _keep_cache_under_checkpointing(model, cache)
    plain = _plain_without_grad(model)
    try:
        out = model.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask={"full_attention": attention_mask},
            **{_cache_argument(type(model.model)): cache},
            # the layers read `cache` whatever `use_cache` says; True only asks transformers to
            # return it, and makes a checkpointed layer drop it: not for the prefix caches
            use_cache=cache is not None and not getattr(cache, "replay_safe", False),
        )
    finally:
        config._attn_implementation = backend
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's default (drop writer caches)
        for layer in plain:
            layer.gradient_checkpointing = True
    return out.last_hidden_state


def _plain_without_grad(model) -> list:
    """Checkpointed decoder layers run plainly while gradients are off (decoding, scoring without
    grad), as recent transformers does by itself; up to 5.17 a layer in train mode was checkpointed
    even then, and so dropped the decoder's cache. Returns the layers to switch back."""
    if torch.is_grad_enabled():
        return []
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.model.modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and m.training]
    for m in layers:
        m.gradient_checkpointing = False
    return layers


@functools.lru_cache(maxsize=None)
def _cache_argument(backbone_class) -> str:
    """The name the backbone's ``forward`` gives its cache: ``cache`` in recent transformers,
    ``past_key_values`` up to 5.17 at least. Passed under the wrong name, the cache falls into
    ``**kwargs`` unread and every decoding call sees only its own new keys."""
    params = inspect.signature(backbone_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _keep_cache_under_checkpointing(model, cache) -> list:
    """Decoder layers told to keep ``cache`` while transformers checkpoints them.

    transformers drops any cache from a checkpointed layer, because a cache that is written
    would be written again when the backward pass replays the layer. The prefix caches below
    are replay-safe (the recorder keeps its first K/V, the reader only reads), so the shared-K/V
    scorer keeps them; other caches (decoding) keep transformers' rule.
    """
    if not getattr(cache, "replay_safe", False):
        return []
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if layers and not hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache"):
        raise RuntimeError("gradient checkpointing with the shared-K/V scorer needs a transformers release whose "
                           "layers have `_can_checkpoint_with_cache` (5.x recent); upgrade transformers or turn "
                           "model.gradient_checkpointing off")
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    return layers


def dense_denoiser(model):
    """``model`` as the reference decoder's ``denoiser(ids [T], mask [T, T]) -> logits [T, V]``
    (positions ``0..T-1``, no cache, no gradient)."""

    def denoise(ids, mask):
        with torch.no_grad():
            hidden = backbone_hidden(model, ids[None], torch.arange(len(ids), device=ids.device)[None], mask[None, None])
            return model.get_output_embeddings()(hidden)[0]

    return denoise


class _PrefixRecorder:
    """Records each layer's keys/values of a clean prefix pass (duck-typed transformers Cache).

    Replay-safe under gradient checkpointing: a replayed layer gets its fresh K/V back for its own
    attention, but the stored ones (those the later rows' graph holds) are never replaced.
    """

    replay_safe = True

    def __init__(self):
        self.keys, self.values = {}, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys.setdefault(layer_idx, key_states)
        self.values.setdefault(layer_idx, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _PrefixReader:
    """Row ``i`` attends to prefix row ``rows[i]``'s recorded K/V, then to itself.

    Concatenation, not in-place writes, so gradients flow through the prefix's K/V; reads only,
    so a checkpointed layer's replay computes the same thing.
    """

    replay_safe = True

    def __init__(self, recorded: _PrefixRecorder, rows: torch.Tensor):
        self.recorded, self.rows = recorded, rows

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = torch.cat([self.recorded.keys[layer_idx][self.rows], key_states], dim=2)
        v = torch.cat([self.recorded.values[layer_idx][self.rows], value_states], dim=2)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class SelectedLogits(torch.nn.Module):
    """A causal LM as a denoiser that reads log-probabilities only where asked.

    Training calls go through this module's ``forward`` so that distributed wrappers
    (DDP, FSDP, DeepSpeed) see the forward they need; the loss stays in the trainer.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, attention_mask, select, *, targets, prefix=None,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``[N, T]`` ×2, mask (see :func:`backbone_hidden`), bool ``[N, T]``, int64 targets
        ``[select.sum()]`` → :func:`selected_logp`'s ``(logp, entropy)``, float32 ``[select.sum()]`` each,
        never holding all ``[n, V]`` logits at once. ``prefix``: as :func:`selected_hidden`."""
        hidden = selected_hidden(self.lm, input_ids, position_ids, attention_mask, select, prefix)
        return selected_logp(hidden, self.lm.get_output_embeddings(), targets, temperature=temperature)


def selected_hidden(lm, input_ids, position_ids, attention_mask, select, prefix=None) -> torch.Tensor:
    """The backbone's last hidden states at the ``select`` positions: float ``[select.sum(), H]``.

    ``prefix = (ids [P, Tp], positions [P, Tp], mask, rows [N])``: first run the prefix rows,
    then let row ``i`` of the main input attend to prefix row ``rows[i]`` before itself
    (``attention_mask`` then covers ``Tp + T`` keys).
    """
    cache = None
    if prefix is not None:
        ids, pos, mask, rows = prefix
        recorder = _PrefixRecorder()
        backbone_hidden(lm, ids, pos, mask, recorder)
        cache = _PrefixReader(recorder, rows)
    return backbone_hidden(lm, input_ids, position_ids, attention_mask, cache)[select]


LOGP_CHUNK = 4096  # target tokens whose [·, V] logits are alive at once (151,936 × 4096 × 4 B ≈ 2.5 GB)


def selected_logp(hidden, head, targets, *, temperature: float = 1.0, chunk: int = LOGP_CHUNK):
    """``log softmax(head(hidden) / T)[targets]`` and its entropy, ``chunk`` rows at a time.

    Args:
        hidden: float ``[n, H]``; head: the output projection; targets: int64 ``[n]``.

    Returns:
        ``(logp, entropy)``: float32 ``[n]`` each (``entropy`` detached). When there is more
        than one chunk and a gradient is needed, each chunk is checkpointed: its logits are
        recomputed in the backward pass, so ``[n, V]`` is never stored (a long response
        times a 152k vocabulary would not fit).
    """

    def piece(h, t):
        logp_all = torch.log_softmax(head(h).float() / temperature, dim=-1)
        with torch.no_grad():  # a statistic: no graph, nothing saved for the backward pass
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp_all.gather(-1, t[:, None])[:, 0], entropy

    n = hidden.shape[0]
    if n <= chunk:
        return piece(hidden, targets)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    parts = [torch.utils.checkpoint.checkpoint(piece, hidden[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
             if grad else piece(hidden[s:s + chunk], targets[s:s + chunk]) for s in range(0, n, chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def layout_attention_mask(model, seg, pos, copy, clean_copy, block_size, num_queries=None):
    """The attention mask for a training layout, in the form the back end wants.

    Args: int64 ``[N, T]`` metadata as in :mod:`dirl_min.masking`; ``clean_copy`` int or ``[N]``;
        ``num_queries``: only the last so many tokens are queries.

    Returns:
        bool ``[N, 1, Tq, T]`` for sdpa/eager, a ``BlockMask`` for flex_attention.
    """
    n, t = seg.shape
    tq = t if num_queries is None else num_queries
    if attention_backend(model) == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(
            mask_mod(seg, pos, copy, clean_copy, block_size, num_queries=num_queries), n, None, tq, t,
            device=seg.device,
        )
    return mask_from_metadata(seg, pos, copy, clean_copy, block_size, num_queries=num_queries)[:, None]


def _layout_inputs(model, seg, pos, copy, clean_copy, block_size):
    """The layout's attention mask and positions (padding at position 0)."""
    return layout_attention_mask(model, seg, pos, copy, clean_copy, block_size), pos.clamp(min=0)


def layout_logits(model, input_ids, seg, pos, copy, clean_copy, block_size, select) -> torch.Tensor:
    """Logits at selected positions of a training layout; ``lm_head`` runs only there.

    Args:
        model: a causal LM, or a (possibly distributed-wrapped) :class:`SelectedLogits`.
        input_ids, seg, pos, copy: int64 ``[N, T]`` (the layout and its metadata).
        clean_copy: copy id of the clean copy (int or int64 ``[N]``).
        block_size: B.
        select: bool ``[N, T]``, where logits are needed (e.g. masked noisy positions).

    Returns:
        float ``[select.sum(), V]`` in row-major order of ``select``.
    """
    lm = unwrap(model)  # analysis and tests only: training reads log-probs through SelectedLogits
    mask, positions = _layout_inputs(lm, seg, pos, copy, clean_copy, block_size)
    return lm.get_output_embeddings()(selected_hidden(lm, input_ids, positions, mask, select))


def layout_logp_entropy(model, input_ids, seg, pos, copy, clean_copy, block_size, select, targets, *,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``targets`` at selected positions of a training layout, and the entropies.

    Args: as :func:`layout_logits`, and ``targets``: int64 ``[select.sum()]`` (row-major order of
        ``select``); ``temperature``: the logits are divided by it.

    Returns:
        ``(logp, entropy)``: float32 ``[select.sum()]`` each, as :func:`selected_logp` (``entropy``
        detached), never holding all ``[select.sum(), V]`` logits at once.
    """
    mask, positions = _layout_inputs(model, seg, pos, copy, clean_copy, block_size)
    if not isinstance(model, SelectedLogits) and not hasattr(model, "module"):
        model = SelectedLogits(model)
    return model(input_ids, positions, mask, select, targets=targets, temperature=temperature)
