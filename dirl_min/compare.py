"""``python -m dirl_min.compare``: the RL objectives side by side from one SFT checkpoint.

    python -m dirl_min.compare                                 # four objectives x three seeds (long)
    python -m dirl_min.compare --quick                         # plumbing only, under a minute
    python -m dirl_min.compare --objectives dipo,tracerl --seeds 0 --rl.steps 300
    python -m dirl_min.compare --recipe release --out runs/compare-release   # each release's own recipe
    python -m dirl_min.compare --diagnose --model runs/default/checkpoints/sft-final --out runs/diagnose

One SFT run (``<out>/sft``), then per objective and seed an RL run from its final checkpoint
(``<out>/<objective>/seed-<s>``, checkpoints every ``rl.steps // 4`` steps), every checkpoint
evaluated on the held-out split with ``dirl_min.eval`` on one evaluation seed (a paired
comparison). Prints a table and writes ``compare.md``, ``compare.json`` and ``compare.png``.
The work lives in :mod:`dirl_min.comparison.runner` and :mod:`dirl_min.comparison.summary`.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path

from dirl_min.comparison import runner as cmp
from dirl_min.comparison import summary as rep
from dirl_min.infra.atomic import atomic_write, folder_lock
from dirl_min.infra.errors import DirlError

#: --quick: tiny budgets, prepended to the given settings (which override them)
QUICK = ["--data.task_max_operand", "9", "--data.held_out", "40", "--sft.steps", "100", "--sft.batch_size", "8",
         "--sft.warmup_steps", "2", "--rl.steps", "4", "--rl.prompts_per_step", "2", "--rl.group_size", "4",
         "--rl.rewards", "{accuracy: 1.0, format: 0.5}", "--eval.samples", "2", "--eval.max_problems", "8",
         "--run.threads", "1"]

EPILOG = (
    "Every other option is a setting of python -m dirl_min.train (--section.name VALUE, or --config FILE), "
    "given to every run, e.g. --rl.steps 300 --eval.samples 8. The comparison sets run.out, run.seed, "
    "run.stages, run.save_every, run.log_every, run.keep_checkpoints (0: every checkpoint is evaluated) and rl.objective itself. The runs' own evaluations are cut to one "
    "sample of one problem (whatever eval.* says); each checkpoint is evaluated here with the eval.* and decode.* "
    "settings, so other eval.* settings redo evaluations, not runs.\n\n"
    "Rerunning into the same --out reuses finished runs and evaluations with equal settings and continues "
    "unfinished ones (a killed comparison resumes); runs with other settings are refused unless --overwrite.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dirl_min.compare", allow_abbrev=False, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train each RL objective from one SFT checkpoint with the same rollout budget and seeds, "
                    "evaluate every checkpoint on the held-out split (avg@k with 95% intervals, greedy, tokens "
                    "per step) and report accuracy against training seconds and scoring forwards.")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: runs/compare, with --diagnose: runs/diagnose)")
    p.add_argument("--objectives", default=",".join(cmp.OBJECTIVES), metavar="LIST",
                   help=f"comma-separated objectives among {', '.join(cmp.RECORDS)} "
                        f"(default: {','.join(cmp.OBJECTIVES)})")
    p.add_argument("--recipe", choices=cmp.RECIPES, default="shared",
                   help="shared (default): the same optimisation settings for every objective, so only the "
                        "likelihood estimate differs; release: each objective with its release's clip, KL and KL "
                        "reference, advantage scaling, loss mean, group filter and passes per batch (docs/method.md "
                        "§4.7; the learning rate stays shared, scaled to this model; given settings override)")
    p.add_argument("--seeds", default=None, metavar="LIST",
                   help="comma-separated training seeds (run.seed of the RL runs; default: 0,1,2, with --quick: 0)")
    p.add_argument("--eval-seed", type=int, default=0, metavar="N",
                   help="sampling seed of every evaluation (the same for all checkpoints; with --diagnose: of the "
                        "rollouts; default: 0)")
    p.add_argument("--quick", action="store_true",
                   help="tiny budgets (operands 0..9, SFT 100 steps, RL 4 steps of 2 prompts x 4 with a format reward "
                        "so that groups differ, 8 held-out problems x 2 samples; 1 seed): checks the plumbing, "
                        "measures nothing")
    p.add_argument("--overwrite", action="store_true", help="replace runs and evaluations made with other settings")
    p.add_argument("--diagnose", action="store_true",
                   help="instead of training: on --model, one batch of rl.prompts_per_step x rl.group_size rollouts, "
                        "each objective's log-prob gap to DiPO's exact log-probs (overall and by position in the "
                        "block), the cosine of its policy gradient to the exact one (same advantages and weighting) "
                        "and its spread over --draws draws of random views, and the copies scored; writes "
                        "diagnosis.json, diagnosis_batch.json and diagnosis.png in --out")
    p.add_argument("--model", metavar="CKPT", help="--diagnose: the checkpoint (e.g. <run>/checkpoints/sft-final)")
    p.add_argument("--draws", type=int, default=None, metavar="N",
                   help="--diagnose: draws of random views (default: 8, with --quick: 2)")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The comparison's options and the train settings for every run (checked here)."""
    parser = build_parser()
    args, settings = parser.parse_known_args(argv)
    args.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    bad = [o for o in args.objectives if o not in cmp.RECORDS]
    if bad or not args.objectives or len(set(args.objectives)) < len(args.objectives):
        parser.error(f"--objectives: expected distinct names among {', '.join(cmp.RECORDS)}, got {args.objectives}")
    try:
        args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) < len(args.seeds):
        parser.error(f"--seeds: expected distinct integers, got {args.seeds}")
    args.out = args.out or ("runs/diagnose" if args.diagnose else "runs/compare")
    if args.diagnose and not args.model:
        parser.error("--diagnose needs --model CKPT")
    args.draws = args.draws if args.draws is not None else (2 if args.quick else 8)
    if args.draws < 2:
        parser.error(f"--draws: expected an integer >= 2, got {args.draws}")
    settings = [*(QUICK if args.quick else []), *settings]
    try:
        args.cfg = cmp.check_settings(settings)
    except cmp.CompareError as e:
        parser.error(str(e))
    return args, settings


