"""The four RL objectives (issue 14): their views against reference/objectives.py and the SPEC's
invariants, their losses against a token-by-token reference, and each one training the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dirl_min.core.estimates import (
    ObjectiveSpec, coupled_views, merge_rounds, objective_views, one_step_views, view_seed)
from dirl_min.core.objectives import LOSS_MEANS, clipped_loss, loss_weights
from dirl_min.core.rounds import step_rounds
from dirl_min.decoding import generate
from dirl_min.engine.score import rounds_logp
from dirl_min.model.forward import SelectedLogits
from dirl_min.model import build_tiny
from dirl_min.trainer import MicroBatch, PolicySettings, StepTotals, policy_step
from reference import objectives as ref
from test_dipo_core import step_maps

FAST = settings(deadline=None, max_examples=60)


@FAST
@given(case=step_maps(), s=st.integers(1, 5))
def test_merged_rounds_match_the_reference_partition_the_response_and_never_show_the_future(case, s):
    step_map, B, _ = case
    steps = torch.tensor(step_map, dtype=torch.long)
    true_noisy, true_targets = step_rounds(steps, B)
    noisy, targets = merge_rounds(true_noisy, true_targets, s)
    ref_noisy, ref_targets = ref.merge_rounds(step_map, B, s)
    assert noisy.tolist() == ref_noisy and targets.tolist() == ref_targets
    generated = steps > 0
    assert (targets.sum(0) == generated.long()).all()  # each generated token read exactly once
    for rho in range(len(true_targets)):
        k = rho // s
        for j in true_targets[rho].nonzero().flatten().tolist():
            assert targets[k, j]
            # its context hides everything that was masked when it was decoded (no look-ahead) ...
            assert (noisy[k] >= true_noisy[rho]).all()
            # ... and lags its true state by at most s - 1 of its block's steps
            assert (noisy[k] <= true_noisy[max(rho - s + 1, 0)]).all()
    if s == 1:
        assert torch.equal(noisy, true_noisy) and torch.equal(targets, true_targets)


@FAST
@given(length=st.integers(1, 300), prompt=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_coupled_masks_are_complementary_for_every_length(length, prompt, seed):
    ids = torch.arange(length) + 10
    response = torch.arange(length) >= min(prompt, length)
    views = coupled_views(ids, response, torch.Generator().manual_seed(seed))
    first, second = views.noisy
    assert views.noisy.shape == (2, length)
    assert torch.equal(first | second, response) and not (first & second).any()
    assert torch.equal(views.targets, views.noisy) and torch.equal(views.context, ids)


def test_coupled_ratio_stays_in_diffucoders_range():
    response = torch.ones(4000, dtype=torch.bool)
    fractions = [float(coupled_views(torch.zeros(4000, dtype=torch.long), response,
                                     torch.Generator().manual_seed(s)).noisy[0].float().mean()) for s in range(40)]
    assert 0.17 < min(fractions) and max(fractions) < 0.83 and max(fractions) - min(fractions) > 0.3


@FAST
@given(prompt=st.integers(0, 40), response=st.integers(1, 40), p=st.sampled_from([0.0, 0.15, 0.5]),
       seed=st.integers(0, 2**31))
def test_d1_view_masks_exactly_the_response_and_the_drawn_prompt_positions(prompt, response, p, seed):
    L, M = prompt + response, 999
    ids = torch.arange(L) + 10
    is_response = torch.arange(L) >= prompt
    drawn = torch.rand(L, generator=torch.Generator().manual_seed(seed)) < p  # the draw the view makes
    views = one_step_views(ids, is_response, M, p, torch.Generator().manual_seed(seed))
    masked = views.context == M
    assert torch.equal(masked, is_response | (drawn & ~is_response))
    assert torch.equal(views.context[~masked], ids[~masked])  # the rest of the prompt is intact
    assert torch.equal(views.noisy[0], is_response) and torch.equal(views.targets[0], is_response)


def test_d1_prompt_mask_rate_and_a_fresh_draw_every_pass():
    n = 20000
    ids, response = torch.arange(n + 4), torch.arange(n + 4) >= n
    spec = ObjectiveSpec("diffu_grpo_masked_context", prompt_mask_prob=0.15)
    steps = response.long()

    def masked(it):
        gen = torch.Generator().manual_seed(view_seed(12345, it))
        return objective_views(spec, ids, steps, 4, -1, gen).context[:n] == -1

    rate = float(masked(0).float().mean())
    assert abs(rate - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n)
    assert torch.equal(masked(0), masked(0)) and not torch.equal(masked(0), masked(1))


def _rollout(block_size=4, n=6, seed=0):
    model, tok = build_tiny(seed=seed, block_size=block_size)
    prompts = [tok.encode(f"{a} + {b} =") for a, b in [(1, 2), (13, 4), (7, 7), (0, 19), (5, 11), (9, 3)][:n]]
    # two tokens per step: rounds with several targets, and R = 2 per block
    roll = generate(model, prompts, max_new_tokens=12, temperature=1.0, strategy="low_confidence_static",
                    steps=block_size // 2, generator=torch.Generator().manual_seed(seed))
    return model, roll


def _whole(roll, adv) -> MicroBatch:
    return MicroBatch(roll, list(range(len(roll))), adv)


def _loss_and_grads(model, roll, spec, adv, ref_model=None, **kw):
    model.zero_grad()
    loss, stats, logp = policy_step(SelectedLogits(model), _whole(roll, adv), StepTotals(40.0, len(roll)),
                                    PolicySettings(eps_low=0.2, eps_high=0.28, spec=spec, **kw), ref_model=ref_model)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()], logp, stats


def test_tracerl_with_s1_equals_dipo_in_log_probs_and_gradients():
    model, roll = _rollout()
    assert any(len(set(s)) < len(s) for s in roll.step_map)  # some steps commit several tokens
    adv = torch.randn(len(roll), generator=torch.Generator().manual_seed(1))
    a = _loss_and_grads(model, roll, ObjectiveSpec("dipo"), adv)
    b = _loss_and_grads(model, roll, ObjectiveSpec("tracerl", shrinkage=1), adv)
    c = _loss_and_grads(model, roll, ObjectiveSpec("tracerl", shrinkage=2), adv)
    assert a[0] == b[0] and torch.equal(a[2], b[2])
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert a[3]["copies"] > c[3]["copies"] and not torch.equal(a[2], c[2])  # cheaper, and another estimate


def test_every_view_scores_as_a_plain_forward_of_its_masked_context():
    """The oracle: each read token's log-prob from transformers' own forward of the single row
    ``[x_t^r ; x]`` under the dense block-diffusion mask, one copy at a time."""
    from reference.masking import block_diffusion_mask

    model, roll = _rollout(n=3)
    M, B = roll.mask_token_id, roll.block_size
    for name in ("tracerl", "diffu_grpo", "coupled_grpo", "diffu_grpo_masked_context"):
        spec = ObjectiveSpec(name, shrinkage=2, prompt_mask_prob=0.3)
        for i in range(len(roll)):
            ids = torch.tensor(roll.prompt_ids[i] + roll.response_ids[i])
            steps = torch.tensor([0] * len(roll.prompt_ids[i]) + roll.step_map[i])
            v = objective_views(spec, ids, steps, B, M, torch.Generator().manual_seed(i))
            with torch.no_grad():
                got = rounds_logp(model, [v.context], [v.noisy], [v.targets], M, B, labels=[ids])
                L = len(ids)
                for r in range(len(v.noisy)):
                    row = torch.cat([v.context.masked_fill(v.noisy[r], M), v.context])[None]
                    mask = block_diffusion_mask(L, B)[None, None]
                    pos = torch.cat([torch.arange(L), torch.arange(L)])[None]
                    logits = model(input_ids=row, position_ids=pos, attention_mask=mask).logits[0, :L]
                    want = logits.float().log_softmax(-1)[torch.arange(L), ids][v.targets[r]]
                    have = got.logp[torch.isin(got.position, v.targets[r].nonzero().flatten())]
                    assert torch.allclose(have[torch.argsort(got.position[torch.isin(
                        got.position, v.targets[r].nonzero().flatten())])], want, atol=1e-4), (name, i, r)


def test_the_masked_context_ablation_sees_no_response_token():
    """Changing a response token changes no log-prob of the old d1 port (every response token is masked in the context)."""
    model, roll = _rollout(n=2)
    M, B = roll.mask_token_id, roll.block_size
    ids = torch.tensor(roll.prompt_ids[0] + roll.response_ids[0])
    steps = torch.tensor([0] * len(roll.prompt_ids[0]) + roll.step_map[0])
    spec = ObjectiveSpec("diffu_grpo_masked_context", prompt_mask_prob=0.0)
    v = objective_views(spec, ids, steps, B, M, torch.Generator().manual_seed(0))
    other = ids.clone()
    first = len(roll.prompt_ids[0])  # later blocks would see it through a clean context row
    other[first] = (int(other[first]) + 1) % M
    w = objective_views(spec, other, steps, B, M, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = rounds_logp(model, [v.context], [v.noisy], [v.targets], M, B, labels=[ids]).logp
        b = rounds_logp(model, [w.context], [w.noisy], [w.targets], M, B, labels=[ids]).logp
    assert torch.equal(a, b)
    leaky = rounds_logp(model, [other], [w.noisy], [w.targets], M, B, labels=[ids]).logp  # a clean context row
    assert not torch.equal(leaky, rounds_logp(model, [ids], [v.noisy], [v.targets], M, B, labels=[ids]).logp)


@FAST
@given(data=st.data(), mean=st.sampled_from(["token", "sequence"]))
def test_each_loss_matches_the_token_by_token_reference_and_its_gradient_at_ratio_one(data, mean):
    n_resp = data.draw(st.integers(1, 5))
    lengths = [data.draw(st.integers(1, 6)) for _ in range(n_resp)]
    resp = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])
    def floats(count, lo, hi):
        return torch.tensor(data.draw(st.lists(st.floats(lo, hi, allow_nan=False), min_size=count, max_size=count)),
                            dtype=torch.float64)

    logp = floats(len(resp), -3, 0)
    old = logp + floats(len(resp), -0.6, 0.6)
    adv = floats(n_resp, -2, 2)[resp]
    n_tok, n_seq = float(sum(lengths) + 3), float(n_resp + 2)  # other micro-batches' share of the step
    weight, denom = loss_weights(resp, lengths, mean, num_tokens=n_tok, num_sequences=n_seq)
    x = logp.clone().requires_grad_(True)
    loss, _ = clipped_loss(x, old, adv, weight.double(), denom, eps_low=0.2, eps_high=0.28)
    want = ref.policy_loss(logp.tolist(), old.tolist(), adv.tolist(), resp.tolist(), lengths, mean, n_tok, n_seq,
                           0.2, 0.28)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-9, abs=1e-12)
    # at ratio 1 (one on-policy pass) the gradient is -A_j w_j / D, token by token
    y = logp.clone().requires_grad_(True)
    clipped_loss(y, logp, adv, weight.double(), denom, eps_low=0.2, eps_high=0.28)[0].backward()
    for j in range(len(resp)):
        per_token = 1.0 if mean == "token" else 1.0 / lengths[resp[j]]
        assert float(y.grad[j]) == pytest.approx(-float(adv[j]) * per_token / denom, rel=1e-9, abs=1e-15)


def test_every_objective_record_is_complete():
    """Each record's loss mean and release settings are valid settings of the main job."""
    from dirl_min.settings.config import parse_config
    from dirl_min.core.estimates import OBJECTIVES, RECORDS, record
    from dirl_min.settings.checks import validate

    assert OBJECTIVES == ("dipo", "tracerl", "diffu_grpo", "coupled_grpo")
    for name, obj in RECORDS.items():
        assert record(name) is obj and obj.loss_mean in LOSS_MEANS
        argv = [x for k, v in obj.release.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
        validate(parse_config([*argv, "--rl.objective", name]))
        assert obj.release["rl.loss_mean"] == obj.loss_mean
    with pytest.raises(ValueError):
        record("d1")


def test_random_views_are_the_same_for_old_new_and_reference_log_probs():
    """Within one pass the policy, its old copy and the reference read the same masks: at ratio 1 the
    d1 and coupled losses have zero KL to an identical reference and a ratio of exactly 1."""
    import copy

    model, roll = _rollout(n=4)
    adv = torch.randn(len(roll), generator=torch.Generator().manual_seed(2))
    for name in ("diffu_grpo_masked_context", "coupled_grpo"):
        loss, _, logp, stats = _loss_and_grads(model, roll, ObjectiveSpec(name), adv, beta=0.1,
                                               ref_model=copy.deepcopy(model))
        assert stats["kl_ref"] == 0.0 and stats["ratio_mean"] == 1.0
        settings = PolicySettings(eps_low=0.2, eps_high=0.28, spec=ObjectiveSpec(name))
        again = policy_step(SelectedLogits(model), _whole(roll, adv), StepTotals(40.0, 4), settings)[2]
        assert torch.equal(again, logp)  # same pass, same views
        later = policy_step(SelectedLogits(model), _whole(roll, adv), StepTotals(40.0, 4), settings, iteration=1)[2]
        assert not torch.equal(later, logp)  # the next pass draws new masks


def test_the_packed_path_reads_every_objectives_views_as_the_two_pass_path(monkeypatch):
    """GPU (flex_attention) and FSDP2 score one packed row ``[x_t^1; …; x_t^R; x]`` per response instead
    of the two passes; with labels that differ from the context (d1) both must read the same tokens."""
    from dirl_min.engine import score

    model, roll = _rollout(n=4)
    M, B = roll.mask_token_id, roll.block_size
    for name in ("dipo", "tracerl", "diffu_grpo", "coupled_grpo", "diffu_grpo_masked_context"):
        spec = ObjectiveSpec(name, shrinkage=2, prompt_mask_prob=0.3)
        views, labels = zip(*(score.rollout_views(roll, i, spec) for i in range(len(roll))))
        got = {}
        for backend in ("sdpa", "flex_attention"):  # the packed path, here with SDPA's dense mask
            monkeypatch.setattr(score, "attention_backend", lambda m, b=backend: b)
            with torch.no_grad():
                r = rounds_logp(model, *zip(*views), M, B, labels=labels)
            key = r.resp * 10_000 + r.position
            got[backend] = r.logp[torch.argsort(key)], key.sort().values
        assert torch.equal(got["sdpa"][1], got["flex_attention"][1])
        assert torch.allclose(got["sdpa"][0], got["flex_attention"][0], atol=1e-5), name


def test_the_rl_step_normalises_by_the_kept_responses_tokens_and_count():
    """The token mean divides by the tokens of the responses kept for the update (not of every sampled
    response, not their number); the sequence mean by the kept responses' number. Two rounds: the
    first keeps group 1 of a 2-group rollout, the second both groups of another."""
    from types import SimpleNamespace

    from dirl_min.loops import rl as loops_rl

    _, a = _rollout(n=4)
    _, b = _rollout(n=4, seed=1)
    assert len({len(r) for r in a.response_ids + b.response_ids}) > 1  # counts differ from tokens
    adv = torch.arange(4.0)
    kept = [MicroBatch(a, [2, 3], adv[2:]), MicroBatch(b, [0, 1], adv[:2]), MicroBatch(b, [2, 3], adv[2:])]
    rolls = [(a, None, None), (b, None, None)]
    cfg = SimpleNamespace(rl=SimpleNamespace(micro_batch=3))
    accel = SimpleNamespace(num_processes=1, process_index=0)
    micro, (n_tok, n_seq), n_real = loops_rl._micro_batches(cfg, accel, kept, rolls)
    assert n_tok == sum(len(a.response_ids[i]) for i in (2, 3)) + sum(len(r) for r in b.response_ids)
    assert n_seq == 6
    assert sorted((id(m[0]), i) for m in micro for i in m[1]) == sorted(
        [(id(a), 2), (id(a), 3)] + [(id(b), i) for i in range(4)])
    assert n_real == len(micro) == 3  # a: [2, 3]; b: [0, 1, 2], [3]


@pytest.mark.parametrize("name", ["dipo", "tracerl", "diffu_grpo", "coupled_grpo"])
@pytest.mark.parametrize("mean", ["token", "sequence"])
def test_each_objective_takes_the_asked_mean_in_the_rl_step(name, mean):
    """At ratio 1 the loss is ``-Σ_j A_j w_j / D``: the token mean (w = 1, D = the step's tokens) or the
    sequence mean (w = 1/|o_i|, D = the step's responses), as ``rl.loss_mean`` asks, for every
    objective. The step's totals here are not this micro-batch's, so a swapped normaliser or mean
    changes the value."""
    model, roll = _rollout(n=4)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    n_tok, n_seq = 77.0, 9.0
    loss, _, _ = policy_step(SelectedLogits(model), _whole(roll, adv), StepTotals(n_tok, n_seq),
                             PolicySettings(eps_low=0.2, eps_high=0.28, spec=ObjectiveSpec(name), loss_mean=mean))
    lengths = [len(r) for r in roll.response_ids]
    if mean == "token":
        want = -sum(a * n for a, n in zip(adv.tolist(), lengths)) / n_tok
    else:
        want = -sum(adv.tolist()) / n_seq
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)


