"""One typed configuration for the whole pipeline: dataclasses, YAML files, dotted overrides.

``python -m dirl_min.train --help`` lists every setting below with its meaning and default. Precedence:
defaults < ``--config FILE.yaml`` < ``--section.name VALUE``. The other commands' settings
(:mod:`dirl_min.settings.commands`) are parsed by the same :func:`parse_config`.

The block size and mask id are *not* settings here: they belong to the model
(``config.json``), the single source of truth. ``model.block_size`` only builds the
tiny model, or declares the block size of a plain (non-SDAR) checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dirl_min.data.tasks import PLAIN_TEMPLATE
from dirl_min.infra.errors import SettingsError
from dirl_min.core.estimates import RECORDS
from dirl_min.core.objectives import GROUP_FILTERS, LOSS_MEANS
from dirl_min.core.unmask import STRATEGIES
from dirl_min.data.tasks import RESPONSE_STYLES
from dirl_min.settings.rules import Check, at_least, betas, levels, number, one_of, reward_weights, template


def _f(default, help: str, *, rule: Check | None = None, hidden: bool = False):
    """A setting, declared once: its default, its meaning (shown by ``--help`` unless ``hidden``) and
    the rule its value must keep (:mod:`dirl_min.settings.rules`; checked before any work)."""
    meta = {"help": help, "hidden": hidden, "rule": rule}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


#: the parameter dtypes a command takes (auto: bfloat16 on GPU, float32 on CPU)
DTYPES = ("auto", "float32", "bfloat16", "float16")



def param_rule(setting: str) -> Check:
    """The rule an objective's record declares for one of its parameters (:class:`~dirl_min.core.estimates.Param`)."""
    p = next(p for o in RECORDS.values() for p in o.params if p.setting == setting)
    return at_least(int(p.lo), p.why) if p.integer else number(p.lo, math.inf if p.hi is None else p.hi,
                                                                hi_open=True, why=p.why)

@dataclass
class ModelConfig:
    path: str = _f("", "checkpoint folder (SDAR / DiRL / TraDo / Qwen3); empty = build the tiny model")
    block_size: int = _f(0, "block size: 0 = the checkpoint's own (the tiny model: 4); a value that conflicts with an SDAR checkpoint's is an error",
                         rule=at_least(0, "0 = the checkpoint's own"))
    mask_token_id: int = _f(-1, "mask id for a plain checkpoint without one (-1 = from the checkpoint/tokenizer)",
                            rule=at_least(-1, "-1 = from the checkpoint"))
    hidden_size: int = _f(64, "tiny model: hidden size", rule=at_least(1))
    num_layers: int = _f(2, "tiny model: layers", rule=at_least(1))
    num_heads: int = _f(4, "tiny model: attention heads", rule=at_least(1))
    num_kv_heads: int = _f(2, "tiny model: key/value heads", rule=at_least(1))
    intermediate_size: int = _f(256, "tiny model: MLP width", rule=at_least(1))
    dtype: str = _f("auto", "float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU); the tiny model too",
                    rule=one_of(*DTYPES))
    attn_implementation: str = _f("auto", "sdpa, flex_attention, eager or auto (flex on GPU, sdpa on CPU)",
                                  rule=one_of("auto", "sdpa", "flex_attention", "eager"))
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")


@dataclass
class DataConfig:
    sft_data: str = _f("", "SFT file (JSON/JSONL/parquet: prompt+response, or messages); empty = the embedded task")
    rl_data: str = _f("", "RL file (question + ground_truth_answer); empty = the embedded task's training split")
    eval_data: str = _f("", "evaluation file (question + ground_truth_answer); empty = the embedded held-out split")
    task_levels: list = _f([1, 2], "embedded task: 1 = a + b, 2 = a - b, 3 = 'Solve: If x + a = c'", rule=levels())
    task_max_operand: int = _f(30, "embedded task: operands run over 0..N (30: 1922 problems; see held_out)", rule=at_least(0))
    held_out: int = _f(400, "embedded task: problems held out for evaluation (never trained on; whole operand families: a + b, b + a, a - b, b - a stay together). 400 makes the paired RL − SFT interval 2.1–2.6 points wide each side (measured on seeds 0–4: RL − SFT +3.5 to +9.5, each interval above zero, +6.1 [+3.7, +8.6] across seeds; the earlier 88 gave about ±5)",
                       rule=at_least(1, "the embedded task's evaluation problems"))
    split_seed: int = _f(0, "seed of the embedded train/held-out split")
    prompt_template: str = _f(PLAIN_TEMPLATE, "user message; {question} is replaced (DiRL: '{question}\\nPlease reason step by step, and put your final answer within \\boxed{}.')",
                              rule=template())
    response_style: str = _f("answer", "embedded task SFT responses: answer = '\\boxed{7}'; worked = '3 + 4 = 7. \\boxed{7}' (longer, mostly predictable: room for faster decoding)",
                             rule=one_of(*RESPONSE_STYLES))
    max_prompt_tokens: int = _f(1024, "prompts longer than this are skipped and counted", rule=at_least(1))