def _evaluate(run, args, tools) -> list[tuple[dict, list[float]]]:
    """``(point, per-problem accuracy)`` of each checkpoint of ``run``, by step."""
    cks = cmp.checkpoints_of(run, args.cfg)
    costs = cmp.curve(cmp.rl_rows(run.folder), [s for s, _ in cks])
    out = []
    for (_, ck), at in zip(cks, costs):
        print(f"compare: evaluating {run.name} {ck.name}", file=sys.stderr)
        ev = cmp.evaluate_checkpoint(ck, run.folder / "eval" / ck.name, args.cfg, tools, seed=args.eval_seed,
                                     overwrite=args.overwrite)
        out.append((rep.point(ev, {**at, "checkpoint": ck.name}), ev["per_problem"]))
    return out


def compare(args, settings: list[str], tools: cmp.Tools, stack: ExitStack | None = None) -> dict:
    """Plan (every refusal before any work), train, evaluate; returns compare.json's content.
    ``stack``: holds ``--out``'s lock from the end of the planning until it closes."""
    out = Path(args.out)
    plan = cmp.plan_runs(out, settings, args.objectives, args.seeds, args.cfg, args.recipe)
    actions = cmp.plan_actions(plan, args.overwrite)
    if stack is not None:
        stack.enter_context(folder_lock(out, "dirl_min.compare"))
    for run in plan:
        cmp.execute(run, actions[run.name], tools.train)
    (start, start_per_problem), = _evaluate(plan[0], args, tools)
    runs: dict[str, list[dict]] = {o: [] for o in args.objectives}
    for run in plan[1:]:
        pts = _evaluate(run, args, tools)
        rows = cmp.rl_rows(run.folder)
        runs[run.objective].append({"seed": run.seed, **rep.run_summary(rows, [p for p, _ in pts], pts[-1][1])})
    table = {o: rep.aggregate(rs) for o, rs in runs.items()}
    return {"settings": {"objectives": args.objectives, "recipe": args.recipe, "seeds": args.seeds,
                         "eval_seed": args.eval_seed,
                         "quick": args.quick, "train_settings": settings, "samples": args.cfg.eval.samples},
            "start": start, "table": table, "paired": rep.paired(start_per_problem, runs), "runs": runs,
            "start_per_problem": start_per_problem, "actions": actions}


def diagnose(args) -> dict:
    """``--diagnose``: the estimator table of :func:`dirl_min.comparison.diagnose.diagnose_checkpoint`."""
    from dirl_min.comparison import diagnose as dg

    try:
        table, info = dg.diagnose_checkpoint(args.cfg, args.model, args.out, draws=args.draws, seed=args.eval_seed)
    except (ValueError, OSError) as e:
        raise SystemExit(f"dirl_min.compare: error: {e}") from None
    print(dg.text_table(table))
    print(f"{info['responses']} responses ({info['tokens']} tokens, accuracy {info['accuracy']:.2f}) from "
          f"{info['checkpoint']}; exact = per-round rescoring, |exact - decoder| <= {info['decoder_gap']:.1e}")
    print(f"outputs in {args.out}/ (diagnosis.json, diagnosis_batch.json, diagnosis.png)", file=sys.stderr)
    return {"table": table, "batch": info}


def main(argv=None) -> dict:
    args, settings = parse_args(argv)
    if args.diagnose:
        return diagnose(args)
    from dirl_min import eval as eval_face, train

    tools = cmp.Tools(train=lambda a: train.main(a), eval_config=eval_face.parse_config)
    with ExitStack() as stack:  # one comparison per --out: its lock is held until the outputs are written
        try:
            result = compare(args, settings, tools, stack)
        except DirlError as e:
            raise SystemExit(f"dirl_min.compare: error: {e}") from None
        _write(args, argv, result)
    return result


def _write(args, argv, result: dict) -> None:
    """compare.json, compare.md, compare.png and the table."""
    out, k = Path(args.out), args.cfg.eval.samples
    head, rows = rep.table_rows(result["start"], result["table"], k)
    note = f"python -m dirl_min.compare {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    atomic_write(out / "compare.json", json.dumps(result, indent=2) + "\n")
    phead, prows = rep.paired_rows(result["paired"])
    atomic_write(out / "compare.md", rep.markdown(head, rows, f"Command: `{note}`", (phead, prows)))
    rep.plot(result["start"], result["runs"], out / "compare.png", k)
    print(rep.text_table(head, rows))
    print(rep.CI_NOTE)
    print(f"\npaired differences of the final checkpoints (points; {rep.PAIRED_NOTE}):")
    print(rep.text_table(phead, prows))
    print(f"outputs in {out}/ (compare.md, compare.json, compare.png)", file=sys.stderr)


if __name__ == "__main__":
    main()
