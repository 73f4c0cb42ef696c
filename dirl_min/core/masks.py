"""Noise and attention masks for block diffusion (SPEC §2, §3, §4.5).

Every attention pattern in dirl_min is one rule applied to per-token metadata:

* ``seg``  — which example a token belongs to (``-1`` = padding),
* ``pos``  — its absolute position inside that example (blocks are ``pos // B``),
* ``copy`` — ``0 .. R-1`` for the R noisy copies, ``R`` for the clean copy
  (``R = 0``: a plain block-causal sequence; ``R = 1``: the SFT layout
  ``[x_t ; x_0]``; ``R > 1``: DiPO's packed rounds ``[x_t^1; …; x_t^R; x_0]``).

A query ``q`` may attend a key ``k`` (``True`` = may attend) iff they are in the
same example and

* same noisy copy and same block, or
* ``q`` noisy, ``k`` clean and ``blk(k) < blk(q)``, or
* both clean and ``blk(k) <= blk(q)``.

Padding queries may attend everything (an all-False row would give NaN in SDPA,
and their outputs are never used); real queries never see padding. The dense form is for the reference and
short inputs; ``mask_mod`` gives the same rule as a flex_attention mask function.
"""

from __future__ import annotations

import torch

__all__ = [
    "layout_metadata",
    "mask_from_metadata",
    "mask_mod",
    "block_causal_mask",
    "block_diffusion_mask",
    "packed_rounds_mask",
    "add_noise",
]