@FAST
@given(case=step_maps())
def test_d1_block_view_is_the_merged_trace_with_every_step_of_a_block_in_one_round(case):
    """d1 on a block model reads each block fully masked given the clean past: the view of
    merge_rounds with s >= R, and no mask token in the clean stream."""
    from dirl_min.core.estimates import block_one_step_views

    step_map, B, _ = case
    assume(any(step_map))  # with nothing generated there is no round to merge (d1 still scores its one copy)
    steps = torch.tensor(step_map, dtype=torch.long)
    ids = torch.arange(len(step_map)) + 10
    views = objective_views(ObjectiveSpec("diffu_grpo"), ids, steps, B, 999)
    noisy, targets = merge_rounds(*step_rounds(steps, B), 10**6)
    assert torch.equal(views.noisy, noisy) and torch.equal(views.targets, targets)
    assert torch.equal(views.context, ids)  # the clean stream is clean
    assert torch.equal(views.noisy, block_one_step_views(ids, steps > 0).noisy)


def test_d1_block_tokens_see_clean_earlier_blocks_and_nothing_of_their_own_block():
    """Changing one response token of block b changes the d1 log-probs of later blocks (they read it
    clean) and of no other token of blocks <= b (block b is read fully masked)."""
    model, roll = _rollout(n=1)
    M, B = roll.mask_token_id, roll.block_size
    prompt = len(roll.prompt_ids[0])
    ids = torch.tensor(roll.prompt_ids[0] + roll.response_ids[0])
    steps = torch.tensor([0] * prompt + roll.step_map[0])
    spec = ObjectiveSpec("diffu_grpo")
    j = ((prompt + B - 1) // B) * B  # the first position of the first block that holds only response tokens
    assert j + B < len(ids)  # a later block exists
    other = ids.clone()
    other[j] = (int(other[j]) + 1) % M
    with torch.no_grad():
        a, b = (rounds_logp(model, [v.context], [v.noisy], [v.targets], M, B, labels=[ids])
                for v in (objective_views(spec, x, steps, B, M) for x in (ids, other)))
    same = a.position // B <= j // B
    assert torch.equal(a.position, b.position)
    assert torch.equal(a.logp[same], b.logp[same])
    assert not torch.equal(a.logp[~same], b.logp[~same])


def test_dynamic_sampling_keeps_exactly_the_first_p_groups_that_pass_the_filter(monkeypatch):
    """Rounds of P = 2 groups of G = 2 until 2 groups pass ``reward_std``: round 1 keeps its second
    group only, round 2 passes both but only its first is needed, and no third round is drawn."""
    from types import SimpleNamespace

    from dirl_min.loops import rl as loops_dipo

    rolls = [object(), object(), object()]
    rewards = iter([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    monkeypatch.setattr(loops_dipo, "_roll_out", lambda *a: (rolls.pop(0), torch.tensor(r := next(rewards)),
                                                             torch.tensor(r)))
    first, second = rolls[0], rolls[1]
    cfg = SimpleNamespace(rl=SimpleNamespace(sampling_rounds=3, prompts_per_step=2, group_size=2,
                                             group_filter="reward_std", scale_advantages=True))
    accel = SimpleNamespace(num_processes=1, process_index=0)
    sampler = SimpleNamespace(take=lambda n: list(range(n)))
    stage = SimpleNamespace(sampler=sampler, wrapped=None, gen=None)
    kept, sampled, n_kept = loops_dipo._sample_groups(cfg, accel, stage, None, None, {})
    assert n_kept == 2 and len(sampled) == 2
    assert [(k.rollout, k.indices, k.place) for k in kept] == [(first, [2, 3], 0), (second, [0, 1], 1)]
    assert [k.advantages.tolist() for k in kept] == [pytest.approx([-1.0, 1.0], abs=1e-5), pytest.approx([1.0, -1.0], abs=1e-5)]
