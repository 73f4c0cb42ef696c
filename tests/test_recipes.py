"""The settings that make each release's recipe expressible (issue 18): rl.scale_advantages,
rl.loss_mean, rl.kl_reference, rl.ref_sync_every, rl.updates_per_pass and the group filters
accuracy_band and none — each against a hand computation, and each reaching the RL loop."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dirl_min.core.estimates import ObjectiveSpec
from dirl_min.core.objectives import ACCURACY_BAND, filter_groups, group_advantages
from dirl_min.loops import rl as loops_dipo
from dirl_min.loops.policy import MicroBatch, PolicySettings, StepTotals, policy_step
from dirl_min.model.forward import SelectedLogits
from test_objectives import _rollout


def test_unscaled_advantages_are_reward_minus_group_mean():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0])
    got = group_advantages(r, 4, scale=False)
    want = (r.view(3, 4) - r.view(3, 4).mean(1, keepdim=True)).view(-1)
    assert torch.allclose(got, want) and (got[4:8] == 0).all()
    z = group_advantages(r, 4)  # the default divides by the population std
    assert torch.allclose(z[:4], want[:4] / r[:4].std(unbiased=False), atol=1e-5)


def test_accuracy_band_and_no_filter():
    # G = 5, accuracies 0.2, 0.4, 0.6, 0.8 (kept: TraceRL drops a share > 0.8 or < 0.2), 1.0 and 0.0 (dropped)
    correct = torch.tensor([1., 0., 0., 0., 0., 1., 1., 0., 0., 0., 1., 1., 1., 0., 0., 1., 1., 1., 1., 0.,
                            1., 1., 1., 1., 1., 0., 0., 0., 0., 0.])
    band = filter_groups(correct, 5, correct=correct, rule="accuracy_band")
    assert band.tolist() == [True, True, True, True, False, False]
    wide = filter_groups(torch.tensor([1., 0., 0., 0., 0., 0.]), 6, correct=torch.tensor([1., 0., 0., 0., 0., 0.]),
                         rule="accuracy_band")
    assert wide.tolist() == [False]  # accuracy 1/6 < 0.2: TraceRL drops it, DAPO's rule keeps it
    assert filter_groups(torch.zeros(8), 4, rule="none").tolist() == [True, True]


def _step(model, roll, adv, ref_model=None, logp_old=None, **kw):
    model.zero_grad()
    loss, stats, logp = policy_step(SelectedLogits(model), MicroBatch(roll, list(range(len(roll))), adv),
                                    StepTotals(40.0, float(len(roll))), PolicySettings(eps_low=0.2, eps_high=0.28, **kw),
                                    ref_model=ref_model, logp_old=logp_old)
    return loss.detach(), stats, logp


def test_loss_mean_token_and_sequence_at_ratio_one():
    """At ratio 1 the loss is −Σ_j A_j / N_tok (token) or −Σ_i A_i·(|o_i|/|o_i|) / N_seq (sequence)."""
    model, roll = _rollout(n=4)
    adv = torch.randn(len(roll), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([len(r) for r in roll.response_ids], dtype=torch.float64)
    token = _step(model, roll, adv, loss_mean="token")[0]
    sequence = _step(model, roll, adv, loss_mean="sequence")[0]
    assert float(token) == pytest.approx(-float((adv.double() * lengths).sum()) / 40.0, rel=1e-5)
    assert float(sequence) == pytest.approx(-float(adv.double().sum()) / len(roll), rel=1e-5)
    with pytest.raises(ValueError, match="token or sequence"):
        _step(model, roll, adv, loss_mean="response")


def test_the_default_loss_mean_is_the_default_objectives_release_mean():
    """The main job without settings trains DiPO with DiRL's token mean: ``rl.loss_mean``'s default is
    the default objective's release mean (a sequence-mean default would change every default run)."""
    from dirl_min.core.estimates import record
    from dirl_min.settings.config import parse_config

    rl = parse_config([]).rl
    assert rl.objective == "dipo" and rl.loss_mean == record("dipo").loss_mean == "token"


def test_kl_to_the_old_policy_uses_logp_old_and_no_reference_model():
    model, roll = _rollout(n=3)
    adv = torch.randn(len(roll), generator=torch.Generator().manual_seed(4))
    logp = _step(model, roll, adv)[2]
    old = logp + 0.1 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(5))
    plain = _step(model, roll, adv, logp_old=old)[0]
    to_old, stats, _ = _step(model, roll, adv, logp_old=old, beta=0.5, kl_to_old=True)
    d = old.double() - logp.double()
    k3 = float(((d.exp() - 1 - d)).sum() / 40.0)
    assert stats["kl_ref"] == pytest.approx(k3, rel=1e-4)
    assert float(to_old) == pytest.approx(float(plain) + 0.5 * k3, rel=1e-5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05)
    to_ref = _step(model, roll, adv, logp_old=old, beta=0.5, ref_model=other)[1]["kl_ref"]
    assert to_ref != pytest.approx(k3, rel=1e-3)  # the frozen reference is another policy


def test_recipe_settings_reach_the_rl_loop(tmp_path, monkeypatch):
    """One tiny RL run: each setting arrives where it acts (advantages, loss, KL reference, updates per
    step, reference refreshes)."""
    from dirl_min import train
    from test_train import _tiny_run_args

    seen = {"scale": [], "loss_mean": set(), "kl_to_old": set(), "updates": 0, "syncs": 0}
    real_adv, real_step, real_update = loops_dipo.group_advantages, loops_dipo.policy_step, loops_dipo._update

    def adv(*a, **k):
        seen["scale"].append(k["scale"])
        return real_adv(*a, **k)

    def step(*a, **k):
        seen["loss_mean"].add(k["settings"].loss_mean)
        seen["kl_to_old"].add(k["settings"].kl_to_old)
        return real_step(*a, **k)

    def update(*a, **k):
        seen["updates"] += 1
        return real_update(*a, **k)

    monkeypatch.setattr(loops_dipo, "group_advantages", adv)
    monkeypatch.setattr(loops_dipo, "policy_step", step)
    monkeypatch.setattr(loops_dipo, "_update", update)
    monkeypatch.setattr(loops_dipo, "_sync_reference", lambda *a: seen.__setitem__("syncs", seen["syncs"] + 1))
    out = tmp_path / "run"
    train.main(_tiny_run_args(out, "--run.stages", '["rl"]', "--rl.steps", "2", "--rl.group_filter", "none",
                              "--rl.scale_advantages", "false", "--rl.loss_mean", "sequence", "--rl.beta", "0.1",
                              "--rl.kl_reference", "old", "--rl.updates_per_pass", "2", "--rl.micro_batch", "4"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kept_fraction"] == 1.0 for r in rows if r["stage"] == "rl")  # no filter
    assert seen["scale"] and not any(seen["scale"])
    assert seen["loss_mean"] == {"sequence"} and seen["kl_to_old"] == {True}
    assert seen["updates"] == 2 * 2  # two shares of the kept groups per step, two steps
    assert seen["syncs"] == 0  # kl_reference old has no reference model to refresh
    seen.update(updates=0)
    train.main(_tiny_run_args(tmp_path / "sync", "--run.stages", '["rl"]', "--rl.steps", "2", "--rl.beta", "0.1",
                              "--rl.ref_sync_every", "1", "--rl.group_filter", "none"))
    assert seen["syncs"] == 2 and seen["updates"] == 2
