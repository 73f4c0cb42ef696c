"""Every setting of every command checked in one place, before any work.

A setting's own rule sits on its field, with its default and help (``_f(..., rule=...)`` in
:mod:`dirl_min.settings.config` and :mod:`dirl_min.settings.commands`); the tables here are built
from the fields (:func:`~dirl_min.settings.rules.rules_of`), so a new setting touches one file.
What stays here: the rules that relate several settings, and the settings against the launch.
:func:`problems` applies a table to any object and returns one message per broken rule, naming
the setting, the value and what is allowed.

* :data:`CONFIG_RULES` + :data:`CONFIG_CROSS_RULES`: ``python -m dirl_min.train``
  (:func:`validate`); :data:`LAUNCH_RULES`: its settings against the launch (processes,
  Accelerate backend) and the machine, once Accelerate has started (:func:`check_launch`).
* :data:`EVAL_RULES` / :data:`CHECK_RULES` / ... (with their cross rules): the settings of
  ``python -m dirl_min.eval``, ``check`` and ``bench`` (:mod:`dirl_min.settings.commands`),
  checked by :func:`command_problems`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dirl_min.settings.commands import BenchCommand, CheckCommand, EvalCommand, ShapeCommand
from dirl_min.settings.config import Config, SettingsError
from dirl_min.settings.rules import Rule, command_problems, problems, rules_of

__all__ = ["SettingsError", "Rule", "problems", "validate", "CONFIG_RULES", "CONFIG_CROSS_RULES", "Launch",
           "launch_of", "check_launch", "LAUNCH_RULES", "EVAL_RULES", "EVAL_CROSS_RULES", "CHECK_RULES",
           "CHECK_CROSS_RULES", "BENCH_RULES", "SHAPE_RULES", "command_problems"]


#: every setting of ``python -m dirl_min.train`` that has a rule (on its field)
CONFIG_RULES: list[Rule] = rules_of(Config)


def _embedded_split(cfg):
    """Messages for ``data.held_out`` against the embedded task it splits (when that task is used)."""
    from dirl_min import data

    d = cfg.data
    if d.sft_data and d.rl_data and d.eval_data:
        return []  # the embedded task is not used
    problems = data.arithmetic_problems(d.task_max_operand, tuple(d.task_levels))
    train, test = data.split_problems(problems, d.held_out, d.split_seed)
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
    """Check every setting of a :class:`~dirl_min.settings.config.Config` (and that the files it names exist).

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
    from dirl_min.engine.lmdeploy_engine import lmdeploy_missing

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


# ---- the other commands' settings (dirl_min.settings.commands; messages name their short flags) ----

EVAL_RULES: list[Rule] = rules_of(EvalCommand)


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

CHECK_RULES: list[Rule] = rules_of(CheckCommand)


def _check_cross(cfg) -> list[str]:
    if cfg.check.lmdeploy and not cfg.model.path:
        return ["--lmdeploy needs --model: a checkpoint folder LMDeploy can load"]
    return []


CHECK_CROSS_RULES: list[Callable] = [_check_cross]



BENCH_RULES: list[Rule] = rules_of(BenchCommand)
SHAPE_RULES: list[Rule] = rules_of(ShapeCommand)
