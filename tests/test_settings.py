"""Bad settings are refused before any work, with a message naming the setting, the value and what
is allowed, and nothing is written to the output folder."""

from __future__ import annotations

import json
import re

import pytest

from dirl_min import train
from dirl_min.settings.config import Config
from dirl_min.settings.checks import CONFIG_RULES, problems, validate



# (extra command-line arguments, files to write first {name: content or bytes}, expected message)
CASES = {
    "group of one": (["--rl.group_size", "1"], {}, "rl.group_size = 1: expected an integer >= 2"),
    "group of zero": (["--rl.group_size", "0"], {}, "rl.group_size = 0: expected an integer >= 2"),
    "no accumulation": (["--sft.grad_accum", "0"], {}, "sft.grad_accum = 0: expected an integer >= 1"),
    "accumulation over the batch": (["--sft.grad_accum", "9", "--sft.batch_size", "8"], {},
                                    "sft.grad_accum = 9: must be at most sft.batch_size = 8"),
    "negative sft steps": (["--sft.steps", "-5"], {}, "sft.steps = -5: expected an integer >= 0"),
    "negative rl steps": (["--rl.steps", "-1"], {}, "rl.steps = -1: expected an integer >= 0"),
    "float8": (["--model.dtype", "float8"], {}, "model.dtype = 'float8': expected one of auto, float32, bfloat16, float16"),
    "yaml true as steps": (["--config", "{tmp}/c.yaml"], {"c.yaml": "sft:\n  steps: true\n"},
                           "sft.steps must be int, got True"),
    "yaml true as lr": (["--config", "{tmp}/c.yaml"], {"c.yaml": "rl:\n  lr: yes\n"}, "rl.lr must be float, got True"),
    "template without question": (["--data.prompt_template", "Answer:"], {},
                                  "data.prompt_template = 'Answer:': expected a text containing {question}"),
    "non-UTF-8 data": (["--rl-data", "{tmp}/rl.jsonl"],
                       {"rl.jsonl": b'{"question": "a", "ground_truth_answer": "1"}\n{"question": "\xe9", '
                                    b'"ground_truth_answer": "2"}\n'}, "rl.jsonl:2: not UTF-8 text (byte 0xe9"),
    "no prompts per step": (["--rl.prompts_per_step", "0"], {}, "rl.prompts_per_step = 0: expected an integer >= 1"),
    "empty sft batch": (["--sft.batch_size", "0"], {}, "sft.batch_size = 0: expected an integer >= 1"),
    "no eval samples": (["--eval.samples", "0"], {}, "eval.samples = 0: expected an integer >= 1"),
    "nothing held out": (["--data.held_out", "0"], {}, "data.held_out = 0: expected an integer >= 1"),
    "held out 1 (no whole family)": (["--data.held_out", "1"], {}, "data.held_out = 1: no whole family of problems fits"),
    "log every 0": (["--run.log_every", "0"], {}, "run.log_every = 0: expected an integer >= 1"),
    "kv heads": (["--model.num_kv_heads", "3"], {}, "model.num_kv_heads = 3: must divide model.num_heads = 4"),
    "negative lr": (["--sft.lr", "-0.001"], {}, "sft.lr = -0.001: expected a number > 0"),
    "nan lr": (["--rl.lr", "nan"], {}, "rl.lr = nan: expected a number > 0"),
    "unknown reward": (["--rl.rewards", "{accuracy: 1.0, speedy: 0.5}"], {},
                       "rl.rewards = {'accuracy': 1.0, 'speedy': 0.5}: expected a mapping of reward names to numeric "
                       "weights; names: accuracy, boxed"),
    "unknown backend": (["--rl.rollout_backend", "vllm"], {}, "rl.rollout_backend = 'vllm': expected one of native, lmdeploy"),
    "held out 5000": (["--data.held_out", "5000"], {},
                      "data.held_out = 5000: must be less than the number of problems; the embedded task (levels [1, 2], "
                      "operands 0..30) has 1922 problems"),
    "level 7": (["--data.task_levels", "[7]"], {}, "data.task_levels = [7]: expected a non-empty list of distinct levels"),
    "invalid yaml": (["--config", "{tmp}/c.yaml"], {"c.yaml": "sft:\n  steps: 5\n   lr: 0.1\n"},
                     "c.yaml:3: invalid YAML (mapping values are not allowed here)"),
    "missing yaml": (["--config", "{tmp}/none.yaml"], {}, "none.yaml: no such file"),
    "folder as data": (["--sft-data", "{tmp}"], {}, "': expected a JSON, JSONL or parquet file; it is a folder"),
    "missing data": (["--eval-data", "{tmp}/nope.jsonl"], {}, "nope.jsonl': expected a JSON, JSONL or parquet file; no such file"),
    "unknown stage": (["--run.stages", "sft,ppo"], {}, "run.stages = ['sft', 'ppo']: expected a list of distinct stages"),
    "lmdeploy without a checkpoint": (["--rl.rollout_backend", "lmdeploy"], {}, "needs model.path"),
    "resume and overwrite": (["--resume", "--overwrite"], {}, "run.resume and run.overwrite exclude each other"),
    "unknown group filter": (["--rl.group_filter", "std"], {}, "rl.group_filter = 'std': expected one of"),
    "unknown response style": (["--data.response_style", "chain"], {}, "data.response_style = 'chain': expected one of"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_settings_are_refused_before_any_work(name, tmp_path, capsys, monkeypatch):
    extra, files, message = CASES[name]
    for fname, content in files.items():
        (tmp_path / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "run"
    calls = []
    monkeypatch.setattr(train, "run_eval", lambda *a, **k: calls.append(1))  # the first model call
    with pytest.raises(SystemExit) as err:
        train.main(["--out", str(out), *[a.replace("{tmp}", str(tmp_path)) for a in extra]])
    text = f"{err.value.code}\n{capsys.readouterr().err}"
    assert message in text, text
    assert not out.exists() and not calls


def test_every_problem_is_reported_at_once():
    cfg = Config()
    cfg.rl.group_size, cfg.sft.grad_accum, cfg.run.log_every = 1, 0, 0
    with pytest.raises(ValueError) as err:
        validate(cfg)
    assert len(re.findall(r"^  \S+ = ", str(err.value), re.M)) == 3


def test_the_defaults_and_shipped_configs_pass(repo_root):
    from dirl_min.settings.config import parse_config

    validate(Config())
    gpu = parse_config(["--config", str(repo_root / "configs" / "sdar-8b-dirl.yaml")])
    assert problems(gpu, CONFIG_RULES) == []


def test_every_setting_has_a_rule():
    """A new setting without a row in the table would go unchecked."""
    ruled = {r.name for r in CONFIG_RULES}
    free = {"data.sft_data", "data.rl_data", "data.eval_data", "data.split_seed", "model.path",  # checked as files / any int
            "model.gradient_checkpointing", "decode.fused_commit", "eval.greedy", "run.resume", "run.overwrite"}
    every = {f"{s}.{k}" for s, sub in Config().to_dict().items() for k in sub}
    assert every - ruled - free == set()


def test_long_evaluation_prompts_are_skipped_and_counted_like_training_ones(tmp_path, capsys):
    from dirl_min.settings.config import parse_config

    f = tmp_path / "ev.jsonl"
    f.write_text("".join(json.dumps({"question": q, "ground_truth_answer": "1"}) + "\n"
                         for q in ("What is 1 + 0?", "What is " + " + ".join(["1"] * 400) + "?")))
    cfg = parse_config(["--eval-data", str(f), "--data.max_prompt_tokens", "64"])
    *_, ev = train.build(cfg)
    assert [p.question for p in ev] == ["What is 1 + 0?"]
    assert "eval: skipped 1 of 2 prompts longer than data.max_prompt_tokens=64" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--samples", "0"], "--samples = 0: expected an integer >= 1"),
    (["--top-p", "0"], "--top-p = 0.0: expected a number in (0, 1]"),
    (["--prompt-template", "Q"], "--prompt-template = 'Q': expected a text containing {question}"),
    (["--held-out", "0", "--task", "embedded"], "--held-out = 0: expected an integer >= 1"),
    (["--backend", "lmdeploy"], "--backend lmdeploy needs --model"),  # before the (tiny) model is built
    (["--backend", "lmdeploy", "--model", "m", "--thresholds", "0.8,0.9"], "takes one --thresholds value"),
])
def test_eval_options_use_the_same_rules(argv, message, capsys):
    from dirl_min import eval as E

    with pytest.raises(SystemExit):
        E.parse_config(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens = 0: expected an integer >= 1"),
    (["--threshold", "1.5", "--tolerance", "-1"], "--threshold = 1.5: expected a number in [0, 1]; --tolerance = -1.0"),
    (["--prompts", "{tmp}/p.txt"], "p.txt:2: not UTF-8 text"),
    (["--prompts", "{tmp}"], "is a folder; expected a file"),
])
def test_check_options_use_the_same_rules(argv, message, tmp_path, capsys):
    from dirl_min import check

    (tmp_path / "p.txt").write_bytes(b"What is 1 + 1?\n\xff\n")
    with pytest.raises(SystemExit):
        check.parse_args([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert message in capsys.readouterr().err


def test_usage_lines_name_the_command_and_check_help_describes_every_option(capsys):
    from dirl_min import check
    from dirl_min import eval as E
    from dirl_min.settings.config import build_parser

    parser = check.build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    assert parser.format_usage().startswith("usage: python -m dirl_min.check")
    assert E.build_parser().format_usage().startswith("usage: python -m dirl_min.eval")
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m dirl_min.train")


def test_lmdeploy_rollouts_the_machine_cannot_run_are_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    import dirl_min.engine.lmdeploy_engine as L

    monkeypatch.setattr(L, "lmdeploy_missing", lambda: "needs a CUDA GPU and none is visible")
    built = []
    monkeypatch.setattr(train, "build", lambda *a, **k: built.append(1))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        train.main(["--out", str(out), "--rl.rollout_backend", "lmdeploy", "--model.path", str(tmp_path)])
    assert ("rl.rollout_backend = 'lmdeploy': needs a CUDA GPU and none is visible; or use rl.rollout_backend: native"
            in str(err.value.code))
    assert not built and not out.exists()
