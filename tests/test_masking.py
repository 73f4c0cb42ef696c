"""dirl_min.masking against the literal-loop reference (reference/masking.py) and SPEC §2 invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dirl_min.masking import (
    add_noise,
    block_causal_mask,
    block_diffusion_mask,
    layout_metadata,
    mask_from_metadata,
    mask_mod,
    packed_rounds_mask,
)
from reference import masking as ref

FAST = settings(deadline=None, max_examples=40)




lengths = st.integers(1, 40)
blocks = st.integers(1, 16)


# ---------------------------------------------------------------- reference equality


@FAST
@given(L=lengths, B=blocks)
def test_block_causal_matches_reference(L, B):
    assert torch.equal(block_causal_mask(L, B), ref.block_causal_mask(L, B))


@FAST
@given(L=lengths, B=blocks)
def test_block_diffusion_matches_reference(L, B):
    assert torch.equal(block_diffusion_mask(L, B), ref.block_diffusion_mask(L, B))


@FAST
@given(R=st.integers(1, 5), L=lengths, B=blocks)
def test_packed_rounds_matches_reference(R, L, B):
    assert torch.equal(packed_rounds_mask(R, L, B), ref.packed_rounds_mask(R, L, B))


@pytest.mark.parametrize("L,B", [(7, 4), (10, 4), (13, 3), (5, 16), (1, 1), (9, 2)])
def test_non_multiple_lengths_match_reference(L, B):
    """Explicit cases where L is not a multiple of B (partial last block)."""
    assert torch.equal(block_causal_mask(L, B), ref.block_causal_mask(L, B))
    assert torch.equal(block_diffusion_mask(L, B), ref.block_diffusion_mask(L, B))
    for R in (1, 2, 3):
        assert torch.equal(packed_rounds_mask(R, L, B), ref.packed_rounds_mask(R, L, B))


def test_tiny_block_diffusion_by_hand():
    """L=3, B=2: worked out by hand from SPEC §2."""
    expected = torch.tensor(
        [
            # x_t: 0 1 2 | x_0: 0 1 2
            [1, 1, 0, 0, 0, 0],  # noisy pos 0 (blk 0)
            [1, 1, 0, 0, 0, 0],  # noisy pos 1 (blk 0)
            [0, 0, 1, 1, 1, 0],  # noisy pos 2 (blk 1): itself + clean blk 0
            [0, 0, 0, 1, 1, 0],  # clean pos 0
            [0, 0, 0, 1, 1, 0],  # clean pos 1
            [0, 0, 0, 1, 1, 1],  # clean pos 2
        ],
        dtype=torch.bool,
    )
    assert torch.equal(block_diffusion_mask(3, 2), expected)
    assert torch.equal(ref.block_diffusion_mask(3, 2), expected)


# ---------------------------------------------------------------- invariants


@FAST
@given(L=lengths)
def test_block_size_one_is_causal(L):
    assert torch.equal(block_causal_mask(L, 1), torch.ones(L, L).tril().bool())


@FAST
@given(L=lengths, B=blocks)
def test_clean_never_sees_noisy_and_diagonal(L, B):
    m = block_diffusion_mask(L, B)
    assert not m[L:, :L].any(), "a clean query attends a noisy key"
    assert m.diagonal().all(), "a query does not see itself"
    # the clean half alone is the block-causal mask
    assert torch.equal(m[L:, L:], block_causal_mask(L, B))


@FAST
@given(R=st.integers(1, 5), L=lengths, B=blocks)
def test_packed_rounds_invariants(R, L, B):
    m = packed_rounds_mask(R, L, B)
    assert m.diagonal().all()
    for a in range(R):
        for b in range(R):
            if a != b:
                assert not m[a * L:(a + 1) * L, b * L:(b + 1) * L].any(), f"noisy copy {a} sees noisy copy {b}"
        # each noisy copy, together with the clean copy, is exactly the SFT layout
        idx = torch.cat([torch.arange(a * L, (a + 1) * L), torch.arange(R * L, (R + 1) * L)])
        assert torch.equal(m[idx][:, idx], block_diffusion_mask(L, B))
    assert not m[R * L:, :R * L].any(), "clean copy sees a noisy copy"


# ---------------------------------------------------------------- packed rows (metadata)


def _pack_row(examples, clean_id, width):
    """seg/pos/copy of one row packing examples [(R_e, L_e)] (noisy copy ids 0..R_e-1, clean id clean_id)."""
    seg, pos, copy = [], [], []
    for e, (R, L) in enumerate(examples):
        p, c = layout_metadata(L, R)
        c = torch.where(c == R, torch.full_like(c, clean_id), c)
        seg.append(torch.full_like(p, e))
        pos.append(p)
        copy.append(c)
    n = sum(len(s) for s in seg)
    pad = width - n
    seg.append(torch.full((pad,), -1, dtype=torch.long))
    pos.append(torch.zeros(pad, dtype=torch.long))
    copy.append(torch.zeros(pad, dtype=torch.long))
    return torch.cat(seg), torch.cat(pos), torch.cat(copy), n


packed_examples = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 9)), min_size=1, max_size=4)


@FAST
@given(ex=packed_examples, B=st.integers(1, 6), pad=st.integers(0, 5))
def test_mask_from_metadata_packed_row(ex, B, pad):
    C = max(R for R, _ in ex)
    width = sum((R + 1) * L for R, L in ex) + pad
    seg, pos, copy, n = _pack_row(ex, C, width)
    m = mask_from_metadata(seg, pos, copy, C, B)
    expected = ref.packed_mask(ex, B, width)
    assert torch.equal(m, expected)
    # block-diagonal: no real query attends across examples, nor any padding key
    real = seg >= 0
    cross = (seg[:, None] != seg[None, :]) & real[:, None]
    assert not (m & cross).any()
    assert not m[real][:, ~real].any()
    # num_queries = k gives the last k rows
    for k in {1, width // 2, width}:
        if k >= 1:
            assert torch.equal(mask_from_metadata(seg, pos, copy, C, B, num_queries=k), m[width - k:])


@FAST
@given(rows=st.lists(packed_examples, min_size=1, max_size=3), B=st.integers(1, 6))
def test_mask_from_metadata_batched_per_row_clean_copy(rows, B):
    """A batch whose rows have different clean-copy ids (clean_copy as a [N] tensor)."""
    widths = [sum((R + 1) * L for R, L in ex) for ex in rows]
    width = max(widths) + 1
    segs, poss, copies, cleans, expected = [], [], [], [], []
    for ex in rows:
        C = max(R for R, _ in ex)
        s, p, c, _ = _pack_row(ex, C, width)
        segs.append(s)
        poss.append(p)
        copies.append(c)
        cleans.append(C)
        expected.append(ref.packed_mask(ex, B, width))
    seg, pos, copy = torch.stack(segs), torch.stack(poss), torch.stack(copies)
    clean = torch.tensor(cleans)
    m = mask_from_metadata(seg, pos, copy, clean, B)
    assert torch.equal(m, torch.stack(expected))
    assert torch.equal(mask_from_metadata(seg, pos, copy, clean, B, num_queries=3), m[:, width - 3:])
    # mask_mod evaluated on broadcast index tensors agrees elementwise
    fn = mask_mod(seg, pos, copy, clean, B)
    N, T = seg.shape
    b = torch.arange(N)[:, None, None]
    q = torch.arange(T)[None, :, None]
    k = torch.arange(T)[None, None, :]
    h = torch.zeros((), dtype=torch.long)
    assert torch.equal(fn(b, h, q, k).expand(N, T, T), m)


@FAST
@given(R=st.integers(0, 4), L=st.integers(1, 20), B=st.integers(1, 8))
def test_mask_mod_elementwise_matches_dense(R, L, B):
    pos, copy = layout_metadata(L, R)
    seg = torch.zeros_like(pos)
    seg, pos, copy = seg[None], pos[None], copy[None]
    dense = mask_from_metadata(seg, pos, copy, R, B)
    fn = mask_mod(seg, pos, copy, R, B)
    T = seg.shape[1]
    got = fn(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long),
             torch.arange(T)[:, None], torch.arange(T)[None, :])
    assert torch.equal(got, dense[0])
    assert torch.equal(dense[0], ref.packed_rounds_mask(R, L, B))


def test_mask_mod_with_flex_attention_helpers():
    """create_mask (vmap over mask_mod) and create_block_mask agree with the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    B = 3
    seg, pos, copy, _ = _pack_row([(2, 7), (1, 5), (2, 4)], 2, 50)
    seg2, pos2, copy2, _ = _pack_row([(1, 9)], 2, 50)
    seg, pos, copy = torch.stack([seg, seg2]), torch.stack([pos, pos2]), torch.stack([copy, copy2])
    clean = torch.tensor([2, 2])
    dense = mask_from_metadata(seg, pos, copy, clean, B)
    fn = mask_mod(seg, pos, copy, clean, B)
    N, T = seg.shape
    full = create_mask(fn, N, 1, T, T, device="cpu")  # both run on CPU: a failure here is a failure
    tile = 8
    bm = create_block_mask(fn, N, None, T, T, device="cpu", BLOCK_SIZE=tile)
    assert torch.equal(full[:, 0].bool(), dense)
    # BlockMask at tile granularity: a tile is present iff some element in it may attend
    nt = -(-T // tile)
    padded = torch.zeros(N, nt * tile, nt * tile, dtype=torch.bool)
    padded[:, :T, :T] = dense
    tiles = padded.view(N, nt, tile, nt, tile).any(dim=4).any(dim=2)
    assert torch.equal(bm.to_dense()[:, 0].bool(), tiles)


# ---------------------------------------------------------------- add_noise


M = 999


@st.composite
def noise_inputs(draw):
    n = draw(st.integers(1, 6))
    length = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**31 - 1))  # of add_noise's own generator
    ids = torch.tensor(draw(st.lists(st.integers(0, 49), min_size=n * length, max_size=n * length))).view(n, length)
    if draw(st.booleans()):  # realistic: a prompt prefix then the response side
        prompt = torch.tensor(draw(st.lists(st.integers(0, length), min_size=n, max_size=n)))[:, None]
        loss_mask = torch.arange(length)[None] >= prompt
    else:
        loss_mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n * length, max_size=n * length))).view(n, length)
    return ids, loss_mask, seed