@dataclass
class SFTConfig:
    steps: int = _f(4000, "optimizer steps (0 = skip SFT). On the default task (seed 0, 1 thread) 2200 steps gave SFT avg@16 14.9% and RL − SFT −2.6 to +3.2; 4000 gave 62.5% and +8.0",
                     rule=at_least(0, "0 = skip SFT"))
    batch_size: int = _f(32, "examples per optimizer step (across processes and accumulation)", rule=at_least(1))
    grad_accum: int = _f(1, "micro-batches per optimizer step", rule=at_least(1, "micro-batches per optimizer step"))
    lr: float = _f(3e-3, "peak learning rate", rule=number(0, lo_open=True))
    warmup_steps: int = _f(20, "linear warm-up steps", rule=at_least(0))
    min_lr_ratio: float = _f(0.1, "cosine decay floor, as a fraction of lr", rule=number(0, 1))
    weight_decay: float = _f(0.01, "AdamW weight decay", rule=number(0))
    betas: list = _f([0.9, 0.98], "AdamW betas", rule=betas())
    grad_clip: float = _f(1.0, "gradient-norm clip (0 = off)", rule=number(0, why="0 = off"))
    t_min: float = _f(0.1, "lowest noise level t; the spec draws t from (0, 1]. Kept at 0.1: on the default (seed 0, "
                                 "then operands 0..20, 2200 steps) t_min 0 gave SFT avg@16 27.3%, greedy 23.9%; t_min 0.1 gave 42.8%, 62.5% "
                                 "(the 1/p weights of small t make the gradient noisy)", rule=number(0, 1, hi_open=True))
    eps: float = _f(1e-3, "mask probability floor: p = (1-eps) t + eps",
                    rule=number(0, 1, lo_open=True, hi_open=True))
    max_seq_len: int = _f(2048, "examples longer than this (tokens) are skipped and counted", rule=at_least(1))
    pack_tokens: int = _f(0, "pack several examples per row up to this many layout tokens (0 = one per row)",
                          rule=at_least(0, "0 = one example per row"))


