"""python -m dirl_min.check: the user-facing consistency check."""

from __future__ import annotations

import pytest

from dirl_min import check


def test_check_passes_on_a_consistent_model(capsys):
    result = check.main(["--max-new-tokens", "16"])
    assert result["ok"] and result["max_abs_diff"] <= 1e-4 and result["tokens"] >= 16
    assert '"ok": true' in capsys.readouterr().out


def test_check_catches_a_scorer_that_disagrees_with_the_engine(monkeypatch, capsys):
    """If the trainer's scoring drifted from the decoder (here: a wrong step map), the check fails."""
    from dirl_min import dipo

    real = dipo.rescore

    def wrong_rescore(model, rollout, **kw):
        for i in range(len(rollout)):
            rollout.step_map[i] = [1] * len(rollout.step_map[i])  # as if every token came at step 1
        return real(model, rollout, **kw)

    monkeypatch.setattr(dipo, "rescore", wrong_rescore)
    with pytest.raises(SystemExit):
        check.main(["--max-new-tokens", "16", "--temperature", "0"])
    assert "DiPO's ratio would not be 1" in capsys.readouterr().err


def test_check_on_an_sdar_standin_checkpoint(tmp_path, sdar_source):
    from dirl_min.model import make_standin_checkpoint

    path = make_standin_checkpoint(tmp_path / "sdar", source=sdar_source)
    result = check.main(["--model", str(path), "--dtype", "float32", "--max-new-tokens", "8"])
    assert result["ok"] and result["tokens"] > 0
