"""Every command's settings: one parser (dirl_min.settings.config.parse_config), one rule table (dirl_min.settings.checks)."""

from __future__ import annotations

import dataclasses

import pytest

from dirl_min import bench, check
from dirl_min import eval as E
from dirl_min.settings import commands as C
from dirl_min.settings import checks as S

COMMANDS = {  # root, flags, rules, the command's parser
    "eval": (C.EvalCommand, C.EVAL_ALIASES, S.EVAL_RULES, E.build_parser),
    "check": (C.CheckCommand, C.CHECK_ALIASES, S.CHECK_RULES, check.build_parser),
    "bench": (C.BenchCommand, C.BENCH_ALIASES, S.BENCH_RULES, bench.build_parser),
    "bench --shape": (C.ShapeCommand, C.SHAPE_ALIASES, S.SHAPE_RULES, bench.shape_build_parser),
}
# true/false switches, and texts checked where they are used (files, folders, benchmark names)
FREE = {"model.path", "data.benchmarks", "data.data_dir", "data.hub", "data.split_seed", "run.overwrite",
        "run.progress", "rollout.prompts", "check.lmdeploy", "reference.skip", "run.quick", "run.json", "run.quiet",
        "step.lmdeploy", "run.save", "run.worker"}


def _settings(root) -> dict:
    cfg = root()
    return {f"{s.name}.{f.name}": (getattr(getattr(cfg, s.name), f.name), f.metadata.get("hidden"))
            for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_setting_of_every_command_has_a_rule_and_a_flag(name):
    root, aliases, rules, _ = COMMANDS[name]
    every = set(_settings(root))
    assert every - {r.name for r in rules} - FREE == set()
    assert {r.name for r in rules} <= every  # a rule of a setting that does not exist would never run
    targets = {t if isinstance(t, str) else t[0] for t in aliases.values()}
    assert every == targets  # each command's parts read every setting by its flag's name


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_lists_every_setting_with_its_default(name):
    root, _, _, build = COMMANDS[name]
    parser = build()
    text = " ".join(parser.format_help().split())  # unwrap argparse's line breaks
    helps = {a.dest: a.help for a in parser._actions if f"--{a.dest}" in a.option_strings}
    for dotted, (default, hidden) in _settings(root).items():
        assert (f"--{dotted} " in text) != bool(hidden), dotted
        if not hidden:
            assert helps[dotted].endswith(f"(default: {default!r})".replace("%", "%%")), dotted


def test_eval_settings_come_from_a_yaml_file_under_the_flags(tmp_path):
    y = tmp_path / "eval.yaml"
    y.write_text("eval:\n  samples: 3\n  top_k: 7\ndecode:\n  thresholds: [0.8, 0.9]\nrun:\n  progress: false\n")
    cfg = E.parse_config(["--config", str(y), "--top-k", "5"])
    assert (cfg.eval.samples, cfg.eval.top_k, cfg.decode.evaluated, cfg.run.progress) == (3, 5, [0.8, 0.9], False)
    assert E.parse_config(["--eval.samples", "4"]).eval.samples == E.parse_config(["--samples", "4"]).eval.samples == 4
    assert E.parse_config([]).run.progress is True and E.parse_config(["--no-progress"]).run.progress is False


def test_a_bad_yaml_file_exits_with_the_commands_usage(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("rollout:\n  max_new_token: 8\n")
    with pytest.raises(SystemExit) as err:
        check.parse_args(["--config", str(y)])
    assert err.value.code == 2
    assert "unknown setting 'rollout.max_new_token'" in capsys.readouterr().err


def test_quick_keeps_the_settings_of_a_yaml_file(tmp_path):
    y = tmp_path / "b.yaml"
    y.write_text("run:\n  repeats: 3\n")
    cfg = bench.parse_args(["--config", str(y), "--quick"])
    assert (cfg.run.repeats, cfg.decode.new_tokens, cfg.rescore.batch) == (3, 64, 4)


def test_comma_lists_keep_words_as_words():
    """YAML would read off as false: --checkpointing off is the list ['off']."""
    assert bench.shape_parse_args(["--checkpointing", "off", "--stages", "sft"]).step.checkpointing == ["off"]
    assert E.parse_config(["--task-levels", "1,3", "--task", "embedded"]).data.task_levels == [1, 3]
