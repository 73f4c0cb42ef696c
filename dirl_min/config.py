"""One typed configuration for the whole pipeline: dataclasses, YAML files, dotted overrides.

``python -m dirl_min.train --help`` lists every setting below with its meaning and
default. Precedence: defaults < ``--config FILE.yaml`` < ``--section.name VALUE``.
The other commands' settings (:mod:`dirl_min.command_config`) are parsed by the same
:func:`parse_config`, each from its own dataclass of sections and table of short flags.

The block size and mask id are *not* settings here: they belong to the model
(``config.json``), the single source of truth. ``model.block_size`` only builds the
tiny model, or declares the block size of a plain (non-SDAR) checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dirl_min.rules import get_setting


class SettingsError(ValueError):
    """Invalid settings; the message names each setting, its value and what is allowed."""


def _f(default, help: str, *, hidden: bool = False):
    """A setting: its default and its meaning (shown by ``--help`` unless ``hidden``)."""
    meta = {"help": help, "hidden": hidden}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = _f("", "checkpoint folder (SDAR / DiRL / TraDo / Qwen3); empty = build the tiny model")
    block_size: int = _f(0, "block size: 0 = the checkpoint's own (the tiny model: 4); a value that conflicts with an SDAR checkpoint's is an error")
    mask_token_id: int = _f(-1, "mask id for a plain checkpoint without one (-1 = from the checkpoint/tokenizer)")
    hidden_size: int = _f(64, "tiny model: hidden size")
    num_layers: int = _f(2, "tiny model: layers")
    num_heads: int = _f(4, "tiny model: attention heads")
    num_kv_heads: int = _f(2, "tiny model: key/value heads")
    intermediate_size: int = _f(256, "tiny model: MLP width")
    dtype: str = _f("auto", "float32, bfloat16 or auto (bf16 on GPU, fp32 on CPU)")
    attn_implementation: str = _f("auto", "sdpa, flex_attention, eager or auto (flex on GPU, sdpa on CPU)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")


@dataclass
class DataConfig:
    sft_data: str = _f("", "SFT file (JSON/JSONL/parquet: prompt+response, or messages); empty = the embedded task")
    rl_data: str = _f("", "RL file (question + ground_truth_answer); empty = the embedded task's training split")
    eval_data: str = _f("", "evaluation file (question + ground_truth_answer); empty = the embedded held-out split")
    task_levels: list = _f([1, 2], "embedded task: 1 = a + b, 2 = a - b, 3 = 'Solve: If x + a = c'")
    task_max_operand: int = _f(30, "embedded task: operands run over 0..N (30: 1922 problems; see held_out)")
    held_out: int = _f(400, "embedded task: problems held out for evaluation (never trained on; whole operand families: a + b, b + a, a - b, b - a stay together). 400 makes the paired RL − SFT interval 2.0–2.9 points wide each side (measured on seeds 0–4: RL − SFT +2.9 to +6.4, each interval above zero, +4.9 [+3.1, +6.7] across seeds; the earlier 88 gave about ±5)")
    split_seed: int = _f(0, "seed of the embedded train/held-out split")
    prompt_template: str = _f("{question}", "user message; {question} is replaced (DiRL: '{question}\\nPlease reason step by step, and put your final answer within \\boxed{}.')")
    response_style: str = _f("answer", "embedded task SFT responses: answer = '\\boxed{7}'; worked = '3 + 4 = 7. \\boxed{7}' (longer, mostly predictable: room for faster decoding)")
    max_prompt_tokens: int = _f(1024, "prompts longer than this are skipped and counted")


@dataclass
class SFTConfig:
    steps: int = _f(4000, "optimizer steps (0 = skip SFT). On the default task (seed 0, 1 thread) 2200 steps gave SFT avg@16 14.9% and RL − SFT −2.6 to +3.2; 4000 gave 62.5% and +8.0")
    batch_size: int = _f(32, "examples per optimizer step (across processes and accumulation)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(3e-3, "peak learning rate")
    warmup_steps: int = _f(20, "linear warm-up steps")
    min_lr_ratio: float = _f(0.1, "cosine decay floor, as a fraction of lr")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    betas: list = _f([0.9, 0.98], "AdamW betas")
    grad_clip: float = _f(1.0, "gradient-norm clip (0 = off)")
    t_min: float = _f(0.1, "lowest noise level t; the spec draws t from (0, 1]. Kept at 0.1: on the default (seed 0, "
                                 "then operands 0..20, 2200 steps) t_min 0 gave SFT avg@16 27.3%, greedy 23.9%; t_min 0.1 gave 42.8%, 62.5% "
                                 "(the 1/p weights of small t make the gradient noisy)")
    eps: float = _f(1e-3, "mask probability floor: p = (1-eps) t + eps")
    max_seq_len: int = _f(2048, "examples longer than this (tokens) are skipped and counted")
    pack_tokens: int = _f(0, "pack several examples per row up to this many layout tokens (0 = one per row)")


@dataclass
class RLConfig:
    steps: int = _f(600, "DiPO steps (0 = skip RL)")
    prompts_per_step: int = _f(16, "groups (prompts) per step")
    group_size: int = _f(8, "responses per prompt (G)")
    lr: float = _f(3e-4, "learning rate")
    warmup_steps: int = _f(10, "linear warm-up steps, then a constant learning rate (DiRL: 10)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list = _f([0.9, 0.98], "AdamW betas")
    grad_clip: float = _f(1.0, "gradient-norm clip (0 = off)")
    eps_low: float = _f(0.2, "PPO clip: lower")
    eps_high: float = _f(0.28, "PPO clip: upper (DAPO clip-higher)")
    beta: float = _f(0.0, "weight of the k3 KL to a frozen reference model (0 = no reference)")
    num_iterations: int = _f(1, "optimisation passes per batch (>1 reuses logp_old)")
    micro_batch: int = _f(0, "responses per training forward (0 = all kept responses of a rollout at once)")
    sampling_rounds: int = _f(1, "dynamic sampling: at most this many rounds of prompts to fill the batch with mixed groups")
    group_filter: str = _f("reward_std", "dynamic sampling keeps groups whose rewards differ (reward_std, DiRL) or whose accuracy is neither all 0 nor all 1 (accuracy, DAPO); the same with accuracy-only rewards")
    rewards: dict = _f({"accuracy": 1.0}, "named rewards and weights: accuracy, speed, format, boxed, repetition, overlength")
    temperature: float = _f(1.0, "rollout temperature")
    top_k: int = _f(0, "rollout top-k (0 = off; DiRL: 50)")
    top_p: float = _f(1.0, "rollout top-p")
    max_new_tokens: int = _f(16, "rollout length limit (whole blocks)")
    reward_workers: int = _f(0, "processes for reward computation (0 = in-process)")
    objective: str = _f("dipo", "how the update reads each response's log-probabilities: dipo = every token in the context it was decoded in (DiRL); tracerl = rl.trace_shrinkage decoding steps merged per round (TraceRL); diffu_grpo = one forward, whole response masked, prompt masked at rl.prompt_mask_prob (d1); coupled_grpo = two complementary random masks of the response (DiffuCoder)")
    trace_shrinkage: int = _f(2, "tracerl: consecutive decoding steps merged into one training round (TraceRL's s; 1 = dipo exactly)")
    prompt_mask_prob: float = _f(0.15, "diffu_grpo: probability of masking each prompt token, drawn afresh for every pass (d1: 0.15)")
    rollout_backend: str = _f("native", "native = dirl_min's KV-cached decoder on the trained module; lmdeploy = LMDeploy's PyTorch engine (CUDA, lmdeploy 0.18; weights synced in memory each step)")


@dataclass
class Unmasking:
    """Which masked positions a denoising step commits (shared by every command that decodes)."""

    strategy: str = _f("low_confidence_dynamic", "low_confidence_dynamic, low_confidence_static or sequential")
    threshold: float = _f(0.9, "dynamic strategy confidence threshold")
    steps: int = _f(0, "static/sequential: denoising steps per block (0 = block size)")


@dataclass
class DecodeConfig(Unmasking):
    fused_commit: bool = _f(True, "write a finished block's K/V in the next block's first forward")


@dataclass
class Sampling:
    """How each problem is sampled for avg@k (shared by the main job's evaluation and dirl_min.eval)."""

    samples: int = _f(16, "samples per problem at temperature 1 (avg@k, pass@k; DiRL: 16)")
    temperature: float = _f(1.0, "sampling temperature for avg@k (0 = greedy)")
    top_k: int = _f(50, "top-k for avg@k (0 = off; DiRL: 50)")
    top_p: float = _f(1.0, "top-p for avg@k (1 = off)")


@dataclass
class EvalConfig(Sampling):
    greedy: bool = _f(True, "also report greedy accuracy")
    max_new_tokens: int = _f(16, "evaluation length limit (whole blocks); python -m dirl_min.eval and DiRL: 8192, "
                                 "here the embedded task's answers fit in 16 and an untrained model never stops")
    batch_size: int = _f(256, "sequences per decoding batch (memory and speed only)")
    max_problems: int = _f(0, "evaluate at most this many problems (0 = all)")


@dataclass
class RunConfig:
    out: str = _f("runs/default", "output folder: summary.json, metrics.jsonl, TensorBoard, plots, checkpoints")
    seed: int = _f(0, "global seed (model init, data order, noise, sampling)")
    threads: int = _f(0, "torch CPU threads (0 = torch's default)")
    save_every: int = _f(0, "checkpoint every N steps of each phase (0 = only at phase ends)")
    resume: bool = _f(False, "resume from the latest checkpoint in --run.out (the settings must match the saved run's)")
    overwrite: bool = _f(False, "replace an earlier run in --run.out (otherwise a fresh run there is refused)")
    log_every: int = _f(10, "write metrics every N steps")
    stages: list = _f(["sft", "rl"], "which stages to run, in order")


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


def _parse_value(text: str, current, name: str):
    """Parse a command-line value to the type of the setting's default."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"--{name}: expected true/false, got {text!r}")
    if isinstance(current, (list, dict)):
        if isinstance(current, list) and not text.lstrip().startswith("["):  # a comma list: 1,2 or sft,rl or off
            value = [_scalar(v.strip()) for v in text.split(",") if v.strip()]
        else:
            value = yaml.safe_load(text)
        if not isinstance(value, type(current)):
            raise SettingsError(f"--{name}: expected a {type(current).__name__} (YAML), got {text!r}")
        return value
    try:
        return type(current)(text)
    except ValueError:
        raise SettingsError(f"--{name}: expected {type(current).__name__}, got {text!r}") from None


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
        known = ", ".join(f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name)))
        raise SettingsError(f"{source}: unknown setting {dotted!r}; known settings: {known}")
    current = getattr(sub, name)
    if isinstance(value, str) and not isinstance(current, str):
        value = _parse_value(value, current, dotted)
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif not isinstance(value, type(current)) or isinstance(value, bool) != isinstance(current, bool):
        # bool is a subclass of int: without the second test YAML's `steps: true` would mean 1 step
        raise SettingsError(f"{source}: {dotted} must be {type(current).__name__}, got {value!r}")
    setattr(sub, name, value)


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
    (each value's type is checked here; ranges and combinations by :mod:`dirl_min.settings`).

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


def flat(cfg, aliases: dict) -> argparse.Namespace:
    """``cfg``'s settings under their short flags' names (``--top-k`` -> ``top_k``): the namespace
    that a command's parts read. A flag that sets a value (``--no-progress``) is true when the
    setting holds it."""
    valued, const = _flags(type(cfg), aliases)
    out = {}
    for dotted, flags in valued.items():
        out.update({f.lstrip("-").replace("-", "_"): get_setting(cfg, dotted) for f in flags})
    for flag, (dotted, value) in const.items():
        current = get_setting(cfg, dotted)
        out[flag.lstrip("-").replace("-", "_")] = current == _parse_value(value, current, dotted)
    return argparse.Namespace(**out)
