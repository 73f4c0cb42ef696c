"""compare --diagnose (issue 18): each objective's log-prob gap and gradient cosine to DiPO's exact
estimate. The exact reference is rescored one round per row, a path independent of the objectives'."""

from __future__ import annotations

import json

import pytest
import torch

from dirl_min.core.estimates import ObjectiveSpec
from dirl_min.comparison.diagnose import diagnose, diagnosis_rows
from test_objectives import _rollout


@pytest.fixture(scope="module")
def diagnosis():
    model, roll = _rollout(n=3)
    adv = torch.tensor([1.0, -0.5, 0.25])
    rows = {**diagnosis_rows(), "tracerl_s_huge": ObjectiveSpec("tracerl", shrinkage=10**6)}
    return diagnose(model, roll, adv, draws=2, rows=rows)


def test_dipo_is_exact_and_tracerl_at_s1_is_dipo(diagnosis):
    table, info = diagnosis
    assert info["decoder_gap"] <= 1e-5  # the exact reference is the decoder's own log-probs
    dipo = table["dipo"]
    assert dipo["logp_gap"] <= 1e-5 and max(dipo["logp_gap_by_position"]) <= 1e-5
    assert dipo["grad_cosine"] >= 0.9999 and dipo["grad_cosine_std"] is None and dipo["draws"] == 1
    assert table["tracerl"] == dipo  # TraceRL's setting on block models (s = 1)


def test_biased_estimates_show_a_gap_and_random_views_a_spread(diagnosis):
    table, _ = diagnosis
    # d1 on a block model reads each block fully masked: TraceRL's merge with every step of a block in one round
    assert table["diffu_grpo"]["logp_gap"] == table["tracerl_s_huge"]["logp_gap"] > 1e-3
    assert table["diffu_grpo"]["grad_cosine"] == pytest.approx(table["tracerl_s_huge"]["grad_cosine"], abs=1e-12)
    for name in ("coupled_grpo", "diffu_grpo_masked_context"):
        row = table[name]
        assert row["draws"] == 2 and row["grad_cosine_std"] is not None and row["logp_gap"] > 1e-3
        assert row["grad_cosine"] < 0.9999
    assert table["coupled_grpo"]["copies"] == 2 * 3 and table["diffu_grpo"]["copies"] == 3
    assert table["dipo"]["copies"] > 3  # several decoding steps per block: several rounds


def test_cli_quick_writes_the_table_json_and_picture(tmp_path, monkeypatch, capsys):
    from dirl_min import compare
    from dirl_min.engine import rollouts
    from dirl_min.model import build_tiny, save_model

    model, tok = build_tiny(seed=0)
    ck = save_model(model, tok, tmp_path / "ck")
    real = rollouts.rollout_and_reward

    def differing(*a, **k):  # an untrained model is never right: give the groups rewards that differ
        roll, rewards, correct, parts = real(*a, **k)
        return roll, torch.arange(len(rewards), dtype=torch.float32) % 3, correct, parts

    monkeypatch.setattr(rollouts, "rollout_and_reward", differing)
    out = tmp_path / "diag"
    result = compare.main(["--diagnose", "--quick", "--model", str(ck), "--out", str(out)])
    saved = json.loads((out / "diagnosis.json").read_text())
    assert list(saved) == list(diagnosis_rows()) and saved == json.loads(json.dumps(result["table"]))
    assert saved["dipo"]["logp_gap"] <= 1e-5 and saved["dipo"]["grad_cosine"] >= 0.9999
    assert saved["coupled_grpo"]["draws"] == 2  # --quick
    assert (out / "diagnosis.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in saved)
    monkeypatch.setattr(rollouts, "rollout_and_reward", real)
    with pytest.raises(SystemExit, match="equal rewards"):
        compare.main(["--diagnose", "--quick", "--model", str(ck), "--out", str(out)])
