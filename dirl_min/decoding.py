"""Block-diffusion decoding (SPEC §3): pure per-step functions and the batched, KV-cached loop.

One block is denoised in a few steps. Each step proposes a token for every masked
position (:func:`propose`), then commits some of them (:func:`select_unmask`).
Once the block is clean, its keys/values enter the cache and the next block starts.

Sampling randomness is counter-based: the noise for a proposal is a hash of
(sequence seed, absolute position, the sequence's step index, vocabulary id). A
sequence therefore decodes identically alone or in any batch, cached or not, which
is what lets the tests compare this engine with the uncached reference decoder
token for token. The per-sequence seeds come from the caller's ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dirl_min.masking import mask_from_metadata

__all__ = [
    "STRATEGIES",
    "select_unmask",
    "uniform_noise",
    "propose",
    "Rollout",
    "generate",
    "generate_text",
]

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


@dataclass
class Rollout:
    """What the decoder produced, per sequence (all lists have one entry per prompt).

    ``response_ids`` holds every generated token of the completed blocks (tokens after a
    stop token inside its block included: they were really generated and are trained
    on). ``step_map[i][j]`` is the 1-based global step that committed ``response_ids[i][j]``
    and ``logp[i][j]`` its log-probability under the untempered, untruncated policy.
    ``text`` is cut at the first stop token. ``num_forwards`` counts model calls for the
    whole batch.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    step_map: list[list[int]]
    logp: list[list[float]]
    truncated: list[bool]
    stopped_at: list[int | None]
    block_size: int
    mask_token_id: int
    num_forwards: int = 0
    text: list[str] | None = None
    seeds: list[int] = field(default_factory=list)
    text_lengths: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def num_steps(self, i: int) -> int:
        """Distinct denoising steps of sequence i."""
        return len(set(self.step_map[i]))

    def length_to_stop(self, i: int) -> int:
        """Response tokens before the first stop token (what a user reads)."""
        return self.text_lengths[i] if self.text_lengths else len(self.response_ids[i])

    def tokens_per_step(self, i: int) -> float:
        """Response tokens per distinct step, in ``[1, B]`` (SPEC §3)."""
        return len(self.response_ids[i]) / max(1, self.num_steps(i))


class _BlockCache:
    """K/V of committed tokens in preallocated buffers, duck-typed as a transformers Cache.

    ``update`` writes the new keys/values after the committed ones and returns the whole
    prefix; only the first ``keep`` new tokens become committed, so the working block's
    K/V are overwritten by the next call instead of being kept (SPEC §3, step 1).
    """

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0
        self.keep = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys[layer_idx] is None:
            n, h, _, d = key_states.shape
            self.keys[layer_idx] = key_states.new_empty(n, h, self.capacity, d)
            self.values[layer_idx] = value_states.new_empty(n, h, self.capacity, d)
        end = self.length + key_states.shape[2]
        self.keys[layer_idx][:, :, self.length:end] = key_states
        self.values[layer_idx][:, :, self.length:end] = value_states
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def select_rows(self, rows: torch.Tensor) -> None:
        self.keys = [k if k is None else k[rows] for k in self.keys]
        self.values = [v if v is None else v[rows] for v in self.values]


