"""DiPO core (SPEC §4): step_rounds, dipo_loss, group_advantages, filter_groups, build_layout.

Compared with the loop-based reference in reference/dipo.py plus SPEC invariants.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dirl_min.dipo import build_layout, dipo_loss, filter_groups, group_advantages, step_rounds
from reference import dipo as ref

FAST = settings(deadline=None, max_examples=60)




# ---------------------------------------------------------------- step_rounds


@st.composite
def step_maps(draw):
    """A realistic step map: prompt zeros (P often not a multiple of B), then per block an ordered
    partition of the block's generated positions into steps; the global step counter increases
    across blocks (occasionally with a gap)."""
    B = draw(st.integers(1, 16))
    P = draw(st.integers(0, 3 * B + 2))
    first = P // B
    n_gen_blocks = draw(st.integers(0, 4))
    L = max(P, (first + n_gen_blocks) * B)
    if n_gen_blocks and draw(st.integers(0, 4)) == 0:  # sometimes a partial last block
        L = draw(st.integers(max(P, L - B + 1), L))
    step_map = [0] * L
    counter = draw(st.integers(0, 3))
    for blk in range(first, -(-L // B)):
        gen = [j for j in range(blk * B, min((blk + 1) * B, L)) if j >= P]
        if not gen:
            continue
        labels = draw(st.lists(st.integers(0, len(gen) - 1), min_size=len(gen), max_size=len(gen)))
        rank = {lab: r for r, lab in enumerate(sorted(set(labels)))}
        for j, lab in zip(gen, labels):
            step_map[j] = counter + rank[lab] + 1
        counter += len(rank) + draw(st.sampled_from([0, 0, 0, 2]))
    return step_map, B, P


@FAST
@given(case=step_maps())
def test_step_rounds_matches_reference(case):
    step_map, B, _ = case
    noisy, targets = step_rounds(torch.tensor(step_map, dtype=torch.long), B)
    ref_noisy, ref_targets = ref.step_rounds(step_map, B)
    assert noisy.dtype == torch.bool and targets.dtype == torch.bool
    assert noisy.shape == targets.shape == (len(ref_noisy), len(step_map))
    assert noisy.tolist() == ref_noisy
    assert targets.tolist() == ref_targets


@FAST
@given(case=step_maps())
def test_step_rounds_invariants(case):
    step_map, B, P = case
    s = torch.tensor(step_map, dtype=torch.long)
    noisy, targets = step_rounds(s, B)
    generated = s > 0
    # targets partition the generated positions; prompt positions never noisy or targets
    assert torch.equal(targets.sum(dim=0), generated.long())
    assert not noisy[:, :P].any() and not targets[:, :P].any()
    assert not (targets & ~noisy).any()
    # number of rounds = max distinct steps in a block
    L = len(step_map)
    distinct = [len({v for v in step_map[b:b + B] if v > 0}) for b in range(0, L, B)]
    assert noisy.shape[0] == max(distinct, default=0)
    for rho in range(noisy.shape[0]):
        for b in range(0, L, B):
            blk = slice(b, min(b + B, L))
            t_steps = set(s[blk][targets[rho, blk]].tolist())
            assert len(t_steps) <= 1, "a round's targets in one block come from several steps"
            if t_steps:
                (st_rho,) = t_steps
                # noisy = exactly the generated positions with step >= this round's step
                assert torch.equal(noisy[rho, blk], generated[blk] & (s[blk] >= st_rho))
            else:
                assert not noisy[rho, blk].any()
    # each round's target step in a block increases with the round
    for b in range(0, L, B):
        blk = slice(b, min(b + B, L))
        steps = [int(s[blk][targets[rho, blk]][0]) for rho in range(noisy.shape[0]) if targets[rho, blk].any()]
        assert steps == sorted(set(steps))


def test_step_rounds_by_hand():
    # B=4, P=3: block 0 = [p p p g(1)], block 1 = [3 2 2 4]
    noisy, targets = step_rounds(torch.tensor([0, 0, 0, 1, 3, 2, 2, 4]), 4)
    assert targets.int().tolist() == [
        [0, 0, 0, 1, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],
    ]
    assert noisy.int().tolist() == [
        [0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 0, 1],
    ]
    noisy, targets = step_rounds(torch.tensor([0, 0, 0]), 2)
    assert noisy.shape == targets.shape == (0, 3)


# ---------------------------------------------------------------- dipo_loss


def _floats(draw, count: int, lo: float, hi: float) -> torch.Tensor:
    """float64 ``[count]`` drawn by hypothesis (so that failures shrink toward simple values)."""
    return torch.tensor(draw(st.lists(st.floats(lo, hi, allow_nan=False), min_size=count, max_size=count)),
                        dtype=torch.float64)


@st.composite
def loss_cases(draw):
    n = draw(st.integers(1, 4))
    length = draw(st.integers(1, 8))
    logp = _floats(draw, n * length, -5, 0).view(n, length)
    scale = draw(st.sampled_from([0.0, 0.01, 0.3, 1.0, 15.0]))  # 15: hits the ±10 clamp
    logp_old = logp - _floats(draw, n * length, -2, 2).view(n, length) * scale
    adv = _floats(draw, n, -3, 3) * torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))  # some 0
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n * length, max_size=n * length))).view(n, length)
    logp_ref = logp + _floats(draw, n * length, -1, 1).view(n, length)
    eps_low = draw(st.sampled_from([0.2, 0.1, 0.5]))
    eps_high = draw(st.sampled_from([0.28, 0.2, 0.5]))
    beta = draw(st.sampled_from([0.0, 0.0, 0.04, 1.0]))
    num_tokens = draw(st.one_of(st.none(), st.integers(1, 50)))
    return logp, logp_old, adv, mask, logp_ref, eps_low, eps_high, beta, num_tokens


def _near_clip_boundary(logp, logp_old, mask, eps_low, eps_high):
    ratio = (logp - logp_old).clamp(-10, 10).exp()[mask]
    return bool(((ratio - (1 + eps_high)).abs() < 1e-9).any() or ((ratio - (1 - eps_low)).abs() < 1e-9).any())


@FAST
@given(case=loss_cases())
def test_dipo_loss_matches_reference(case):
    logp, logp_old, adv, mask, logp_ref, eps_low, eps_high, beta, num_tokens = case
    assume(not _near_clip_boundary(logp, logp_old, mask, eps_low, eps_high))
    loss, stats = dipo_loss(logp, logp_old, adv, mask, eps_low=eps_low, eps_high=eps_high,
                            beta=beta, logp_ref=logp_ref, num_tokens=num_tokens)
    exp_loss, exp_clip = ref.dipo_loss(logp.tolist(), logp_old.tolist(), adv.tolist(), mask.tolist(),
                                       eps_low, eps_high, beta, logp_ref.tolist(), num_tokens)
    assert loss.dim() == 0
    assert math.isclose(float(loss), exp_loss, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(stats["clip_frac"], exp_clip, abs_tol=1e-12)
    # float32 (the usual dtype) agrees to float32 precision
    loss32, stats32 = dipo_loss(logp.float(), logp_old.float(), adv.float(), mask, eps_low=eps_low,
                                eps_high=eps_high, beta=beta, logp_ref=logp_ref.float(), num_tokens=num_tokens)
    assert math.isclose(float(loss32), exp_loss, rel_tol=1e-4, abs_tol=1e-4)


@FAST
@given(case=loss_cases())
def test_dipo_loss_gradient_at_ratio_one(case):
    logp, _, adv, mask, logp_ref, eps_low, eps_high, beta, _ = case
    x = logp.clone().requires_grad_(True)
    loss, stats = dipo_loss(x, x.detach(), adv, mask, eps_low=eps_low, eps_high=eps_high,
                            beta=beta, logp_ref=logp_ref)
    loss.backward()
    n_tok = max(int(mask.sum()), 1)
    expected = (-adv[:, None] / n_tok).expand_as(logp).clone()
    if beta > 0:  # d/dl k3(l_ref, l) = 1 - exp(l_ref - l)
        expected = expected + beta * (1 - (logp_ref - logp).exp()) / n_tok
    expected = expected * mask
    assert torch.allclose(x.grad, expected, rtol=1e-9, atol=1e-12)
    assert stats["clip_frac"] == 0.0
    if mask.any():
        assert math.isclose(stats["ratio_mean"], 1.0)
        if beta == 0:
            assert math.isclose(float(loss.detach()), -float((adv[:, None] * mask).sum()) / n_tok, rel_tol=1e-9, abs_tol=1e-12)


@FAST
@given(seed=st.integers(0, 2**31 - 1), sign=st.sampled_from([1.0, -1.0]),
       eps_low=st.sampled_from([0.2, 0.1]), eps_high=st.sampled_from([0.28, 0.4]))
def test_dipo_loss_clipping_gradient(seed, sign, eps_low, eps_high):
    g = torch.Generator().manual_seed(seed)
    n, length = 3, 10
    logp = -torch.rand(n, length, generator=g, dtype=torch.float64) * 4
    delta = (torch.rand(n, length, generator=g, dtype=torch.float64) - 0.5) * 2.0  # log-ratio in (-1, 1)
    ratio = delta.exp()
    assume(not ((ratio - (1 + eps_high)).abs() < 1e-6).any() and not ((ratio - (1 - eps_low)).abs() < 1e-6).any())
    adv = sign * (0.1 + torch.rand(n, generator=g, dtype=torch.float64))
    mask = torch.rand(n, length, generator=g) < 0.8
    x = logp.clone().requires_grad_(True)
    loss, stats = dipo_loss(x, logp - delta, adv, mask, eps_low=eps_low, eps_high=eps_high)
    loss.backward()
    clipped = ratio > 1 + eps_high if sign > 0 else ratio < 1 - eps_low
    assert (x.grad[mask & clipped] == 0).all(), "gradient through a clipped token"
    assert (x.grad[mask & ~clipped] != 0).all(), "no gradient on an unclipped target"
    assert (x.grad[~mask] == 0).all()
    n_tok = int(mask.sum())
    free = mask & ~clipped
    assert torch.allclose(x.grad[free], (-adv[:, None] * ratio / n_tok).expand_as(ratio)[free])
    assert math.isclose(stats["clip_frac"], float((mask & clipped).sum()) / n_tok)


def test_dipo_loss_beta_without_ref_raises():
    logp = torch.zeros(1, 3)
    with pytest.raises(ValueError):
        dipo_loss(logp, logp, torch.ones(1), torch.ones(1, 3, dtype=torch.bool), beta=0.1)
    with pytest.raises(ValueError):
        ref.dipo_loss([[0.0] * 3], [[0.0] * 3], [1.0], [[True] * 3], beta=0.1)


@FAST
@given(case=loss_cases(), n_override=st.integers(1, 100))
def test_dipo_loss_num_tokens_override(case, n_override):
    logp, logp_old, adv, mask, logp_ref, eps_low, eps_high, beta, _ = case
    mask = mask.clone()
    mask[0, 0] = True  # some target (instead of discarding the cases without one)
    kw = dict(eps_low=eps_low, eps_high=eps_high, beta=beta, logp_ref=logp_ref)
    base, stats = dipo_loss(logp, logp_old, adv, mask, **kw)
    scaled, stats2 = dipo_loss(logp, logp_old, adv, mask, num_tokens=n_override, **kw)
    assert math.isclose(float(scaled), float(base) * int(mask.sum()) / n_override, rel_tol=1e-9, abs_tol=1e-12)
    assert stats["clip_frac"] == stats2["clip_frac"]  # statistics stay per-token means


# ---------------------------------------------------------------- advantages and filtering

GRID = [round(-1.0 + 0.05 * i, 2) for i in range(41)]


@st.composite
def reward_groups(draw):
    G = draw(st.integers(1, 8))
    n_groups = draw(st.integers(1, 4))
    rewards = []
    for _ in range(n_groups):
        grp = draw(st.lists(st.sampled_from(GRID), min_size=G, max_size=G))
        if len(set(grp)) == 1:  # all-equal groups must get exactly 0
            grp = [draw(st.sampled_from([0.0, 1.0, 0.5, -0.5]))] * G
        rewards += grp
    return [float(torch.tensor(r, dtype=torch.float32)) for r in rewards], G


@FAST
@given(case=reward_groups())
def test_group_advantages_matches_reference(case):
    rewards, G = case
    adv = group_advantages(torch.tensor(rewards), G)
    expected = ref.group_advantages(rewards, G)
    assert adv.shape == (len(rewards),)
    assert torch.allclose(adv.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-5)
    for g in range(0, len(rewards), G):
        a = adv[g:g + G].double()
        if len(set(rewards[g:g + G])) == 1:
            assert (a == 0).all(), "all-equal group must get exactly 0 advantage"
        else:
            assert abs(float(a.mean())) < 1e-4
            assert abs(float(a.std(unbiased=False)) - 1) < 1e-4


@pytest.mark.parametrize("value,G", [(0.1, 8), (0.3, 7), (0.7, 16), (0.9, 3)])
def test_group_advantages_all_equal_non_dyadic(value, G):
    rewards = [value] * G
    assert ref.group_advantages(rewards, G) == [0.0] * G
    adv = group_advantages(torch.tensor(rewards), G)
    assert (adv == 0).all(), adv.tolist()


@FAST
@given(G=st.integers(1, 8), data=st.data())
def test_filter_groups_on_accuracy_rewards(G, data):
    """Accuracy-only rewards: both rules keep exactly the mixed groups (the default run unchanged)."""
    n_groups = data.draw(st.integers(1, 6))
    correct = data.draw(st.lists(st.booleans(), min_size=G * n_groups, max_size=G * n_groups))
    c = [float(x) for x in correct]
    for rule in ("reward_std", "accuracy"):
        expected = ref.filter_groups(c, G, c, rule)
        keep_bool = filter_groups(torch.tensor(correct), G, correct=torch.tensor(correct), rule=rule)
        keep_float = filter_groups(torch.tensor(c), G, correct=torch.tensor(c), rule=rule)
        assert keep_bool.dtype == torch.bool
        assert keep_bool.tolist() == expected == keep_float.tolist()
        for i, k in enumerate(expected):
            grp = correct[i * G:(i + 1) * G]
            assert k == (any(grp) and not all(grp))


@st.composite
def speed_groups(draw):
    """Speed rewards (rewards.speed_reward) of groups: correctness and tokens/steps drawn per response,
    some groups all correct, some with every response decoded alike."""
    from dirl_min.rewards import speed_reward

    G, B = draw(st.integers(1, 8)), draw(st.sampled_from([2, 4, 8]))
    rewards, correct = [], []
    for _ in range(draw(st.integers(1, 5))):
        all_right, alike = draw(st.booleans()), draw(st.booleans())
        first = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
        for _ in range(G):
            ok = all_right or draw(st.booleans())
            n_tok, n_steps = first if alike else (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
            rewards.append(float(torch.tensor(speed_reward(n_tok, n_steps, B, ok), dtype=torch.float32)))
            correct.append(float(ok))
    return rewards, correct, G


@FAST
@given(case=speed_groups())
def test_filter_groups_matches_reference_on_speed_rewards(case):
    rewards, correct, G = case
    adv = group_advantages(torch.tensor(rewards), G).view(-1, G)
    for rule in ("reward_std", "accuracy"):
        keep = filter_groups(torch.tensor(rewards), G, correct=torch.tensor(correct), rule=rule)
        assert keep.tolist() == ref.filter_groups(rewards, G, correct, rule)
    # DiRL's rule keeps exactly the groups with a nonzero advantage, i.e. two distinct rewards
    keep = filter_groups(torch.tensor(rewards), G, correct=torch.tensor(correct))
    assert keep.tolist() == (adv != 0).any(dim=1).tolist()
    assert keep.tolist() == [len(set(rewards[g:g + G])) > 1 for g in range(0, len(rewards), G)]


def test_reward_std_keeps_all_correct_groups_that_differ_only_in_speed():
    """The fault of the accuracy rule under the speed reward: an all-correct group whose responses
    decoded at different speeds has nonzero advantages, and only reward_std keeps it."""
    from dirl_min.rewards import speed_reward

    G, B = 4, 4
    fast_slow = [speed_reward(12, s, B, True) for s in (3, 4, 6, 12)]  # all correct, 4 .. 1 tokens per step
    same = [speed_reward(12, 6, B, True)] * G  # all correct, all alike
    mixed = [speed_reward(12, 6, B, True)] * 2 + [speed_reward(12, 6, B, False)] * 2
    rewards = torch.tensor(fast_slow + same + mixed)
    correct = torch.tensor([1.0] * 8 + [1.0, 1.0, 0.0, 0.0])
    assert (group_advantages(rewards, G)[:G] != 0).all()
    assert filter_groups(rewards, G, correct=correct).tolist() == [True, False, True]
    assert filter_groups(rewards, G, correct=correct, rule="accuracy").tolist() == [False, False, True]
    assert ref.filter_groups(rewards.tolist(), G, correct.tolist()) == [True, False, True]


def test_filter_groups_rejects_an_unknown_rule():
    with pytest.raises(ValueError, match="rl.group_filter must be one of"):
        filter_groups(torch.zeros(4), 2, correct=torch.zeros(4), rule="std")
    with pytest.raises(ValueError, match="needs correct"):
        filter_groups(torch.zeros(4), 2, rule="accuracy")


# ---------------------------------------------------------------- build_layout


def test_build_layout_by_hand():
    """L=6, B=4, P=3, R=2, plus a second (R=1, L=5) example that is padded."""
    M = 99
    x0 = torch.tensor([10, 11, 12, 13, 14, 15])
    # step map: prompt 0,0,0; block 0 = [p p p 1]; block 1 = [3 2] (partial) -> 2 rounds
    noisy, targets = step_rounds(torch.tensor([0, 0, 0, 1, 3, 2]), 4)
    exp_noisy = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    exp_targets = torch.tensor([[0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(noisy, exp_noisy) and torch.equal(targets, exp_targets)
    x1 = torch.tensor([20, 21, 22, 23, 24])
    n1 = torch.tensor([[0, 0, 0, 1, 1]], dtype=torch.bool)
    t1 = torch.tensor([[0, 0, 0, 1, 1]], dtype=torch.bool)

    batch = build_layout([x0, x1], [noisy, n1], [targets, t1], M, 4)

    assert batch.block_size == 4
    assert batch.input_ids.tolist() == [
        [10, 11, 12, M, M, M] + [10, 11, 12, 13, M, 15] + [10, 11, 12, 13, 14, 15],
        [20, 21, 22, M, M] + [20, 21, 22, 23, 24] + [M] * 8,
    ]
    assert batch.seg.tolist() == [[0] * 18, [0] * 10 + [-1] * 8]
    assert batch.pos.tolist() == [
        [0, 1, 2, 3, 4, 5] * 3,
        [0, 1, 2, 3, 4] * 2 + [0] * 8,
    ]
    assert batch.copy.tolist() == [
        [0] * 6 + [1] * 6 + [2] * 6,
        [0] * 5 + [1] * 5 + [0] * 8,
    ]
    F, T = False, True
    assert batch.select.tolist() == [
        [F, F, F, T, F, T] + [F, F, F, F, T, F] + [F] * 6,
        [F, F, F, T, T] + [F] * 5 + [F] * 8,
    ]
    assert batch.target_ids.tolist() == [
        [10, 11, 12, 13, 14, 15] * 3,
        [20, 21, 22, 23, 24] * 2 + [0] * 8,
    ]
    assert batch.clean_copy.tolist() == [2, 1]
    # every generated token is selected exactly once, at its own position, with its own clean id
    sel_pos = batch.pos[0][batch.select[0]].sort().values
    assert sel_pos.tolist() == [3, 4, 5]
    assert batch.target_ids[0][batch.select[0]].tolist() == [13, 15, 14]


def test_build_layout_packs_examples_block_diagonally():
    x = [torch.arange(6), torch.arange(10, 15), torch.arange(20, 28)]
    nz = [torch.zeros(1, len(t), dtype=torch.bool) for t in x]
    b = build_layout(x, nz, nz, 99, 4, pack_tokens=24)
    assert b.input_ids.shape[0] == 2  # 12 + 10 tokens share a row; 16 more do not fit
    assert b.example[0, :22].tolist() == [0] * 12 + [1] * 10 and b.seg[0, :22].tolist() == [0] * 12 + [1] * 10
    assert b.pos[0, 12:17].tolist() == [0, 1, 2, 3, 4]  # the second example restarts its own grid
    assert (b.seg[0, 22:] == -1).all() and b.example[1, :16].tolist() == [2] * 16