@dataclass
class RLConfig:
    steps: int = _f(600, "DiPO steps (0 = skip RL)", rule=at_least(0, "0 = skip RL"))
    prompts_per_step: int = _f(16, "groups (prompts) per step", rule=at_least(1))
    group_size: int = _f(8, "responses per prompt (G)",
                         rule=at_least(2, "DiPO compares responses within a group: a group of one has zero advantage " "and never updates the model"))
    lr: float = _f(3e-4, "learning rate", rule=number(0, lo_open=True))
    warmup_steps: int = _f(10, "linear warm-up steps, then a constant learning rate (DiRL: 10)",
                           rule=at_least(0, "0 = constant from the first step"))
    weight_decay: float = _f(0.0, "AdamW weight decay", rule=number(0))
    betas: list = _f([0.9, 0.98], "AdamW betas", rule=betas())
    grad_clip: float = _f(1.0, "gradient-norm clip (0 = off)", rule=number(0, why="0 = off"))
    eps_low: float = _f(0.2, "PPO clip: lower", rule=number(0, 1, hi_open=True))
    eps_high: float = _f(0.28, "PPO clip: upper (DAPO clip-higher)", rule=number(0))
    beta: float = _f(0.0, "weight of the k3 KL to a frozen reference model (0 = no reference)",
                     rule=number(0, why="0 = no reference model"))
    num_iterations: int = _f(1, "optimisation passes per batch (>1 reuses logp_old)", rule=at_least(1))
    micro_batch: int = _f(0, "responses per training forward (0 = all kept responses of a rollout at once)",
                          rule=at_least(0, "0 = all kept responses at once"))
    sampling_rounds: int = _f(1, "dynamic sampling: at most this many rounds of prompts to fill the batch with mixed groups",
                              rule=at_least(1))
    group_filter: str = _f("reward_std", "dynamic sampling keeps groups whose rewards differ (reward_std, DiRL) or whose accuracy is neither all 0 nor all 1 (accuracy, DAPO; the same with accuracy-only rewards), whose accuracy is in [0.2, 0.8] (accuracy_band, TraceRL), or every group (none)",
                           rule=one_of(*GROUP_FILTERS))
    rewards: dict = _f({"accuracy": 1.0}, "named rewards and weights: accuracy, speed, format, boxed, repetition, overlength, cosine",
                       rule=reward_weights())
    temperature: float = _f(1.0, "rollout temperature",
                            rule=number(0, lo_open=True, why="a group sampled at temperature 0 is one response repeated"))
    top_k: int = _f(0, "rollout top-k (0 = off; DiRL: 50)", rule=at_least(0, "0 = off"))
    top_p: float = _f(1.0, "rollout top-p", rule=number(0, 1, lo_open=True))
    max_new_tokens: int = _f(16, "rollout length limit (whole blocks)", rule=at_least(1))
    reward_workers: int = _f(0, "processes for reward computation (0 = in-process)", rule=at_least(0))
    objective: str = _f("dipo", "how the update reads each response's log-probabilities: dipo = every token in the context it was decoded in (DiRL); tracerl = rl.trace_shrinkage decoding steps merged per round (TraceRL; 1, what it runs on block models, reads as dipo, 2 is the shrinkage ablation); diffu_grpo = one copy, each block fully masked given the clean prompt and clean earlier blocks (d1 on a block model); coupled_grpo = two complementary random masks of the response (DiffuCoder); diffu_grpo_masked_context = ablation: d1's view with the response and rl.prompt_mask_prob of the prompt masked in the clean stream too (the old port)",
                        rule=one_of(*RECORDS))
    trace_shrinkage: int = _f(1, "tracerl: consecutive decoding steps merged into one training round (TraceRL's s; 1 = dipo exactly and TraceRL's setting on block models; 2 = the shrinkage ablation)",
                              rule=param_rule("rl.trace_shrinkage"))
    prompt_mask_prob: float = _f(0.15, "diffu_grpo_masked_context: probability of masking each prompt token, drawn afresh for every pass (d1: 0.15)",
                                 rule=param_rule("rl.prompt_mask_prob"))
    loss_mean: str = _f("token", "how the clipped loss averages: token = over all response tokens of the step (DAPO, DiRL; d1 and DiffuCoder per micro-batch); sequence = within each response, then over responses (TraceRL)",
                        rule=one_of(*LOSS_MEANS))
    scale_advantages: bool = _f(True, "divide each group's r - mean by its std (DiRL, TraceRL); false = r - mean (d1, DiffuCoder)",
                                rule=Check(lambda v: isinstance(v, bool), "true or false"))
    kl_reference: str = _f("initial", "the policy the k3 KL (rl.beta > 0) is taken to: initial = a frozen copy of the starting model (refreshed every rl.ref_sync_every steps); old = the sampling policy of the step (TraceRL)",
                           rule=one_of("initial", "old"))
    ref_sync_every: int = _f(0, "kl_reference initial: copy the policy into the reference every N steps (0 = never; d1, DiffuCoder: 64)",
                             rule=at_least(0, "0 = never"))
    updates_per_pass: int = _f(1, "optimizer steps per pass over a step's kept responses, each on an equal share of its micro-batches (TraceRL: several)",
                               rule=at_least(1))
    rollout_backend: str = _f("native", "native = dirl_min's KV-cached decoder on the trained module; lmdeploy = LMDeploy's PyTorch engine (CUDA, lmdeploy 0.18; weights synced in memory each step)",
                              rule=one_of("native", "lmdeploy"))


@dataclass
class Unmasking:
    """Which masked positions a denoising step commits (shared by every command that decodes)."""

    strategy: str = _f("low_confidence_dynamic", "low_confidence_dynamic, low_confidence_static or sequential",
                       rule=one_of(*STRATEGIES))
    threshold: float = _f(0.9, "dynamic strategy confidence threshold", rule=number(0, 1))
    steps: int = _f(0, "static/sequential: denoising steps per block (0 = block size)",
                    rule=at_least(0, "0 = block size"))


@dataclass
class DecodeConfig(Unmasking):
    fused_commit: bool = _f(True, "write a finished block's K/V in the next block's first forward")


