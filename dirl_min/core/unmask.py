"""The pure unmasking rules of block-diffusion decoding (SPEC §3, steps 2-4).

Each denoising step proposes a token for every masked position (:func:`propose`), then
commits some of them (:func:`select_unmask`). Sampling randomness is counter-based
(:func:`uniform_noise`): the noise for a proposal is a hash of (sequence seed, absolute
position, the sequence's step index, vocabulary id), so a sequence decodes identically
alone or in any batch, cached or not. The loop that runs the model is
:mod:`dirl_min.engine.decode`.
"""

from __future__ import annotations

import torch

__all__ = ["STRATEGIES", "select_unmask", "uniform_noise", "propose"]

STRATEGIES = ("low_confidence_static", "low_confidence_dynamic", "sequential")


def select_unmask(
    confidence: torch.Tensor,
    is_masked: torch.Tensor,
    strategy: str,
    *,
    threshold: float = 0.9,
    steps: int | None = None,
) -> torch.Tensor:
    """Which masked positions to commit in one denoising step (SPEC §3, step 4).

    Args:
        confidence: float ``[N, B]``, the confidence of each position's candidate.
        is_masked: bool ``[N, B]``, positions still masked (only these can be chosen).
        strategy: ``low_confidence_static`` (the ``k = max(1, B // steps)`` most
            confident), ``low_confidence_dynamic`` (the most confident one plus every
            one with ``confidence >= threshold``) or ``sequential`` (the leftmost ``k``).
        threshold: for the dynamic strategy.
        steps: denoising steps per block for static/sequential (default ``B``).

    Returns:
        bool ``[N, B]``: a subset of ``is_masked``, never more than remain, and at
        least one position in every row that has a masked position. Ties in
        confidence go to the leftmost position.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown unmasking strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    n, b = is_masked.shape
    k = max(1, b // (steps or b))
    if strategy == "sequential":
        order = torch.cumsum(is_masked.long(), dim=1)  # 1 for the leftmost masked, 2 for the next…
        return is_masked & (order <= k)
    # float64 so that a float32 0.8999999762 is not >= a threshold of 0.9
    conf = confidence.double().masked_fill(~is_masked, float("-inf"))
    # A stable descending sort gives each masked position its rank, ties broken leftmost-first.
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(b, device=order.device).expand(n, b))
    if strategy == "low_confidence_static":
        return is_masked & (rank < k)
    return is_masked & ((rank == 0) | (conf >= threshold))


_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) on int64 tensors holding values in ``[0, 2^32)``."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32  # the low 32 bits are right even where int64 wraps
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Counter-based uniforms in (0, 1) for sampling, one per vocabulary entry.

    Args:
        seeds: int64 ``[N]`` in ``[0, 2^32)``, one per sequence.
        positions: int64 ``[N, B]`` absolute positions of the block's tokens.
        steps: int64 ``[N]`` the sequence's global step index (1-based).
        vocab_size: V.

    Returns:
        float64 ``[N, B, V]``; a pure function of its arguments.
    """
    h = _hash32(seeds.long() & _M32)[:, None]
    h = _hash32(h ^ positions.long())
    h = _hash32(h ^ steps.long()[:, None])
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.long)
    u = _hash32(h[:, :, None] ^ vocab)
    return (u.double() + 0.5) / 2.0**32


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to -inf. ``[..., V]`` → ``[..., V]``."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def propose(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    noise: torch.Tensor | None = None,
    exclude_token: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate tokens, their confidences and log-probabilities (SPEC §3, steps 2–3).

    Args:
        logits: float ``[N, B, V]`` raw model logits of the block.
        temperature: 0 means greedy (argmax); otherwise sampling from the tempered,
            top-k/top-p truncated distribution by the Gumbel-max trick.
        noise: float ``[N, B, V]`` uniforms in (0, 1) (:func:`uniform_noise`); required
            when sampling.
        exclude_token: a token never proposed (the mask token: committing it would
            leave the position masked). It still counts in the softmax normalisers.

    Returns:
        ``(candidates, confidence, logp)``: int64 ``[N, B]``; float32 ``[N, B]`` the
        candidate's probability under ``softmax(logits / temperature)`` *before*
        truncation (untempered when greedy); float32 ``[N, B]`` its log-probability
        under the untempered, untruncated softmax (the policy being trained).
    """
    logits = logits.float()
    logp_all = torch.log_softmax(logits, dim=-1)
    allowed = logits
    if exclude_token is not None:
        allowed = logits.clone()
        allowed[..., exclude_token] = float("-inf")
    if temperature <= 0:
        candidates = allowed.argmax(dim=-1)
        conf_logp = logp_all
    else:
        scaled = logits / temperature
        conf_logp = torch.log_softmax(scaled, dim=-1)
        if noise is None:
            raise ValueError("sampling (temperature > 0) needs noise; see uniform_noise()")
        gumbel = -torch.log(-torch.log(noise))
        candidates = (_truncate(allowed / temperature, top_k, top_p).double() + gumbel).argmax(dim=-1)
    pick = candidates[..., None]
    confidence = conf_logp.gather(-1, pick)[..., 0].exp()
    logp = logp_all.gather(-1, pick)[..., 0]
    return candidates, confidence, logp