@settings(deadline=None, max_examples=60)
@given(inp=noise_inputs(), eps=st.sampled_from([1e-3, 0.05]), t_min=st.sampled_from([0.0, 0.3, 0.9]))
def test_add_noise_invariants(inp, eps, t_min):
    ids, loss_mask, seed = inp
    noisy, is_masked, p = add_noise(ids, loss_mask, M, eps=eps, t_min=t_min,
                                    generator=torch.Generator().manual_seed(seed))
    assert noisy.shape == ids.shape and is_masked.shape == ids.shape and p.shape == (ids.shape[0],)
    assert is_masked.dtype == torch.bool
    assert not (is_masked & ~loss_mask).any(), "a position outside loss_mask was masked"
    eligible = loss_mask.any(dim=1)
    assert is_masked[eligible].any(dim=1).all(), "a row with eligible positions has no masked one"
    assert not is_masked[~eligible].any()
    assert torch.equal(noisy[is_masked], torch.full_like(noisy[is_masked], M))
    assert torch.equal(noisy[~is_masked], ids[~is_masked])
    # p = (1-eps) t + eps with t in [t_min, 1]
    lo = (1 - eps) * t_min + eps
    assert (p >= lo - 1e-6).all() and (p <= 1 + 1e-6).all()
    assert (p >= eps - 1e-7).all()
    # reproducible with the same generator seed
    again = add_noise(ids, loss_mask, M, eps=eps, t_min=t_min, generator=torch.Generator().manual_seed(seed))
    for a, b in zip((noisy, is_masked, p), again):
        assert torch.equal(a, b)


