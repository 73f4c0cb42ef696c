"""Settings that were accepted and then ignored, or misleading (issue 21, defect 7): each test here
failed before the fix."""

from __future__ import annotations

import re

import pytest
import torch

from dirl_min import bench, train
from dirl_min import eval as E
from dirl_min.settings.checks import CONFIG_RULES, validate
from dirl_min.settings.config import Config, build_parser, parse_config


def test_the_tiny_model_takes_model_dtype():
    cfg = Config()
    cfg.model.dtype = "bfloat16"
    model = train.build(cfg)[0]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cfg.model.dtype = "auto"  # on CPU: float32, the default job's weights
    if not torch.cuda.is_available():
        assert {p.dtype for p in train.build(cfg)[0].parameters()} == {torch.float32}


def test_stages_run_in_order():
    cfg = parse_config(["--run.stages", "[rl, sft]"])  # the type is right; the order is the rules' business
    with pytest.raises(ValueError) as e:
        validate(cfg)
    assert "run.stages = ['rl', 'sft']: expected a list of distinct stages from sft, rl, in that order" in str(e.value)
    validate(parse_config(["--run.stages", "rl"]))  # RL alone (from --model) stays allowed


def _yaml_error(tmp_path, text: str) -> str:
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ValueError) as e:
        parse_config(["--config", str(y)])
    return str(e.value).replace(str(y), "FILE")


def test_a_yaml_type_error_names_the_file_not_a_flag(tmp_path):
    assert _yaml_error(tmp_path, "sft:\n  steps: many\n") == "FILE: sft.steps: expected int, got 'many'"


def test_a_misspelt_setting_gets_a_suggestion_not_the_whole_list(tmp_path):
    assert _yaml_error(tmp_path, "sft:\n  stepz: 5\n") == "FILE: unknown setting 'sft.stepz'; did you mean sft.steps?"
    assert _yaml_error(tmp_path, "nothing:\n  like_it: 5\n") == (
        "FILE: unknown setting 'nothing.like_it'; the sections are model, data, sft, rl, decode, eval, run; "
        "--help lists every setting")


def test_an_unknown_benchmark_name_is_not_called_a_benchmark_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        E.main(["--benchmarks", "foo", "--out", str(tmp_path / "e")])
    msg = str(e.value.code)
    assert "'foo' is not a file, a folder or a benchmark name (math500, gsm8k" in msg and "is a benchmark name" not in msg


def _help_of(parser, dotted: str) -> str:
    action = next(a for a in parser._actions if a.dest == dotted)
    return action.help


def test_help_names_every_value_the_rules_accept():
    """Where a rule lists the accepted names (one of …, names: …), the setting's help names each."""
    parser = build_parser("x")
    checked = 0
    for rule in CONFIG_RULES:
        allowed = rule.allowed() if callable(rule.allowed) else rule.allowed
        m = re.match(r"one of (.*)$", allowed) or re.search(r"names: (.*)$", allowed)
        if not m:
            continue
        checked += 1
        text = _help_of(parser, rule.name)
        missing = [w for w in m.group(1).split(", ") if w not in text]
        assert not missing, f"--{rule.name} help leaves out {missing}: {text!r}"
    assert checked >= 8  # model.dtype, rl.rewards, rl.objective, …


def test_bench_help_lists_shape(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert re.search(r"^\s+--shape NAME\s", out, re.M) and "qwen3-0.6b" in out


def test_a_setting_is_declared_once_and_its_rule_reaches_the_table():
    """Issue 19 point 5: default, help and rule on one field; the command's table is built from it."""
    import dataclasses
    from dataclasses import dataclass, field

    from dirl_min.settings.config import _f
    from dirl_min.settings.rules import at_least, one_of, problems, rules_of

    @dataclass
    class Part:
        n: int = _f(1, "a count", rule=at_least(1))
        free: str = _f("", "no rule")
        mode: str = _f("a", "a or b", rule=one_of("a", "b"))

    @dataclass
    class Root:
        part: Part = field(default_factory=Part)

    assert [r.name for r in rules_of(Root)] == ["part.n", "part.mode"]
    bad = Root(Part(n=0, mode="c"))
    assert problems(bad, rules_of(Root)) == ["part.n = 0: expected an integer >= 1", "part.mode = 'c': expected one of a, b"]
    assert [r.name for r in CONFIG_RULES] == [f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
                                               for f in dataclasses.fields(s.default_factory) if f.metadata["rule"]]
