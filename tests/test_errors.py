"""One error base (dirl_min.infra.errors.DirlError) that every command reports the same way, and a
broken model folder named in one line by train, eval and check alike (issue 21, defect 6)."""

from __future__ import annotations

import pytest

from dirl_min import check, eval as E, train
from dirl_min.comparison.runner import CompareError
from dirl_min.data import DataError
from dirl_min.evaluation.benchmarks import HubError
from dirl_min.infra.errors import DirlError, EvalError, ModelError, SettingsError, about, one_line_errors
from dirl_min.model import build_tiny, save_model


def test_every_user_error_shares_the_base_and_keeps_its_builtin_class():
    for cls in (SettingsError, EvalError, ModelError, DataError, CompareError):
        assert issubclass(cls, DirlError) and issubclass(cls, ValueError)
    assert issubclass(HubError, DirlError) and issubclass(HubError, RuntimeError)


def test_one_line_errors_and_about():
    with pytest.raises(SystemExit) as e, one_line_errors("x"), about("--model"):
        raise DataError("f.jsonl:3: no question")
    assert str(e.value) == "dirl_min.x: error: --model: f.jsonl:3: no question"
    with pytest.raises(KeyError), one_line_errors("x"):  # a bug stays a traceback
        raise KeyError("k")


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny"
    model, tok = build_tiny(seed=0)
    save_model(model, tok, path)
    return path


def _run_all(folder, capsys):
    """The stderr line of train, eval and check on ``folder``; each must exit with one line."""
    lines = {}
    for name, run in (("train", lambda: train.main(["--model", str(folder), "--out", str(folder.parent / "o"),
                                                     "--sft.steps", "1", "--rl.steps", "0"])),
                      ("eval", lambda: E.main(["--model", str(folder), "--task", "embedded",
                                               "--out", str(folder.parent / "e")])),
                      ("check", lambda: check.main(["--model", str(folder)]))):
        with pytest.raises(SystemExit) as e:
            run()
        msg = str(e.value.code)
        assert msg.startswith(f"dirl_min.{name}: error: --model: ") and "\n" not in msg, msg
        lines[name] = msg.split(": error: ", 1)[1]
    return lines


@pytest.mark.parametrize("damage", ["no config", "broken config", "truncated weights"])
def test_a_bad_model_folder_is_one_line_naming_the_file(damage, saved_tiny, tmp_path, capsys):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(saved_tiny, folder)
    if damage == "no config":
        (folder / "config.json").unlink()
        named = "config.json"
    elif damage == "broken config":
        (folder / "config.json").write_text('{"model_type": "qwen3",')
        named = str(folder / "config.json")
    else:
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:5])
        named = str(w)
    lines = _run_all(folder, capsys)
    assert len(set(lines.values())) == 1, lines  # the same message from every command
    assert named in lines["train"]
