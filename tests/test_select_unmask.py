"""select_unmask, propose and uniform_noise (SPEC §3 steps 2-4) against reference/decoding.py and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dirl_min.core.unmask import STRATEGIES, _truncate, propose, select_unmask, uniform_noise
from reference import decoding as ref

FAST = settings(deadline=None, max_examples=60)




# Confidences exactly representable in float32, so float32 (core) and float64 (reference)
# comparisons with the threshold agree; drawn from a small set to create ties.
DYADIC = [0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 0.9375, 1.0]


@st.composite
def unmask_case(draw):
    n = draw(st.integers(1, 6))
    b = draw(st.integers(1, 16))
    if draw(st.booleans()):
        conf = draw(st.lists(st.sampled_from(DYADIC), min_size=n * b, max_size=n * b))
    else:
        conf = draw(st.lists(st.floats(0, 1, width=32), min_size=n * b, max_size=n * b))
    masked = draw(st.lists(st.booleans(), min_size=n * b, max_size=n * b))
    threshold = draw(st.sampled_from(DYADIC + [0.9]))
    steps = draw(st.one_of(st.none(), st.integers(1, b + 3)))
    conf_t = torch.tensor(conf, dtype=torch.float32).view(n, b)
    masked_t = torch.tensor(masked, dtype=torch.bool).view(n, b)
    return conf_t, masked_t, threshold, steps


@FAST
@given(case=unmask_case(), strategy=st.sampled_from(STRATEGIES))
def test_select_unmask_matches_reference(case, strategy):
    conf, masked, threshold, steps = case
    got = select_unmask(conf, masked, strategy, threshold=threshold, steps=steps)
    assert got.shape == masked.shape and got.dtype == torch.bool
    for i in range(conf.shape[0]):
        expected = ref.select_unmask(conf[i].tolist(), masked[i].tolist(), strategy, threshold, steps)
        assert got[i].tolist() == expected, (i, conf[i].tolist(), masked[i].tolist())


@FAST
@given(case=unmask_case(), strategy=st.sampled_from(STRATEGIES))
@example(case=(torch.tensor([[0.95, 0.9]]), torch.tensor([[True, True]]), 0.9, None), strategy="low_confidence_dynamic")
def test_select_unmask_invariants(case, strategy):
    conf, masked, threshold, steps = case
    got = select_unmask(conf, masked, strategy, threshold=threshold, steps=steps)
    n, b = masked.shape
    k = max(1, b // (steps or b))
    assert not (got & ~masked).any(), "committed a position that is not masked"
    remain = masked.sum(dim=1)
    count = got.sum(dim=1)
    assert (count <= remain).all()
    assert (count[remain == 0] == 0).all()
    if strategy == "low_confidence_dynamic":
        assert (count[remain > 0] >= 1).all()
        # every masked position with conf >= threshold is committed (compared exactly, in float64:
        # a float32 0.8999999762 is below a threshold of 0.9, as in select_unmask)
        assert not (masked & (conf.double() >= threshold) & ~got).any()
        # the most confident masked position is committed
        best = conf.masked_fill(~masked, -1.0).max(dim=1).values
        for i in range(n):
            if remain[i] > 0:
                assert (got[i] & (conf[i] == best[i])).any()
    else:
        assert torch.equal(count, torch.clamp(remain, max=k))
    if strategy == "sequential":
        for i in range(n):
            idx = masked[i].nonzero().flatten().tolist()[:k]
            assert got[i].nonzero().flatten().tolist() == idx
    if strategy == "low_confidence_static":
        # no uncommitted masked position is more confident than a committed one
        for i in range(n):
            if got[i].any() and (masked[i] & ~got[i]).any():
                assert conf[i][masked[i] & ~got[i]].max() <= conf[i][got[i]].min()


def test_select_unmask_unknown_strategy():
    with pytest.raises(ValueError) as info:
        select_unmask(torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool), "topk")
    for name in STRATEGIES:
        assert name in str(info.value)


def test_select_unmask_never_overwrites_when_fewer_remain_than_k():
    """SPEC §7: topk must not overwrite decoded tokens when fewer masks remain than k."""
    conf = torch.tensor([[0.9, 0.8, 0.1, 0.7]])
    masked = torch.tensor([[False, False, True, False]])
    for strategy in STRATEGIES:
        got = select_unmask(conf, masked, strategy, steps=1)  # k = 4
        assert got.tolist() == [[False, False, True, False]]


# ---------------------------------------------------------------- propose


@st.composite
def logits_case(draw):
    n = draw(st.integers(1, 3))
    b = draw(st.integers(1, 4))
    v = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))  # of the sampling noise
    scale = draw(st.sampled_from([0.5, 2.0, 6.0]))
    values = draw(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=n * b * v, max_size=n * b * v))
    logits = torch.tensor(values, dtype=torch.float32).view(n, b, v) * scale
    exclude = draw(st.one_of(st.none(), st.integers(0, v - 1)))
    return logits, exclude, seed


def _tempered_allowed(logits, temperature, exclude):
    scaled = logits.double() / temperature
    if exclude is not None:
        scaled = scaled.clone()
        scaled[..., exclude] = -math.inf
    return scaled


@FAST
@given(case=logits_case())
def test_propose_greedy(case):
    logits, exclude, _ = case
    cand, conf, logp = propose(logits, temperature=0.0, exclude_token=exclude)
    allowed = logits.clone()
    if exclude is not None:
        allowed[..., exclude] = -math.inf
        assert not (cand == exclude).any()
    assert torch.equal(cand, allowed.argmax(dim=-1))
    probs = torch.softmax(logits.double(), dim=-1)
    lps = torch.log_softmax(logits.double(), dim=-1)
    assert torch.allclose(conf.double(), probs.gather(-1, cand[..., None])[..., 0], atol=1e-6)
    assert torch.allclose(logp.double(), lps.gather(-1, cand[..., None])[..., 0], atol=1e-5)


@FAST
@given(case=logits_case(), temperature=st.sampled_from([0.5, 1.0, 1.7]),
       top_k=st.sampled_from([0, 1, 2, 3, 50]), top_p=st.sampled_from([1.0, 0.95, 0.7, 0.3]),
       step=st.integers(1, 100))
def test_propose_sampling(case, temperature, top_k, top_p, step):
    logits, exclude, seed = case
    n, b, v = logits.shape
    noise = uniform_noise(torch.full((n,), seed, dtype=torch.long) + torch.arange(n),
                          torch.arange(n * b).view(n, b), torch.full((n,), step, dtype=torch.long), v)
    cand, conf, logp = propose(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                               noise=noise, exclude_token=exclude)
    if exclude is not None:
        assert not (cand == exclude).any()
    # confidence: softmax(logits / T) before truncation; logp: untempered, untruncated
    tempered = torch.softmax(logits.double() / temperature, dim=-1).gather(-1, cand[..., None])[..., 0]
    assert torch.allclose(conf.double(), tempered, atol=1e-6)
    lps = torch.log_softmax(logits.double(), dim=-1).gather(-1, cand[..., None])[..., 0]
    assert torch.allclose(logp.double(), lps, atol=1e-5)
    scaled = _tempered_allowed(logits, temperature, exclude)
    picked = scaled.gather(-1, cand[..., None])[..., 0]
    assert torch.isfinite(picked).all()
    if top_k:
        kk = min(top_k, v)
        kth = torch.topk(scaled, kk, dim=-1).values[..., -1]
        assert (picked >= kth - 1e-9).all(), "candidate outside the top-k set"
        scaled = scaled.masked_fill(scaled < kth[..., None], -math.inf)
    if top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)
        p_cand = probs.gather(-1, cand[..., None])
        mass_above = (probs * (probs > p_cand + 1e-12)).sum(dim=-1)
        assert (mass_above < top_p + 1e-6).all(), "candidate outside the top-p nucleus"
    # top_k = 1 sampling equals greedy, where the best logit is unique (ties with the k-th value stay in)
    c1, _, _ = propose(logits, temperature=temperature, top_k=1, top_p=top_p, noise=noise, exclude_token=exclude)
    g, _, _ = propose(logits, temperature=0.0, exclude_token=exclude)
    allowed = _tempered_allowed(logits, temperature, exclude)
    unique = (allowed == allowed.max(dim=-1, keepdim=True).values).sum(dim=-1) == 1
    assert torch.equal(c1[unique], g[unique])
    # the same candidate as the reference decoder's Gumbel-max sampler, where no near-tie
    for i in range(n):
        for j in range(b):
            row = logits[i, j].tolist()
            if exclude is not None:
                row[exclude] = -math.inf
            # min(): reference/decoding._sample indexes out of range when top_k > V
            expected = ref._sample(row, temperature, min(top_k, v), top_p, noise[i, j].tolist())
            final = _truncate(_tempered_allowed(logits, temperature, exclude)[i, j], top_k, top_p)
            gum = final - torch.log(-torch.log(noise[i, j]))
            top2 = torch.topk(gum[torch.isfinite(gum)], min(2, int(torch.isfinite(gum).sum()))).values
            if len(top2) == 2 and float(top2[0] - top2[1]) < 1e-4:
                continue
            vals = _tempered_allowed(logits, temperature, exclude)[i, j]
            fin = vals[torch.isfinite(vals)].sort().values
            if top_p < 1.0 and bool((fin.diff() < 1e-6).any()):
                continue  # (near-)ties, e.g. 0 and 1e-42: which ends the top-p nucleus is not pinned (core: unstable sort)
            assert int(cand[i, j]) == expected


def test_propose_sampling_requires_noise():
    with pytest.raises(ValueError):
        propose(torch.randn(1, 2, 5), temperature=1.0)


def _expected_dist(logits_row, temperature, top_k, top_p, exclude):
    """softmax over the tempered logits after top-k then top-p truncation (written out by hand)."""
    scaled = [x / temperature for x in logits_row]
    if exclude is not None:
        scaled[exclude] = -math.inf
    order = sorted(range(len(scaled)), key=lambda t: -scaled[t])
    keep = set(order[:top_k]) if top_k else set(order)
    keep = {t for t in keep if scaled[t] > -math.inf}
    m = max(scaled[t] for t in keep)
    z = sum(math.exp(scaled[t] - m) for t in keep)
    probs = {t: math.exp(scaled[t] - m) / z for t in keep}
    if top_p < 1.0:
        nucleus, mass = set(), 0.0
        for t in sorted(keep, key=lambda t: -probs[t]):
            if mass >= top_p:
                break
            nucleus.add(t)
            mass += probs[t]
        z = sum(probs[t] for t in nucleus)
        probs = {t: probs[t] / z for t in nucleus}
    return [probs.get(t, 0.0) for t in range(len(scaled))]


@pytest.mark.parametrize(
    "temperature,top_k,top_p,exclude",
    [(1.0, 0, 1.0, None), (0.7, 0, 1.0, 3), (1.0, 4, 1.0, None), (1.3, 5, 0.8, 0), (1.0, 0, 0.6, None)],
)
def test_propose_sampling_distribution(temperature, top_k, top_p, exclude):
    """Empirical candidate frequencies over many noise draws match softmax(truncated logits / T)."""
    logits_row = [2.0, 1.5, 1.0, 0.8, 0.2, -0.3, -1.0, -2.0]
    v = len(logits_row)
    n_pos = 4000
    logits = torch.tensor(logits_row).expand(1, n_pos, v)
    counts = torch.zeros(v)
    draws = 0
    for step in (1, 2, 3):
        noise = uniform_noise(torch.tensor([12345]), torch.arange(n_pos)[None], torch.tensor([step]), v)
        cand, _, _ = propose(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             noise=noise, exclude_token=exclude)
        counts += torch.bincount(cand.flatten(), minlength=v).float()
        draws += n_pos
    expected = torch.tensor(_expected_dist(logits_row, temperature, top_k, top_p, exclude), dtype=torch.float32)
    assert (counts[expected == 0] == 0).all(), "sampled a token outside the truncated support"
    support = expected > 0
    e = expected[support] * draws
    chi2 = float((((counts[support] - e) ** 2) / e).sum())
    dof = int(support.sum()) - 1
    # chi-square with <= 7 degrees of freedom: 40 is far in the tail (p < 1e-5)
    assert chi2 < 40, (chi2, dof, counts.tolist(), (expected * draws).tolist())


# ---------------------------------------------------------------- uniform_noise


def test_uniform_noise_properties():
    seeds = torch.tensor([0, 1, 2**32 - 1])
    positions = torch.arange(3 * 4).view(3, 4) + 100
    steps = torch.tensor([1, 5, 9])
    u = uniform_noise(seeds, positions, steps, 257)
    assert u.shape == (3, 4, 257) and u.dtype == torch.float64
    assert (u > 0).all() and (u < 1).all()
    assert torch.equal(u, uniform_noise(seeds, positions, steps, 257)), "not deterministic"
    assert abs(float(u.mean()) - 0.5) < 0.02
    assert abs(float(u.var()) - 1 / 12) < 0.01
    # differs across seeds, positions and steps
    base = uniform_noise(torch.tensor([7]), torch.tensor([[3]]), torch.tensor([2]), 64)
    assert not torch.equal(base, uniform_noise(torch.tensor([8]), torch.tensor([[3]]), torch.tensor([2]), 64))
    assert not torch.equal(base, uniform_noise(torch.tensor([7]), torch.tensor([[4]]), torch.tensor([2]), 64))
    assert not torch.equal(base, uniform_noise(torch.tensor([7]), torch.tensor([[3]]), torch.tensor([3]), 64))
    # all values distinct in a big draw (a 32-bit hash: collisions are rare)
    assert u.flatten().unique().numel() > 0.99 * u.numel()
    # a row does not depend on the batch it is in
    assert torch.equal(u[1:2], uniform_noise(seeds[1:2], positions[1:2], steps[1:2], 257))


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), pos=st.integers(0, 10**6), step=st.integers(1, 10**5))
def test_uniform_noise_matches_reference_hash(seed, pos, step):
    u = uniform_noise(torch.tensor([seed]), torch.tensor([[pos]]), torch.tensor([step]), 16)[0, 0]
    assert u.tolist() == [ref.uniform(seed, pos, step, t) for t in range(16)]


def test_truncate_keeps_ties_and_first():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5]])
    out = _truncate(logits, 1, 1.0)
    assert torch.isfinite(out).tolist() == [[False, True, True, False]]
    # top_p tiny: only the most probable stays
    out = _truncate(torch.tensor([[0.0, 5.0, 1.0]]), 0, 1e-9)
    assert torch.isfinite(out).tolist() == [[False, True, False]]


def test_select_unmask_threshold_is_exact():
    m = torch.ones(1, 3, dtype=torch.bool)
    for conf in (torch.tensor([[0.95, 0.9, 0.1]]),  # float32: 0.9 -> 0.8999999761581421 < 0.9
                 torch.tensor([[0.95, 0.8999999999, 0.1]], dtype=torch.float64)):
        got = select_unmask(conf, m, "low_confidence_dynamic", threshold=0.9)
        expected = ref.select_unmask(conf[0].tolist(), m[0].tolist(), "low_confidence_dynamic", 0.9)
        assert got[0].tolist() == expected == [True, False, False]
