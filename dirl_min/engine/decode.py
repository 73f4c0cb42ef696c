"""Block-diffusion decoding (SPEC §3): the batched loop with a KV cache of committed blocks.

One block is denoised in a few steps. Each step proposes a token for every masked
position, then commits some of them (the pure rules in :mod:`dirl_min.core.unmask`).
Once the block is clean, its keys/values enter the cache and the next block starts.

Sampling randomness is counter-based (:func:`dirl_min.core.unmask.uniform_noise`), so a
sequence decodes identically alone or in any batch, cached or not, which is what lets the
tests compare this engine with the uncached reference decoder token for token. The
per-sequence seeds come from the caller's ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dirl_min.core.masks import mask_from_metadata
from dirl_min.core.unmask import propose, select_unmask, uniform_noise

__all__ = ["Rollout", "generate", "generate_text"]


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
    from dirl_min.model.forward import backbone_hidden  # model adapter, kept apart from the pure core

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


@dataclass(frozen=True)
class _Rule:
    """How a step proposes and commits tokens (see :func:`propose`, :func:`select_unmask`)."""

    strategy: str
    threshold: float
    steps: int | None
    temperature: float
    top_k: int
    top_p: float


@dataclass
class _Grid:
    """A batch in columns: prompts left-padded by whole blocks so that every working block
    sits in the same columns. Tensors are ``[n, width]``: ``ids`` int64 (the mask id where
    not yet committed), ``seg`` int64 (-1 on padding), ``pos`` int64 absolute positions,
    ``given`` bool (prompt tokens), ``step_at`` int64 (1-based step that committed each
    token, 0 = none), ``logp_at`` float32 (its log-probability)."""

    ids: torch.Tensor
    seg: torch.Tensor
    pos: torch.Tensor
    given: torch.Tensor
    step_at: torch.Tensor
    logp_at: torch.Tensor
    pad: list[int]  # left padding of each row
    start: int  # K·B: the first column of the first working block


def _layout(prompt_ids: list[list[int]], B: int, mask_id: int, max_blocks: int, device) -> _Grid:
    """The :class:`_Grid` of ``prompt_ids`` with room for ``max_blocks`` working blocks."""
    n_seq = len(prompt_ids)
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
    return _Grid(ids, seg, pos, given, step_at, logp_at, pad, K * B)


def _denoise_block(model, cache, g: _Grid, rows, lo: int, hi: int, pending: int,
                   seed_t, step_count, mask_id: int, rule: _Rule) -> int:
    """Denoise columns ``lo:hi`` of the active ``rows`` until clean (updating ``g`` and
    ``step_count`` in place); the first call also commits ``pending`` clean columns to the
    cache. Returns the number of model calls."""
    B = hi - lo
    ids, seg, pos, given, step_at, logp_at = g.ids, g.seg, g.pos, g.given, g.step_at, g.logp_at
    n_forwards = 0
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
        if rule.temperature > 0:
            noise = uniform_noise(seed_t[rows], pos[rows, lo:hi], steps_now, logits.shape[-1])
        cand, conf, lp = propose(
            logits, temperature=rule.temperature, top_k=rule.top_k, top_p=rule.top_p, noise=noise,
            exclude_token=mask_id,
        )
        commit = select_unmask(conf, masked, rule.strategy, threshold=rule.threshold, steps=rule.steps)
        block_ids = ids[rows, lo:hi]
        ids[rows, lo:hi] = torch.where(commit, cand, block_ids)
        step_at[rows, lo:hi] = torch.where(commit, steps_now[:, None], step_at[rows, lo:hi])
        logp_at[rows, lo:hi] = torch.where(commit, lp, logp_at[rows, lo:hi])
    return n_forwards


def _decode(model, g: _Grid, B: int, mask_id: int, seeds: list[int], stop: torch.Tensor,
            max_blocks: int, fused_commit: bool, rule: _Rule) -> tuple[list[bool], list[int | None], int]:
    """Decode every row of ``g`` block by block (in place), retiring a row once a completed
    block holds a stop token. Returns ``(truncated, stopped_at, num_forwards)``; ``stopped_at``
    is a column of ``g`` (the end of the row's last block)."""
    n_seq, width = g.ids.shape
    device = g.ids.device
    cache = _BlockCache(model.config.num_hidden_layers, width)
    rows = torch.arange(n_seq, device=device)  # original indices of the active rows
    seed_t = torch.tensor(seeds, dtype=torch.long, device=device)
    step_count = torch.zeros(n_seq, dtype=torch.long, device=device)
    truncated = [False] * n_seq
    stopped_at: list[int | None] = [None] * n_seq
    n_forwards = 0
    pending = g.start  # clean columns not yet in the cache

    for blk in range(max_blocks):
        lo, hi = g.start + blk * B, g.start + (blk + 1) * B
        if not fused_commit and pending:
            _forward_block(model, cache, g.ids[rows, :lo], g.seg[rows, :lo], g.pos[rows, :lo], B, pending, pending, 0)
            n_forwards += 1
            pending = 0
        n_forwards += _denoise_block(model, cache, g, rows, lo, hi, pending, seed_t, step_count, mask_id, rule)
        pending = B
        # A block is final once clean: stop on a stop token among its generated tokens.
        new_tok = ~g.given[rows, lo:hi]
        if len(stop):
            hit = (torch.isin(g.ids[rows, lo:hi], stop) & new_tok).any(dim=1)
        else:
            hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=device)
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
    return truncated, stopped_at, n_forwards


def _rollout(g: _Grid, prompt_ids, seeds, stop, truncated, stopped_at, n_forwards,
             B: int, mask_id: int, tokenizer) -> Rollout:
    """The :class:`Rollout` of a decoded grid: each row's response columns, cut texts."""
    pad = g.pad
    response_ids, step_map, logps, texts, cuts = [], [], [], [], []
    stop_set = set(stop.tolist())
    for i, p in enumerate(prompt_ids):
        start, end = pad[i] + len(p), stopped_at[i]
        response_ids.append(g.ids[i, start:end].tolist())
        step_map.append(g.step_at[i, start:end].tolist())
        logps.append(g.logp_at[i, start:end].tolist())
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
    grid = _layout(prompt_ids, B, mask_id, max_blocks, device)
    rule = _Rule(strategy, threshold, steps, temperature, top_k, top_p)
    truncated, stopped_at, n_forwards = _decode(model, grid, B, mask_id, seeds, stop, max_blocks, fused_commit, rule)
    return _rollout(grid, prompt_ids, seeds, stop, truncated, stopped_at, n_forwards, B, mask_id, tokenizer)


def generate_text(model, tokenizer, prompts, **kwargs) -> Rollout:
    """:func:`generate` on chat prompts: each prompt is a user message (str) or a list of
    chat messages, rendered with the tokenizer's chat template; stops on its eos and
    end-of-turn tokens unless ``stop_token_ids`` is given."""
    from dirl_min.model import chat_prompt_ids, stop_token_ids

    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    kwargs.setdefault("stop_token_ids", stop_token_ids(tokenizer))
    return generate(model, ids, tokenizer=tokenizer, **kwargs)