@dataclass
class Sampling:
    """How each problem is sampled for avg@k (shared by the main job's evaluation and dirl_min.eval)."""

    samples: int = _f(16, "samples per problem at temperature 1 (avg@k, pass@k; DiRL: 16)", rule=at_least(1))
    temperature: float = _f(1.0, "sampling temperature for avg@k (0 = greedy)", rule=number(0, why="0 = greedy"))
    top_k: int = _f(50, "top-k for avg@k (0 = off; DiRL: 50)", rule=at_least(0, "0 = off"))
    top_p: float = _f(1.0, "top-p for avg@k (1 = off)", rule=number(0, 1, lo_open=True))


@dataclass
class EvalConfig(Sampling):
    greedy: bool = _f(True, "also report greedy accuracy")
    max_new_tokens: int = _f(16, "evaluation length limit (whole blocks); python -m dirl_min.eval and DiRL: 8192, "
                                 "here the embedded task's answers fit in 16 and an untrained model never stops",
                             rule=at_least(1))
    batch_size: int = _f(256, "sequences per decoding batch (memory and speed only)", rule=at_least(1))
    max_problems: int = _f(0, "evaluate at most this many problems (0 = all)", rule=at_least(0, "0 = all"))


@dataclass
class RunConfig:
    out: str = _f("runs/default", "output folder: summary.json, metrics.jsonl, TensorBoard, plots, checkpoints",
                  rule=Check(lambda v: isinstance(v, str) and bool(v.strip()), "a folder name"))
    seed: int = _f(0, "global seed (model init, data order, noise, sampling)", rule=at_least(0))
    threads: int = _f(1, "torch CPU threads (0 = torch's default: all cores, for larger models). 1: the default job runs faster than at 2 threads on 2 cores (about 300 s against 450 s), and RL reproduces bit for bit (at 2 threads it does not on a busy machine; see the README)", rule=at_least(0, "0 = torch's default"))
    save_every: int = _f(0, "checkpoint every N steps of each phase (0 = only at phase ends)",
                         rule=at_least(0, "0 = only at stage ends"))
    keep_checkpoints: int = _f(0, "keep only the newest N step checkpoints (run.save_every, interrupts); the "
                               "stage-final ones always stay (0 = keep all)", rule=at_least(0, "0 = keep all"))
    resume: bool = _f(False, "resume from the latest checkpoint in --run.out (the settings must match the saved run's)")
    overwrite: bool = _f(False, "replace an earlier run in --run.out (otherwise a fresh run there is refused)")
    log_every: int = _f(10, "write metrics every N steps", rule=at_least(1))
    stages: list = _f(["sft", "rl"], "which stages to run, in order",
                      rule=Check(lambda v: isinstance(v, list) and all(s in ("sft", "rl") for s in v) and len(set(v)) == len(v) and v == sorted(v, key=("sft", "rl").index), "a list of distinct stages from sft, rl, in that order (RL starts from the SFT model)"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_value(text: str, current, where: str):
    """Parse a text value to the type of the setting's default; ``where`` names it in a message
    (``--sft.steps`` on the command line, ``FILE: sft.steps`` in a YAML file)."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{where}: expected true/false, got {text!r}")
    if isinstance(current, (list, dict)):
        if isinstance(current, list) and not text.lstrip().startswith("["):  # a comma list: 1,2 or sft,rl or off
            value = [_scalar(v.strip()) for v in text.split(",") if v.strip()]
        else:
            value = yaml.safe_load(text)
        if not isinstance(value, type(current)):
            raise SettingsError(f"{where}: expected a {type(current).__name__} (YAML), got {text!r}")
        return value
    try:
        return type(current)(text)
    except ValueError:
        raise SettingsError(f"{where}: expected {type(current).__name__}, got {text!r}") from None


def _scalar(text: str):
    """A number where the text is one, else the text (YAML would read on/off/yes as booleans)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _apply(cfg, dotted: str, value, source: str) -> None:
    section, _, name = dotted.partition(".")
    sub = getattr(cfg, section, None)
    if sub is None or not dataclasses.is_dataclass(sub) or not name or not hasattr(sub, name):
        raise SettingsError(f"{source}: unknown setting {dotted!r}; {_suggestion(cfg, dotted)}")
    current = getattr(sub, name)
    if isinstance(value, str) and not isinstance(current, str):
        value = _parse_value(value, current, f"--{dotted}" if source == "command line" else f"{source}: {dotted}")
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif not isinstance(value, type(current)) or isinstance(value, bool) != isinstance(current, bool):
        # bool is a subclass of int: without the second test YAML's `steps: true` would mean 1 step
        raise SettingsError(f"{source}: {dotted} must be {type(current).__name__}, got {value!r}")
    setattr(sub, name, value)


def _suggestion(cfg, dotted: str) -> str:
    """``did you mean …?`` for a misspelt setting, else where the settings are listed."""
    known = [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]
    close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return f"the sections are {', '.join(s.name for s in dataclasses.fields(cfg))}; --help lists every setting"


def load_yaml(cfg, path: str | Path) -> None:
    """Apply a YAML file of ``section: {name: value}`` onto ``cfg``.

    Raises:
        SettingsError: a missing or unreadable file, invalid YAML (with the line), an unknown
            setting or a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"--config {path}: " + ("is a folder; expected a YAML file" if path.is_dir() else "no such file"))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise SettingsError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise SettingsError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of sections")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise SettingsError(f"{path}: section {section!r} must be a mapping")
        for name, value in values.items():
            _apply(cfg, f"{section}.{name}", value, str(path))


# Short spellings of the settings people type most: ``flag -> setting``. A flag for a true/false
# setting takes no value and sets it true; ``flag -> (setting, value)`` sets that value instead.
ALIASES = {
    "--model": "model.path",
    "--sft-data": "data.sft_data",
    "--rl-data": "data.rl_data",
    "--eval-data": "data.eval_data",
    "--out": "run.out",
    "--seed": "run.seed",
    "--resume": "run.resume",
    "--overwrite": "run.overwrite",
}


def _flags(root, aliases: dict) -> tuple[dict, dict]:
    """``aliases`` split into ``{setting: [flags taking a value]}`` and ``{flag: (setting, value)}``."""
    valued, const = {}, {}
    defaults = root()
    for flag, target in aliases.items():
        dotted, value = (target, None) if isinstance(target, str) else target
        section, _, name = dotted.partition(".")
        if isinstance(getattr(getattr(defaults, section), name), bool) and value is None:
            value = "true"
        if value is None:
            valued.setdefault(dotted, []).append(flag)
        else:
            const[flag] = (dotted, value)
    return valued, const


def build_parser(description: str, prog: str | None = None, *, root=Config, aliases: dict | None = None,
                 **parser_kw) -> argparse.ArgumentParser:
    """An argparse parser with one ``--section.name`` option per setting of the dataclass ``root``
    (help = meaning and default), its short spellings from ``aliases`` (default :data:`ALIASES`)."""
    valued, const = _flags(root, ALIASES if aliases is None else aliases)
    parser = argparse.ArgumentParser(prog=prog, description=description, **parser_kw)
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (overridden by the options below)")
    defaults = root()
    for section in dataclasses.fields(defaults):
        group = parser.add_argument_group(section.name)
        for f in dataclasses.fields(getattr(defaults, section.name)):
            dotted = f"{section.name}.{f.name}"
            default = getattr(getattr(defaults, section.name), f.name)
            text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")  # argparse %-formats help
            group.add_argument(*valued.get(dotted, []), f"--{dotted}", dest=dotted, default=argparse.SUPPRESS,
                               metavar=type(default).__name__.upper(),
                               help=argparse.SUPPRESS if f.metadata.get("hidden") else text)
            for flag, (target, value) in const.items():
                if target == dotted:
                    group.add_argument(flag, dest=dotted, action="store_const", const=value,
                                       default=argparse.SUPPRESS, help=f"same as --{dotted} {value}")
    return parser


def parse_config(argv=None, description: str = "dirl_min", prog: str | None = None, *, root=Config,
                 aliases: dict | None = None, base=None, **parser_kw):
    """Defaults (of ``root``, or a copy of ``base``), then ``--config`` YAML, then the options
    (each value's type is checked here; ranges and combinations by :mod:`dirl_min.settings.checks`).

    Every command parses with this: ``root`` is its dataclass of sections, ``aliases`` its
    short flags (:func:`build_parser`); ``parser_kw`` goes to ``argparse.ArgumentParser``."""
    parser = build_parser(description, prog, root=root, aliases=aliases, **parser_kw)
    args = vars(parser.parse_args(argv))
    cfg = copy.deepcopy(base) if base is not None else root()
    if config_file := args.pop("config", None):
        load_yaml(cfg, config_file)  # raises SettingsError (the file's errors)
    for dotted, value in args.items():
        try:
            _apply(cfg, dotted, value, "command line")
        except ValueError as e:
            parser.error(str(e))
    return cfg