def test_add_noise_rate_matches_p():
    """Over many rows, the masked fraction of eligible positions tracks p (statistical)."""
    g = torch.Generator().manual_seed(1234)
    n, length = 4000, 64
    ids = torch.randint(0, 50, (n, length), generator=g)
    loss_mask = torch.ones(n, length, dtype=torch.bool)
    loss_mask[:, :10] = False  # a prompt
    noisy, is_masked, p = add_noise(ids, loss_mask, M, generator=g)
    eligible = loss_mask.sum(dim=1).float()
    rate = is_masked.sum(dim=1).float() / eligible
    # Per row: Binomial(54, p) (+ the forced one when none drawn), so E[rate] ~= p (+ <=1/54 for tiny p).
    assert abs(float((rate - p).mean())) < 0.01
    # Bucketed by p, the mean rate follows p.
    for lo in torch.arange(0.0, 1.0, 0.1):
        sel = (p >= lo) & (p < lo + 0.1)
        if sel.sum() > 100:
            assert abs(float(rate[sel].mean() - p[sel].mean())) < 0.03
    # t ~ U(0, 1): p roughly uniform on [eps, 1]
    assert abs(float(p.mean()) - 0.5) < 0.03
    # only eligible positions, never the prompt
    assert not is_masked[:, :10].any()


def test_add_noise_t_min_respected():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 50, (2000, 16), generator=g)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    _, is_masked, p = add_noise(ids, loss_mask, M, t_min=0.5, generator=g)
    eps = 1e-3
    assert float(p.min()) >= (1 - eps) * 0.5 + eps - 1e-6
    assert float(is_masked.float().mean()) > 0.7  # E[p] = 0.75
    assert abs(float(p.mean()) - 0.75) < 0.02