def _forward_block(model, cache, ids, seg, pos, block_size, num_queries, keep, num_logits):
    """One model call over the last ``num_queries`` columns; returns logits of the last ``num_logits``.

    ids/seg/pos: int64 ``[n, T]`` for every column so far (cache + new). The new columns
    are ``keep`` clean (committed) tokens followed by ``num_logits`` noisy working tokens.
    """
    from dirl_min.forward import backbone_hidden  # model adapter, kept apart from the pure core

    n, total = ids.shape
    copy = torch.ones_like(seg)
    copy[:, total - num_logits:] = 0  # working block = noisy copy 0; everything else clean (1)
    mask = mask_from_metadata(seg, pos, copy, 1, block_size, num_queries=num_queries)
    cache.keep = keep
    hidden = backbone_hidden(
        model,
        ids[:, total - num_queries:],
        pos[:, total - num_queries:].clamp(min=0),
        mask[:, None],
        cache,
    )
    cache.length += keep
    if num_logits == 0:
        return None
    return model.get_output_embeddings()(hidden[:, -num_logits:])


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int = 256,
    strategy: str = "low_confidence_dynamic",
    threshold: float = 0.9,
    steps: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_ids: list[int] | tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    seeds: list[int] | None = None,
    fused_commit: bool = True,
    tokenizer=None,
) -> Rollout:
    """Batched block-diffusion decoding with a KV cache of committed blocks (SPEC §3).

    Args:
        model: a causal-LM backbone whose ``config`` has ``block_size`` and
            ``mask_token_id`` (the single source of truth for both).
        prompt_ids: one token-id list per prompt; lengths may differ.
        max_new_tokens: counted in whole blocks: at most ``ceil(max_new_tokens / B)``
            working blocks per sequence.
        strategy, threshold, steps: see :func:`select_unmask`.
        temperature, top_k, top_p: see :func:`propose` (``temperature=0``: greedy).
        stop_token_ids: checked on completed blocks; the block is kept whole.
        generator: draws one seed per sequence (or pass ``seeds``).
        fused_commit: write a finished block's K/V in the same forward as the next
            block's first step (one ``2B``-token call) instead of a separate pass.
        tokenizer: if given, ``Rollout.text`` is filled (cut at the first stop token).

    Returns:
        a :class:`Rollout`.
    """
    from dirl_min.model import diffusion_settings

    block_size, mask_id = diffusion_settings(model)
    B = block_size
    device = next(model.parameters()).device
    n_seq = len(prompt_ids)
    if seeds is None:
        seeds = torch.randint(0, 2**32, (n_seq,), generator=generator).tolist()
    max_blocks = max(1, -(-max_new_tokens // B))
    stop = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)

    full_blocks = [len(p) // B for p in prompt_ids]
    K = max(full_blocks)
    pad = [(K - k) * B for k in full_blocks]
    width = K * B + max_blocks * B
    ids = torch.full((n_seq, width), mask_id, dtype=torch.long, device=device)
    seg = torch.zeros((n_seq, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        # Left-pad by whole blocks so every working block sits in the same columns.
        ids[i, pad[i]:pad[i] + len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        seg[i, :pad[i]] = -1
    pos = torch.arange(width, device=device)[None, :] - torch.tensor(pad, device=device)[:, None]
    given = torch.zeros((n_seq, width), dtype=torch.bool, device=device)
    given[:, : K * B] = True
    for i, p in enumerate(prompt_ids):
        given[i, K * B: pad[i] + len(p)] = True
    step_at = torch.zeros((n_seq, width), dtype=torch.long, device=device)
    logp_at = torch.zeros((n_seq, width), dtype=torch.float32, device=device)

    cache = _BlockCache(model.config.num_hidden_layers, width)
    rows = torch.arange(n_seq, device=device)  # original indices of the active rows
    seed_t = torch.tensor(seeds, dtype=torch.long, device=device)
    step_count = torch.zeros(n_seq, dtype=torch.long, device=device)
    truncated = [False] * n_seq
    stopped_at: list[int | None] = [None] * n_seq
    n_forwards = 0
    pending = K * B  # clean columns not yet in the cache

    for blk in range(max_blocks):
        lo, hi = K * B + blk * B, K * B + (blk + 1) * B
        if not fused_commit and pending:
            _forward_block(model, cache, ids[rows, :lo], seg[rows, :lo], pos[rows, :lo], B, pending, pending, 0)
            n_forwards += 1
            pending = 0
        while True:
            masked = ~given[rows, lo:hi] & (step_at[rows, lo:hi] == 0)
            todo = masked.any(dim=1)
            if not todo.any():
                break
            logits = _forward_block(
                model, cache, ids[rows, :hi], seg[rows, :hi], pos[rows, :hi], B, pending + B, pending, B
            )
            n_forwards += 1
            pending = 0
            step_count[rows] += todo.long()
            steps_now = step_count[rows]
            noise = None
            if temperature > 0:
                noise = uniform_noise(seed_t[rows], pos[rows, lo:hi], steps_now, logits.shape[-1])
            cand, conf, lp = propose(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, noise=noise, exclude_token=mask_id
            )
            commit = select_unmask(conf, masked, strategy, threshold=threshold, steps=steps)
            block_ids = ids[rows, lo:hi]
            ids[rows, lo:hi] = torch.where(commit, cand, block_ids)
            step_at[rows, lo:hi] = torch.where(commit, steps_now[:, None], step_at[rows, lo:hi])
            logp_at[rows, lo:hi] = torch.where(commit, lp, logp_at[rows, lo:hi])
        pending = B
        # A block is final once clean: stop on a stop token among its generated tokens.
        new_tok = ~given[rows, lo:hi]
        hit = (torch.isin(ids[rows, lo:hi], stop) & new_tok).any(dim=1) if len(stop) else torch.zeros_like(todo)
        done = hit | (blk == max_blocks - 1)
        for r, h in zip(rows[done].tolist(), hit[done].tolist()):
            truncated[r] = not h
            stopped_at[r] = hi
        if done.all():
            break
        if done.any():
            keep = ~done
            rows = rows[keep]
            cache.select_rows(keep.nonzero()[:, 0])

    response_ids, step_map, logps, texts, cuts = [], [], [], [], []
    stop_set = set(stop.tolist())
    for i, p in enumerate(prompt_ids):
        start, end = pad[i] + len(p), stopped_at[i]
        response_ids.append(ids[i, start:end].tolist())
        step_map.append(step_at[i, start:end].tolist())
        logps.append(logp_at[i, start:end].tolist())
        toks = response_ids[-1]
        cuts.append(next((j for j, t in enumerate(toks) if t in stop_set), len(toks)))
        if tokenizer is not None:
            texts.append(tokenizer.decode(toks[: cuts[-1]], skip_special_tokens=False))
    return Rollout(
        prompt_ids=[list(p) for p in prompt_ids],
        response_ids=response_ids,
        step_map=step_map,
        logp=logps,
        truncated=truncated,
        stopped_at=[s - pad[i] if s is not None else None for i, s in enumerate(stopped_at)],
        block_size=B,
        mask_token_id=mask_id,
        num_forwards=n_forwards,
        text=texts if tokenizer is not None else None,
        seeds=list(seeds),
        text_lengths=cuts,
    )


def generate_text(model, tokenizer, prompts, **kwargs) -> Rollout:
    """:func:`generate` on chat prompts: each prompt is a user message (str) or a list of
    chat messages, rendered with the tokenizer's chat template; stops on its eos and
    end-of-turn tokens unless ``stop_token_ids`` is given."""
    from dirl_min.model import chat_prompt_ids, stop_token_ids

    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    kwargs.setdefault("stop_token_ids", stop_token_ids(tokenizer))
    return generate(model, ids, tokenizer=tokenizer, **kwargs)
