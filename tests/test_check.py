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
    from dirl_min.engine import score as dipo  # check.py looks rescore up there

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
    from tests.fixtures.checkpoints import make_standin_checkpoint

    path = make_standin_checkpoint(tmp_path / "sdar", source=sdar_source)
    result = check.main(["--model", str(path), "--dtype", "float32", "--max-new-tokens", "8"])
    assert result["ok"] and result["tokens"] > 0



def test_engine_agreement_counts_identical_sequences_and_the_agreeing_prefix():
    from dirl_min.decoding import Rollout

    def roll(responses, steps):
        n = len(responses)
        return Rollout(prompt_ids=[[0]] * n, response_ids=responses, step_map=steps, logp=[[]] * n,
                       truncated=[False] * n, stopped_at=[None] * n, block_size=4, mask_token_id=9)

    native = roll([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 1, 2, 3], [1, 2, 2, 3]])
    assert check.engine_agreement(native, native) == {"sequences": 1.0, "tokens": 1.0}
    token_differs = roll([[1, 2, 3, 4], [5, 6, 9, 8]], [[1, 1, 2, 3], [1, 2, 2, 3]])
    assert check.engine_agreement(native, token_differs) == {"sequences": 0.5, "tokens": 6 / 8}
    step_differs = roll([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 2, 3], [1, 2, 2, 3]])  # same tokens, other order
    assert check.engine_agreement(native, step_differs) == {"sequences": 0.5, "tokens": 5 / 8}
