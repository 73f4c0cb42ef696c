"""Every setting of every command checked in one place, before any work.

A rule is a row of a table: the setting, a test of its value, and what is allowed, in
words (:mod:`dirl_min.rules`). :func:`problems` applies a table to any object (a :class:`~dirl_min.config.Config`,
a command's settings) and returns one message per broken rule, naming the setting,
the value and what is allowed. To check a new setting, add a row.

* :data:`CONFIG_RULES` + :data:`CONFIG_CROSS_RULES`: ``python -m dirl_min.train``
  (:func:`validate`); :data:`LAUNCH_RULES`: its settings against the launch (processes,
  Accelerate backend) and the machine, once Accelerate has started (:func:`check_launch`).
* :data:`EVAL_RULES` / :data:`CHECK_RULES` / ... (with their cross rules): the settings of
  ``python -m dirl_min.eval``, ``check`` and ``bench`` (:mod:`dirl_min.command_config`),
  checked by :func:`command_problems`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dirl_min.config import SettingsError
from dirl_min.rules import Rule, at_least, is_int, is_number, number, one_of, problems
from dirl_min.core.objectives import GROUP_FILTERS, LOSS_MEANS
from dirl_min.core.estimates import RECORDS
from dirl_min.decoding import STRATEGIES
from dirl_min.tasks import RESPONSE_STYLES

__all__ = ["SettingsError", "Rule", "problems", "validate", "CONFIG_RULES", "CONFIG_CROSS_RULES", "Launch",
           "launch_of", "check_launch", "LAUNCH_RULES", "EVAL_RULES", "EVAL_CROSS_RULES", "CHECK_RULES",
           "CHECK_CROSS_RULES", "BENCH_RULES", "SHAPE_RULES", "command_problems"]


def _betas(name: str) -> Rule:
    return Rule(name, lambda v: isinstance(v, list) and len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v),
                "two numbers in [0, 1), e.g. [0.9, 0.98]")


def _template(name: str, *, optional=False) -> Rule:
    return Rule(name, lambda v: (optional and v == "") or (isinstance(v, str) and "{question}" in v),
                "a text containing {question} (where the question goes)" + (" or '' (the default)" if optional else ""))


_DTYPE = ("auto", "float32", "bfloat16", "float16")


def _levels(name: str) -> Rule:
    return Rule(name, lambda v: isinstance(v, list) and bool(v) and all(is_int(x) and x in (1, 2, 3) for x in v)
                and len(set(v)) == len(v), "a non-empty list of distinct levels from 1, 2, 3")


def _rewards(v) -> bool:
    from dirl_min.rewards import REWARDS

    return isinstance(v, dict) and bool(v) and all(k in REWARDS and is_number(w) for k, w in v.items())


def _reward_words() -> str:
    from dirl_min.rewards import REWARDS

    return "a mapping of reward names to numeric weights; names: " + ", ".join(sorted(REWARDS))


CONFIG_RULES: list[Rule] = [
    at_least("model.block_size", 0, "0 = the checkpoint's own"),
    at_least("model.mask_token_id", -1, "-1 = from the checkpoint"),
    at_least("model.hidden_size", 1), at_least("model.num_layers", 1), at_least("model.num_heads", 1),
    at_least("model.num_kv_heads", 1), at_least("model.intermediate_size", 1),
    one_of("model.dtype", *_DTYPE),
    one_of("model.attn_implementation", "auto", "sdpa", "flex_attention", "eager"),
    _levels("data.task_levels"),
    at_least("data.task_max_operand", 0),
    at_least("data.held_out", 1, "the embedded task's evaluation problems"),
    _template("data.prompt_template"),
    at_least("data.max_prompt_tokens", 1),
    at_least("sft.steps", 0, "0 = skip SFT"),
    at_least("sft.batch_size", 1),
    at_least("sft.grad_accum", 1, "micro-batches per optimizer step"),
    number("sft.lr", 0, lo_open=True),
    at_least("sft.warmup_steps", 0),
    number("sft.min_lr_ratio", 0, 1),
    number("sft.weight_decay", 0),
    _betas("sft.betas"),
    number("sft.grad_clip", 0, why="0 = off"),
    number("sft.t_min", 0, 1, hi_open=True),
    number("sft.eps", 0, 1, lo_open=True, hi_open=True),
    at_least("sft.max_seq_len", 1),
    at_least("sft.pack_tokens", 0, "0 = one example per row"),
    at_least("rl.steps", 0, "0 = skip RL"),
    at_least("rl.prompts_per_step", 1),
    at_least("rl.group_size", 2, "DiPO compares responses within a group: a group of one has zero advantage "
              "and never updates the model"),
    number("rl.lr", 0, lo_open=True),
    at_least("rl.warmup_steps", 0, "0 = constant from the first step"),
    number("rl.weight_decay", 0),
    _betas("rl.betas"),
    number("rl.grad_clip", 0, why="0 = off"),
    number("rl.eps_low", 0, 1, hi_open=True),
    number("rl.eps_high", 0),
    number("rl.beta", 0, why="0 = no reference model"),
    at_least("rl.num_iterations", 1),
    at_least("rl.micro_batch", 0, "0 = all kept responses at once"),
    at_least("rl.sampling_rounds", 1),
    Rule("rl.rewards", _rewards, _reward_words),
    number("rl.temperature", 0, lo_open=True, why="a group sampled at temperature 0 is one response repeated"),
    at_least("rl.top_k", 0, "0 = off"),
    number("rl.top_p", 0, 1, lo_open=True),
    at_least("rl.max_new_tokens", 1),
    at_least("rl.reward_workers", 0),
    one_of("rl.rollout_backend", "native", "lmdeploy"),
    one_of("rl.group_filter", *GROUP_FILTERS),
    one_of("rl.objective", *RECORDS),
    *(at_least(p.setting, int(p.lo), p.why) if p.integer else number(p.setting, p.lo, p.hi, hi_open=True, why=p.why)
      for o in RECORDS.values() for p in o.params),  # each objective's parameters, as its record declares them
    one_of("rl.loss_mean", *LOSS_MEANS),
    Rule("rl.scale_advantages", lambda v: isinstance(v, bool), "true or false"),
    one_of("rl.kl_reference", "initial", "old"),
    at_least("rl.ref_sync_every", 0, "0 = never"),
    at_least("rl.updates_per_pass", 1),
    one_of("data.response_style", *RESPONSE_STYLES),
    one_of("decode.strategy", *STRATEGIES),
    number("decode.threshold", 0, 1),
    at_least("decode.steps", 0, "0 = block size"),
    at_least("eval.samples", 1),
    number("eval.temperature", 0),
    at_least("eval.top_k", 0, "0 = off"),
    number("eval.top_p", 0, 1, lo_open=True),
    at_least("eval.max_new_tokens", 1),
    at_least("eval.batch_size", 1),
    at_least("eval.max_problems", 0, "0 = all"),
    Rule("run.out", lambda v: isinstance(v, str) and bool(v.strip()), "a folder name"),
    at_least("run.seed", 0),
    at_least("run.threads", 0, "0 = torch's default"),
    at_least("run.save_every", 0, "0 = only at stage ends"),
    at_least("run.log_every", 1),
    Rule("run.stages", lambda v: isinstance(v, list) and all(s in ("sft", "rl") for s in v) and len(set(v)) == len(v),
         "a list of distinct stages from sft, rl"),
]


def _embedded_split(cfg):
    """Messages for ``data.held_out`` against the embedded task it splits (when that task is used)."""
    from dirl_min import tasks

    d = cfg.data
    if d.sft_data and d.rl_data and d.eval_data:
        return []  # the embedded task is not used
    problems = tasks.arithmetic_problems(d.task_max_operand, tuple(d.task_levels))
    train, test = tasks.split_problems(problems, d.held_out, d.split_seed)
    task = f"the embedded task (levels {d.task_levels}, operands 0..{d.task_max_operand}) has {len(problems)} problems"
    if not train:
        return [f"data.held_out = {d.held_out}: must be less than the number of problems; {task}"]
    if not test:
        return [f"data.held_out = {d.held_out}: no whole family of problems fits (a + b, b + a, a - b, b - a are "
                f"held out together); use a larger value; {task}"]
    return []


def _tiny_heads(cfg):
    m = cfg.model
    if not cfg.model.path and m.num_heads % m.num_kv_heads:
        return [f"model.num_kv_heads = {m.num_kv_heads}: must divide model.num_heads = {m.num_heads}"]
    return []


def _accumulation(cfg):
    if cfg.sft.grad_accum > cfg.sft.batch_size:
        return [f"sft.grad_accum = {cfg.sft.grad_accum}: must be at most sft.batch_size = {cfg.sft.batch_size} "
                "(every micro-batch needs an example)"]
    return []


def _lmdeploy_needs_a_checkpoint(cfg):
    if cfg.rl.rollout_backend == "lmdeploy" and not cfg.model.path and "rl" in cfg.run.stages and cfg.rl.steps:
        return ["rl.rollout_backend = 'lmdeploy': needs model.path, a checkpoint folder LMDeploy can load"]
    return []


def _paths(cfg):
    out = []
    if cfg.model.path and not Path(cfg.model.path).is_dir():
        out.append(f"model.path = {cfg.model.path!r}: expected a checkpoint folder; "
                   + ("it is a file" if Path(cfg.model.path).exists() else "no such folder"))
    for name in ("sft_data", "rl_data", "eval_data"):
        p = getattr(cfg.data, name)
        if p and not Path(p).is_file():
            what = "it is a folder" if Path(p).is_dir() else "no such file"
            out.append(f"data.{name} = {p!r}: expected a JSON, JSONL or parquet file; {what}")
    return out


#: checks across settings (and of the files named): ``cfg -> list of messages``
CONFIG_CROSS_RULES: list[Callable] = [_tiny_heads, _accumulation, _lmdeploy_needs_a_checkpoint, _paths, _embedded_split]


def validate(cfg) -> None:
    """Check every setting of a :class:`~dirl_min.config.Config` (and that the files it names exist).

    Raises:
        SettingsError: listing every invalid setting, its value and what is allowed.
    """
    msgs = problems(cfg, CONFIG_RULES)
    if not msgs:  # cross checks assume each setting is valid on its own
        for cross in CONFIG_CROSS_RULES:
            msgs += cross(cfg)
    if msgs:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(msgs))


@dataclass(frozen=True)
class Launch:
    """What the launch provides, known once Accelerate has started (:func:`launch_of`).

    ``world``: processes; ``backend``: Accelerate's distributed type by name (``NO``, ``MULTI_GPU``,
    ``DEEPSPEED``, ``FSDP``, …); ``zero_stage`` / ``fsdp_version``: DeepSpeed's / FSDP's, 0 elsewhere.
    """

    world: int = 1
    backend: str = "NO"
    zero_stage: int = 0
    fsdp_version: int = 0


def launch_of(accel) -> Launch:
    """The :class:`Launch` of an ``accelerate.Accelerator`` (its state's plugins)."""
    kind = accel.distributed_type.name
    zero = getattr(getattr(accel.state, "deepspeed_plugin", None), "zero_stage", 0) if kind == "DEEPSPEED" else 0
    fsdp = getattr(accel.state.fsdp_plugin, "fsdp_version", 1) if kind == "FSDP" else 0
    return Launch(world=accel.num_processes, backend=kind, zero_stage=zero or 0, fsdp_version=fsdp)


def _per_process_shares(cfg, launch: Launch):
    """Every process runs ``sft.grad_accum`` non-empty micro-batches of its share of the batch, and
    decodes at least one prompt per sampling round."""
    out, world = [], launch.world
    if "sft" in cfg.run.stages and cfg.sft.steps and cfg.sft.grad_accum > cfg.sft.batch_size // world:
        out.append(f"sft.grad_accum = {cfg.sft.grad_accum}: expected at most the {cfg.sft.batch_size // world} "
                   f"examples each of the {world} process(es) gets per step (sft.batch_size = {cfg.sft.batch_size})")
    if "rl" in cfg.run.stages and cfg.rl.steps and cfg.rl.prompts_per_step < world:
        out.append(f"rl.prompts_per_step = {cfg.rl.prompts_per_step}: expected at least one prompt for each of the "
                   f"{world} processes")
    return out


def _zero3(cfg, launch: Launch):
    if launch.backend == "DEEPSPEED" and launch.zero_stage == 3:
        return ["DeepSpeed ZeRO-3 is refused: rollouts and evaluation decode with a different number of "
                "forwards per rank, and ZeRO-3's per-forward parameter gathers would hang; dirl_min's gather-once "
                "path is written and tested for FSDP2 only (DeepSpeed cannot run on CPU). Use "
                "configs/accelerate/fsdp2-8gpu.yaml (sharded) or zero2-8gpu.yaml."]
    return []


def _fsdp(cfg, launch: Launch):
    """FSDP1 is refused; under FSDP2, the combinations known to be wrong or never run."""
    if launch.backend != "FSDP":
        return []
    if launch.fsdp_version != 2:
        return ["FSDP version 1 is refused: dirl_min supports FSDP2 (fsdp_version: 2), see "
                "configs/accelerate/fsdp2-8gpu.yaml"]
    out = []
    stages = [s for s in cfg.run.stages if getattr(cfg, s).steps > 0]
    if len(stages) > 1:
        out.append(f"FSDP2: run.stages {stages}: each stage wraps the model anew, and FSDP2 refuses a second root "
                   "over units the first one initialised; run SFT and DiPO as two jobs (the second with "
                   "--model.path <sft checkpoint>/model)")
    if cfg.run.resume:
        out.append("FSDP2: run.resume: the checkpoint holds rank 0's optimizer shard only")
    if cfg.rl.rollout_backend != "native" and "rl" in stages:
        out.append("FSDP2: rl.rollout_backend lmdeploy: the weight sync reads local shards")
    if cfg.rl.beta > 0 and "rl" in stages:
        out.append("FSDP2: rl.beta > 0: the reference model would be a copy of sharded units (never run)")
    return out


def _lmdeploy_here(cfg, launch: Launch):
    """LMDeploy rollouts need the package (a version the step hook knows) and a CUDA GPU on this machine."""
    if cfg.rl.rollout_backend != "lmdeploy" or "rl" not in cfg.run.stages or not cfg.rl.steps:
        return []
    from dirl_min.lmdeploy_engine import lmdeploy_missing

    why = lmdeploy_missing()
    return [f"rl.rollout_backend = 'lmdeploy': {why}; or use rl.rollout_backend: native"] if why else []


#: checks of the settings against the launch (processes, Accelerate backend) and the machine:
#: ``(cfg, launch) -> list of messages``
LAUNCH_RULES: list[Callable] = [_per_process_shares, _zero3, _fsdp, _lmdeploy_here]


def check_launch(cfg, launch: Launch) -> None:
    """The settings against what the launch provides (:data:`LAUNCH_RULES`), once Accelerate has
    started and before the model is built; ``cfg`` passed :func:`validate`.

    Raises:
        SettingsError: listing every setting this launch cannot run, and why.
    """
    msgs = [m for rule in LAUNCH_RULES for m in rule(cfg, launch)]
    if msgs:
        raise SettingsError("invalid settings for this launch:\n  " + "\n  ".join(msgs))


# ---- the other commands' settings (dirl_min.command_config; messages name their short flags) ----

EVAL_RULES: list[Rule] = [
    one_of("model.dtype", *_DTYPE), one_of("model.backend", "native", "lmdeploy"),
    one_of("data.task", "", "embedded"), _levels("data.task_levels"),
    at_least("data.held_out", 1), at_least("data.task_max_operand", 0), at_least("data.limit", 0, "0 = all"),
    _template("data.prompt_template", optional=True),
    at_least("eval.samples", 1), number("eval.temperature", 0, why="0 = greedy"), at_least("eval.top_k", 0, "0 = off"),
    number("eval.top_p", 0, 1, lo_open=True), at_least("eval.max_new_tokens", 1), at_least("eval.batch_size", 1),
    at_least("eval.seed", 0),
    one_of("decode.strategy", *STRATEGIES), number("decode.threshold", 0, 1), at_least("decode.steps", 0, "0 = block size"),
    Rule("decode.thresholds", lambda v: isinstance(v, list) and all(is_number(t) and 0 <= t <= 1 for t in v)
         and len(set(v)) == len(v), "distinct numbers in [0, 1]"),
    number("verify.timeout", 0, lo_open=True), at_least("verify.workers", 0),
    Rule("run.out", lambda v: isinstance(v, str) and bool(v.strip()), "a folder name"),
]


def _eval_cross(cfg) -> list[str]:
    out = []
    if cfg.decode.thresholds and cfg.decode.strategy != "low_confidence_dynamic":
        out.append("--thresholds sweeps the dynamic strategy's threshold; use --strategy low_confidence_dynamic")
    if cfg.data.hub and cfg.data.data_dir:
        out.append("--hub and --data-dir exclude each other")
    if cfg.model.backend == "lmdeploy":  # one engine decodes with one rule, from a folder it can load
        if cfg.decode.thresholds and len(cfg.decode.thresholds) > 1:
            out.append("--backend lmdeploy takes one --thresholds value per run")
        if not cfg.model.path or cfg.model.path == "tiny":
            out.append("--backend lmdeploy needs --model: a checkpoint folder LMDeploy can load")
    return out


EVAL_CROSS_RULES: list[Callable] = [_eval_cross]

CHECK_RULES: list[Rule] = [
    one_of("model.dtype", *_DTYPE),
    Rule("model.path", lambda v: not v or Path(v).is_dir(), "a checkpoint folder (empty = the tiny model)"),
    at_least("rollout.max_new_tokens", 1), number("rollout.temperature", 0, why="0 = greedy"),
    number("rollout.threshold", 0, 1), at_least("rollout.seed", 0),
    number("check.tolerance", 0, why="0 = the dtype's default"),
]


def _check_cross(cfg) -> list[str]:
    if cfg.check.lmdeploy and not cfg.model.path:
        return ["--lmdeploy needs --model: a checkpoint folder LMDeploy can load"]
    return []


CHECK_CROSS_RULES: list[Callable] = [_check_cross]



def _names_from(name: str, choices: Callable[[], tuple], what: str) -> Rule:
    """A non-empty list of distinct names from ``choices()`` (a callable: the names need an import)."""
    return Rule(name, lambda v: isinstance(v, list) and bool(v) and len(set(v)) == len(v)
                and all(x in choices() for x in v), lambda: f"a non-empty list of distinct {what} from "
                + ", ".join(choices()))


def _sizes():
    from dirl_min.benchmarking.measures import SIZES

    return tuple(SIZES)


def _shapes():
    from dirl_min.bench_shape import SHAPES

    return tuple(SHAPES)


BENCH_RULES: list[Rule] = [
    _names_from("model.sizes", _sizes, "sizes"), at_least("model.block_size", 1),
    number("model.sharpen", 0, lo_open=True), at_least("model.seed", 0),
    at_least("decode.new_tokens", 1), at_least("decode.batch", 1), number("decode.threshold", 0, 1),
    number("decode.temperature", 0, why="0 = greedy"), at_least("decode.top_k", 0, "0 = off"),
    number("reference.max_seconds", 0, lo_open=True), at_least("reference.tokens", 0, "0 = auto"),
    at_least("rescore.batch", 0, "0 skips the row"), at_least("rescore.new_tokens", 1),
    at_least("run.repeats", 1), at_least("run.threads", 0, "0 = torch's default"), one_of("run.clock", "wall", "cpu"),
]

SHAPE_RULES: list[Rule] = [
    Rule("model.shape", lambda v: v in _shapes(), lambda: "one of " + ", ".join(_shapes())),
    at_least("model.layers", 0, "0 = all"), one_of("model.dtype", "float32", "bfloat16"),
    one_of("model.attn", "sdpa", "flex_attention"),
    Rule("model.device", lambda v: isinstance(v, str) and v.split(":")[0] in ("cpu", "cuda"), "cpu or cuda"),
    at_least("step.responses", 1),
    Rule("step.response_tokens", lambda v: is_int(v) and v > 0 and v % 4 == 0, "a positive multiple of 4 (the block size)"),
    _names_from("step.stages", lambda: ("sft", "dipo", "rollout"), "stages"),
    _names_from("step.checkpointing", lambda: ("on", "off"), "settings"),
    number("step.peak_tflops", 0, lo_open=True), at_least("run.threads", 0, "0 = torch's default"),
]

def command_problems(cfg, rules: list[Rule], cross_rules=(), aliases: dict | None = None) -> list[str]:
    """Every broken rule of a command's settings ``cfg``, named by the command's short flag where
    it has one (``aliases``: flag -> setting, as :func:`dirl_min.config.parse_config` takes)."""
    names = {target: flag for flag, target in (aliases or {}).items() if isinstance(target, str)}
    msgs = problems(cfg, rules, names=names)
    for cross in cross_rules:
        msgs += cross(cfg)
    return msgs
