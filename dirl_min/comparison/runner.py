"""The runs of ``python -m dirl_min.compare``: one SFT checkpoint, one RL run per objective and
seed from it, and the evaluation of every checkpoint on the held-out split.

Layout under ``--out``: ``sft/`` (the SFT run), ``<objective>/seed-<s>/`` (an RL run, checkpoints
every ``rl.steps // 4`` steps), and in each run folder ``eval/<checkpoint>/{sampled,greedy}/``
(``python -m dirl_min.eval`` folders). Before any work every run folder is classified against the
settings it would be run with (:func:`plan_actions`): equal and finished runs are reused, equal and
unfinished ones resumed, and a run whose settings differ, or whose start checkpoint is retrained,
is replaced only with ``overwrite`` (else :class:`CompareError` lists them all). The training
function and the evaluation option parser are handed in (:class:`Tools`) so this module stays
below the faces (``dirl_min.train``, ``dirl_min.eval``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dirl_min.settings.commands import EvalCommand
from dirl_min.settings.config import Config, EvalConfig, SettingsError, parse_config
from dirl_min.core.estimates import OBJECTIVES, RECORDS  # the compared rl.objective values, in the table's order
from dirl_min.evaluation.benchmarks import load_benchmarks
from dirl_min.evaluation.responses import load_eval_model
from dirl_min.infra.errors import DirlError, EvalError
from dirl_min.comparison.summary import step_copies
from dirl_min.evaluation.run import SAMPLES_FILE, finalize, prepare, read_records, remove_outputs, run_shard
from dirl_min.settings.runs import OUTPUTS, config_differences
from dirl_min.settings.checks import validate

__all__ = ["OBJECTIVES", "RECORDS", "RECIPES", "recipe_argv", "TIME_FIELDS", "RUN_EVAL", "CompareError", "Tools", "Run", "plan_runs", "plan_actions",
           "execute", "checkpoints_of", "eval_argv", "evaluate_checkpoint", "rl_rows", "curve"]

#: the per-step seconds of an RL row whose sum is a step's training time
TIME_FIELDS = ("time_rollout", "time_rewards", "time_scoring", "time_update")
#: the runs' own evaluations (base and end of stage) are cut to one sample of one problem, with
#: every eval.* setting fixed: the comparison evaluates each checkpoint itself with the given eval.*
#: settings on one seed, and a change of them must not make a finished run differ
RUN_EVAL = [x for k, v in {**dataclasses.asdict(EvalConfig()), "samples": 1, "max_problems": 1, "greedy": False}.items()
            for x in (f"--eval.{k}", str(v).lower() if isinstance(v, bool) else str(v))]
#: settings the comparison sets per run (given ones would be silently replaced); run.keep_checkpoints stays 0:
#: every checkpoint is evaluated
RESERVED = ("run.out", "run.seed", "run.stages", "run.resume", "run.overwrite", "run.save_every", "run.log_every",
            "run.keep_checkpoints", "rl.objective")


#: ``--recipe``: shared = one set of optimisation settings for every objective (isolates the
#: likelihood estimate); release = each objective with its release's clip, KL and its reference,
#: advantage scaling, loss mean, group filter and passes (its record's ``release``; docs/method.md §4.7)
RECIPES = ("shared", "release")


def recipe_argv(objective: str, recipe: str) -> list[str]:
    """The settings ``recipe`` gives ``objective``'s runs, before the given ones (which override them)."""
    if recipe == "shared":
        return []
    return [x for k, v in RECORDS[objective].release.items()
            for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


class CompareError(DirlError, ValueError):
    """Settings or an output folder the comparison cannot use; the message says which and why."""


@dataclass(frozen=True)
class Tools:
    """The faces' functions: ``train(argv) -> summary`` (dirl_min.train.main) and
    ``eval_config(argv) -> EvalCommand`` (dirl_min.eval.parse_config)."""

    train: Callable[[list[str]], dict]
    eval_config: Callable[[list[str]], EvalCommand]


@dataclass(frozen=True)
class Run:
    """One training run: ``name`` ("sft" or "<objective>/seed-<s>"), its folder, its settings
    (``argv`` without run.out / resume / overwrite) and the run whose final checkpoint it starts from."""

    name: str
    folder: Path
    argv: tuple[str, ...]
    parent: str | None = None
    objective: str | None = None
    seed: int | None = None

    def config(self) -> dict:
        return parse_config([*self.argv, "--run.out", str(self.folder)]).to_dict()


def check_settings(settings: list[str]) -> Config:
    """The composed settings (``--section.name VALUE`` list), checked as the main job checks them;
    refuses those the comparison sets itself (:class:`CompareError`)."""
    given = {t.split("=", 1)[0].lstrip("-") for t in settings if t.startswith("--")}
    aliases = {"out": "run.out", "seed": "run.seed", "resume": "run.resume"}
    bad = sorted(aliases.get(g, g) for g in given if aliases.get(g, g) in RESERVED)
    if bad:
        raise CompareError(f"{', '.join(bad)}: set by the comparison for each run (use --out, --seeds, "
                           "--objectives; checkpoints every rl.steps // 4 steps); remove them")
    cfg = parse_config(list(settings), prog="python -m dirl_min.compare")
    try:
        validate(cfg)
    except SettingsError as e:
        raise CompareError(str(e)) from None
    if cfg.sft.steps < 1 or cfg.rl.steps < 1:
        raise CompareError(f"sft.steps = {cfg.sft.steps}, rl.steps = {cfg.rl.steps}: the comparison trains both "
                           "stages; expected at least 1 step each")
    return cfg


def plan_runs(out: Path, settings: list[str], objectives: list[str], seeds: list[int], cfg: Config,
              recipe: str = "shared") -> list[Run]:
    """The SFT run, then one RL run per (objective, seed), in that order; each RL run gets
    :func:`recipe_argv` before the given settings (checked here: :class:`CompareError`)."""
    for o in objectives:
        check_settings([*recipe_argv(o, recipe), *settings])
    sft = Run("sft", out / "sft", (*settings, "--run.stages", "[sft]", *RUN_EVAL))
    start = str(out / "sft" / "checkpoints" / "sft-final")
    every = max(1, cfg.rl.steps // 4)
    rl = [Run(f"{o}/seed-{s}", out / o / f"seed-{s}",
              (*recipe_argv(o, recipe), *settings, "--run.stages", "[rl]", "--rl.objective", o, "--run.seed", str(s), "--model.path", start,
               "--run.save_every", str(every), "--run.log_every", "1", *RUN_EVAL), "sft", o, s)
          for o in objectives for s in seeds]
    return [sft, *rl]


def _state(run: Run) -> tuple[str, list[str]]:
    """``absent``, ``finished``, ``partial`` (equal settings, no summary yet) or ``different`` (+ the differences)."""
    saved = run.folder / "config.json"
    if not saved.is_file():
        found = [n for n in OUTPUTS if (run.folder / n).exists()]
        return ("different", [f"holds {', '.join(found)} but no config.json"]) if found else ("absent", [])
    diffs = config_differences(json.loads(saved.read_text()), run.config())
    if diffs:
        return "different", diffs
    return ("finished" if (run.folder / "summary.json").is_file() else "partial"), []


def plan_actions(runs: list[Run], overwrite: bool) -> dict[str, str]:
    """Per run name: ``reuse``, ``resume``, ``train`` (nothing there) or ``replace``; reads only.

    A run is reused or resumed only when its settings equal the saved ones and the run it starts
    from is reused (a retrained SFT checkpoint makes every RL run stale).

    Raises:
        CompareError: runs to replace without ``overwrite`` (each named with its reason).
    """
    actions, refused = {}, []
    for run in runs:
        state, why = _state(run)
        parent_kept = run.parent is None or actions[run.parent] == "reuse"
        if state == "absent":
            actions[run.name] = "train"
        elif state == "different" or not parent_kept:
            actions[run.name] = "replace"
            why = why or [f"starts from {run.parent}, which is trained again"]
            refused.append(f"{run.folder}:\n    " + "\n    ".join(why))
        else:
            actions[run.name] = "reuse" if state == "finished" else "resume"
    if refused and not overwrite:
        raise CompareError("these runs were made with other settings (saved -> given):\n  " + "\n  ".join(refused)
                           + "\nuse the same settings, another --out, or --overwrite to replace them")
    return actions


def execute(run: Run, action: str, train: Callable[[list[str]], dict]) -> None:
    """Train, resume or replace ``run`` (its evaluations go too: they belong to the old weights)."""
    print(f"compare: {run.name}: {action} -> {run.folder}", file=sys.stderr)
    if action == "reuse":
        return
    if action in ("train", "replace"):
        shutil.rmtree(run.folder / "eval", ignore_errors=True)
    flag = {"train": [], "resume": ["--run.resume", "true"], "replace": ["--run.overwrite", "true"]}[action]
    with contextlib.redirect_stdout(sys.stderr):  # the run's table would interleave with ours
        train([*run.argv, "--run.out", str(run.folder), *flag])


def checkpoints_of(run: Run, cfg: Config) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the checkpoints to evaluate, by step: ``sft-final`` (step 0) for the
    SFT run; every ``rl-NNNNNN`` and ``rl-final`` (step ``rl.steps``) for an RL run."""
    ck = run.folder / "checkpoints"
    if run.parent is None:
        return [(0, ck / "sft-final")]
    found = [(int(p.name[3:]), p) for p in ck.glob("rl-[0-9]*") if p.name[3:].isdigit()]
    return sorted(found) + [(cfg.rl.steps, ck / "rl-final")]


def eval_argv(cfg: Config, model: Path, out: Path, *, greedy: bool, seed: int) -> list[str]:
    """``python -m dirl_min.eval`` options that evaluate ``model`` as the main job does (cfg.eval,
    cfg.decode, the held-out split of cfg.data); ``greedy``: one sample at temperature 0."""
    e, d = cfg.eval, cfg.decode
    argv = ["--model", str(model), "--out", str(out), "--dtype", cfg.model.dtype,
            "--samples", str(1 if greedy else e.samples), "--temperature", str(0.0 if greedy else e.temperature),
            "--top-k", str(e.top_k), "--top-p", str(e.top_p), "--strategy", d.strategy, "--threshold", str(d.threshold),
            "--steps", str(d.steps), "--max-new-tokens", str(e.max_new_tokens), "--batch-size", str(e.batch_size),
            "--limit", str(e.max_problems), "--seed", str(seed), "--prompt-template", cfg.data.prompt_template,
            "--no-progress"]
    if cfg.data.eval_data:
        return [*argv, "--benchmarks", cfg.data.eval_data]
    return [*argv, "--task", "embedded", "--task-levels", ",".join(map(str, cfg.data.task_levels)),
            "--task-max-operand", str(cfg.data.task_max_operand), "--held-out", str(cfg.data.held_out),
            "--split-seed", str(cfg.data.split_seed)]


def _per_problem(out: Path, run: dict) -> list[float]:
    """Accuracy of each problem (float ``[problems]``) from the samples of one evaluated run."""
    recs = [r for r in read_records(out / SAMPLES_FILE)
            if r["benchmark"] == run["benchmark"] and float(r["threshold"]) == float(run["threshold"])]
    correct = [[] for _ in range(run["problems"])]
    for r in recs:
        correct[int(r["problem"])].append(float(r["correct"]))
    return [sum(c) / len(c) for c in correct]


def evaluate_checkpoint(ckpt: Path, folder: Path, cfg: Config, tools: Tools, *, seed: int, overwrite: bool) -> dict:
    """avg@k (sampled) and greedy evaluations of ``ckpt`` in ``folder/{sampled,greedy}``, resumed when
    there; the model is loaded once. Returns ``{"sampled": run, "greedy": run | None,
    "per_problem": [problems]}`` (``run``: an entry of results.json's ``runs``).

    Raises:
        EvalError: a folder holds samples of other settings or weights (without ``overwrite``).
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tok = identity = None
    out = {"greedy": None}
    for kind in ("sampled", "greedy") if cfg.eval.greedy else ("sampled",):
        ev = tools.eval_config(eval_argv(cfg, ckpt, folder / kind, greedy=kind == "greedy", seed=seed))
        if model is None:
            model, tok, identity = load_eval_model(str(ckpt), dtype=ev.model.dtype, device=device)
        benches = load_benchmarks(ev)
        try:
            run = prepare(ev, model, tok, identity, benches)
        except EvalError:
            if not overwrite:
                raise
            remove_outputs(Path(ev.run.out))
            run = prepare(ev, model, tok, identity, benches)
        run_shard(run, model, tok, progress=False)
        out[kind] = finalize(run, plot=False)["runs"][0]
        if kind == "sampled":
            out["per_problem"] = _per_problem(Path(ev.run.out), out[kind])
    return out


def rl_rows(folder: Path) -> list[dict]:
    """The RL rows of a run's metrics.jsonl, by step."""
    path = folder / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return sorted((r for r in rows if r.get("stage") == "rl"), key=lambda r: r["step"])


def curve(rows: list[dict], steps: list[int]) -> list[dict]:
    """Per step in ``steps``: cumulative training seconds (the :data:`TIME_FIELDS` of rows up to it)
    and cumulative scoring copies (:func:`step_copies`; None when a row that trained has none)."""
    out = []
    for k in steps:
        upto = [step_copies(r) for r in rows if r["step"] <= k]
        copies = None if None in upto else sum(upto)
        upto = [r for r in rows if r["step"] <= k]
        out.append({"step": k, "seconds": sum(r.get(f, 0.0) for r in upto for f in TIME_FIELDS), "copies": copies})
    return out