def layout_metadata(seq_len: int, num_noisy: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and copy ids of the layout ``[x_t^1; …; x_t^R; x_0]`` for one example.

    Args:
        seq_len: L, the length of the example (prompt + response).
        num_noisy: R, the number of noisy copies (0 = clean sequence only).

    Returns:
        ``(pos, copy)``: int64 ``[(R+1)·L]`` each; every copy has positions ``0..L-1``.
    """
    pos = torch.arange(seq_len, device=device).repeat(num_noisy + 1)
    copy = torch.arange(num_noisy + 1, device=device).repeat_interleave(seq_len)
    return pos, copy


def _allowed(q_seg, q_pos, q_copy, k_seg, k_pos, k_copy, clean_copy, block_size):
    """The attention rule on broadcastable metadata tensors (shared by dense and mask_mod)."""
    q_blk = q_pos // block_size
    k_blk = k_pos // block_size
    q_clean = q_copy == clean_copy
    k_clean = k_copy == clean_copy
    same_noisy = (q_copy == k_copy) & ~q_clean & (q_blk == k_blk)
    noisy_to_clean = ~q_clean & k_clean & (k_blk < q_blk)
    clean_to_clean = q_clean & k_clean & (k_blk <= q_blk)
    return (q_seg == k_seg) & (q_seg >= 0) & (same_noisy | noisy_to_clean | clean_to_clean)


def mask_from_metadata(
    seg: torch.Tensor,
    pos: torch.Tensor,
    copy: torch.Tensor,
    clean_copy,
    block_size: int,
    *,
    num_queries: int | None = None,
) -> torch.Tensor:
    """Dense attention mask from per-token metadata.

    Args:
        seg, pos, copy: int64 ``[N, T]`` (or ``[T]``) — see the module docstring.
        clean_copy: the copy id of the clean copy: an int, or int64 ``[N]`` when
            rows of a batch pack different numbers of noisy copies.
        block_size: B.
        num_queries: if given, only the last ``num_queries`` tokens are queries
            (decoding: new tokens against the cache plus themselves).

    Returns:
        bool ``[N, Tq, T]`` (or ``[Tq, T]``); ``[..., q, k]`` is True iff q may attend k.
        Padding queries may attend every key (their outputs are never used; an
        empty row would make SDPA return NaN).
    """
    squeeze = seg.dim() == 1
    if squeeze:
        seg, pos, copy = seg[None], pos[None], copy[None]
    nq = seg.shape[1] if num_queries is None else num_queries
    q = slice(seg.shape[1] - nq, None)
    clean = torch.as_tensor(clean_copy, device=seg.device).reshape(-1, 1, 1)
    allowed = _allowed(
        seg[:, q, None], pos[:, q, None], copy[:, q, None],
        seg[:, None, :], pos[:, None, :], copy[:, None, :],
        clean, block_size,
    )
    allowed = allowed | (seg[:, q, None] < 0)
    return allowed[0] if squeeze else allowed


def mask_mod(seg: torch.Tensor, pos: torch.Tensor, copy: torch.Tensor, clean_copy, block_size: int,
             *, num_queries: int | None = None):
    """The same rule as :func:`mask_from_metadata`, as a flex_attention ``mask_mod``.

    Args: as :func:`mask_from_metadata`, with ``[N, T]`` metadata (``clean_copy`` int or ``[N]``);
        with ``num_queries``, query index ``q`` is the ``(T - num_queries + q)``-th token.

    Returns:
        ``fn(b, h, q_idx, kv_idx) -> bool tensor`` for ``torch.nn.attention.flex_attention.create_block_mask``.
    """
    # contiguous: compiled flex kernels cannot capture a stride-0 (expanded) buffer
    clean = torch.as_tensor(clean_copy, device=seg.device).expand(seg.shape[0]).contiguous()
    offset = 0 if num_queries is None else seg.shape[1] - num_queries

    def fn(b, h, q_idx, kv_idx):
        q_idx = q_idx + offset
        allowed = _allowed(
            seg[b, q_idx], pos[b, q_idx], copy[b, q_idx],
            seg[b, kv_idx], pos[b, kv_idx], copy[b, kv_idx],
            clean[b], block_size,
        )
        return allowed | (seg[b, q_idx] < 0)

    return fn


def block_causal_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """Block-causal mask of one clean sequence: query may attend key iff ``blk(k) <= blk(q)``.

    Returns:
        bool ``[L, L]``. At ``block_size = 1`` this is the ordinary causal mask.
    """
    pos, copy = layout_metadata(seq_len, 0, device)
    return mask_from_metadata(torch.zeros_like(pos), pos, copy, 0, block_size)


def block_diffusion_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """Mask of the SFT layout ``[x_t ; x_0]`` (SPEC §2): noisy half first, clean half second.

    Returns:
        bool ``[2L, 2L]``.
    """
    return packed_rounds_mask(1, seq_len, block_size, device)


def packed_rounds_mask(num_rounds: int, seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """Mask of DiPO's packed layout ``[x_t^1; …; x_t^R; x_0]`` (SPEC §4.5).

    Each noisy copy sees itself inside its block and earlier clean blocks; no copy sees
    another noisy copy, and the clean copy is block-causal.

    Returns:
        bool ``[(R+1)·L, (R+1)·L]``.
    """
    pos, copy = layout_metadata(seq_len, num_rounds, device)
    return mask_from_metadata(torch.zeros_like(pos), pos, copy, num_rounds, block_size)


def add_noise(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    mask_token_id: int,
    *,
    eps: float = 1e-3,
    t_min: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random masking for SFT (SPEC §2): one noise level per row.

    ``t ~ U(t_min, 1)``, ``p = (1 - eps)·t + eps``; each eligible position becomes
    ``mask_token_id`` independently with probability ``p``; a row with eligible
    positions but no masked one gets one (uniformly chosen) masked position.

    Args:
        input_ids: int64 ``[N, L]`` clean tokens.
        loss_mask: bool ``[N, L]``, the positions that may be masked (response side).
        mask_token_id: M.
        eps: floor of the masking probability.
        t_min: lower end of ``t`` (> 0 avoids the huge ``1/p`` loss weights of tiny ``t``).
        generator: for reproducibility.

    Returns:
        ``(noisy_ids, is_masked, p)``: int64 ``[N, L]``, bool ``[N, L]``, float32 ``[N]``.
    """
    n, length = input_ids.shape
    device = input_ids.device
    t = t_min + (1.0 - t_min) * torch.rand(n, generator=generator, device=device)
    p = (1.0 - eps) * t + eps
    u = torch.rand(n, length, generator=generator, device=device)
    is_masked = (u < p[:, None]) & loss_mask
    # Force one masked position where none was drawn, so every row has a loss term.
    need = ~is_masked.any(dim=1) & loss_mask.any(dim=1)
    if need.any():
        scores = torch.rand(n, length, generator=generator, device=device).masked_fill(~loss_mask, -1.0)
        forced = torch.zeros_like(is_masked).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
        is_masked = is_masked | (forced & need[:, None])
    noisy_ids = input_ids.masked_fill(is_masked, mask_token_id)
    return noisy_ids, is_masked, p
