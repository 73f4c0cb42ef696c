"""The results of ``python -m dirl_min.compare``: per-run points, the per-objective table
(text, Markdown, JSON) and the two-panel plot of held-out accuracy against training cost.

A point is one evaluated checkpoint of one run: ``{"step", "seconds", "copies", "accuracy",
"accuracy_ci", "greedy", "tokens_per_step"}`` (accuracies as fractions; ``seconds`` and ``copies``
cumulative from the start of RL, ``copies`` None when the run logged no ``score_copies``).
"""

from __future__ import annotations

import math
from pathlib import Path

from dirl_min.evaluation.stats import bootstrap_ci, format_percent, seeds_problems_bootstrap_ci
from dirl_min.evaluation.train_report import format_table

__all__ = ["step_copies", "point", "run_summary", "aggregate", "paired", "paired_rows", "table_rows", "text_table",
           "markdown", "plot"]

CI_NOTE = ("95% CI: percentile bootstrap over the held-out problems of each problem's accuracy averaged over "
           "seeds and samples (pooled over seeds; it covers problem sampling, not seed-to-seed spread: see min-max)")


PAIRED_NOTE = ("each seed: mean over problems of the per-problem accuracy difference, same problems and evaluation "
               "samples, 95% bootstrap over problems; all seeds: seeds and problems resampled together")


def point(evaluation: dict, at: dict) -> dict:
    """A point from :func:`dirl_min.comparison.runner.evaluate_checkpoint`'s answer and the
    cost ``at`` (``{"step", "seconds", "copies"}``)."""
    s, g = evaluation["sampled"], evaluation["greedy"]
    return {**at, "accuracy": s["accuracy"], "accuracy_ci": s["accuracy_ci"],
            "greedy": None if g is None else g["accuracy"], "tokens_per_step": s["tokens_per_step"]}


def step_copies(row: dict) -> float | None:
    """The noisy copies a step scored: its ``score_copies``; 0 for a step that kept no group (no
    ``loss``: nothing was scored); None for a trained step of a log without the field."""
    return row.get("score_copies", 0.0 if "loss" not in row else None)


def _mean(values: list) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def run_summary(rows: list[dict], points: list[dict], per_problem: list[float]) -> dict:
    """One RL run: its points, its final per-problem accuracies (float ``[problems]``), total
    training seconds, and per step the mean scoring copies and scoring seconds."""
    return {"points": points, "per_problem": per_problem, "steps_logged": len(rows),
            "train_seconds": points[-1]["seconds"],
            "copies_per_step": _mean([step_copies(r) for r in rows]),
            "scoring_seconds_per_step": _mean([r.get("time_scoring", 0.0) for r in rows])}


def aggregate(runs: list[dict]) -> dict:
    """One objective over its seeds' :func:`run_summary` s: means of the final numbers, the seeds'
    min and max final accuracy, and the pooled 95% interval (:data:`CI_NOTE`)."""
    finals = [r["points"][-1] for r in runs]
    pooled = [sum(v) / len(v) for v in zip(*(r["per_problem"] for r in runs))]
    return {"seeds": len(runs),
            "accuracy": _mean([f["accuracy"] for f in finals]),
            "accuracy_ci": list(bootstrap_ci(pooled)),
            "accuracy_min": min(f["accuracy"] for f in finals), "accuracy_max": max(f["accuracy"] for f in finals),
            "greedy": _mean([f["greedy"] for f in finals]),
            "tokens_per_step": _mean([f["tokens_per_step"] for f in finals]),
            "train_seconds": _mean([r["train_seconds"] for r in runs]),
            "copies_per_step": _mean([r["copies_per_step"] for r in runs]),
            "scoring_seconds_per_step": _mean([r["scoring_seconds_per_step"] for r in runs])}


def paired(start: list[float], runs: dict[str, list[dict]]) -> dict:
    """Paired differences of the final checkpoints, per objective and seed (same problems, same
    evaluation samples): against the SFT start and against the first objective's run of the same
    seed; ``"all"``: over the seeds, its interval resampling seeds and problems together.

    Args:
        start: the SFT start's per-problem accuracy (float ``[problems]``).
        runs: per objective, its seeds' :func:`run_summary` s (with ``seed``).

    Returns:
        ``{objective: {"vs_start": {seed | "all": {"mean", "ci"}}, "vs_<first>": {...}}}`` (no
        ``vs_<first>`` for the first objective itself).
    """
    first = next(iter(runs))
    ref = {r["seed"]: r["per_problem"] for r in runs[first]}
    out = {}
    for name, rs in runs.items():
        against = {"vs_start": {r["seed"]: start for r in rs}}
        if name != first:
            against[f"vs_{first}"] = {r["seed"]: ref[r["seed"]] for r in rs if r["seed"] in ref}
        out[name] = {}
        for key, base in against.items():
            diffs = {r["seed"]: [x - y for x, y in zip(r["per_problem"], base[r["seed"]])] for r in rs if r["seed"] in base}
            per_seed = {s: {"mean": sum(d) / len(d), "ci": list(bootstrap_ci(d))} for s, d in diffs.items()}
            if diffs:
                flat = [x for d in diffs.values() for x in d]
                per_seed["all"] = {"mean": sum(flat) / len(flat),
                                   "ci": list(seeds_problems_bootstrap_ci(list(diffs.values())))}
            out[name][key] = per_seed
    return out


def paired_rows(table: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of :func:`paired`'s table: one row per objective and comparison, one column per
    seed and one for all seeds (difference in points with its 95% interval)."""
    fmt = lambda d: f"{100 * d['mean']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"  # noqa: E731
    seeds = sorted({s for o in table.values() for c in o.values() for s in c if s != "all"})
    head = ["objective", "against", *[f"seed {s}" for s in seeds], "all seeds"]
    rows = [[name, key[3:], *[fmt(c[s]) if s in c else "-" for s in [*seeds, "all"]]]
            for name, o in table.items() for key, c in o.items()]
    return head, rows


def _num(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def table_rows(start: dict, table: dict[str, dict], samples: int) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the SFT start checkpoint, then one row per objective."""
    head = ["objective", "seeds", f"avg@{samples} %", "95% CI (pooled)", "seed min-max", "greedy %", "tok/step",
            "train s", "copies/step", "scoring s/step"]
    ci = start["accuracy_ci"]
    rows = [["sft (start)", "-", format_percent(start["accuracy"]),
             f"[{format_percent(ci[0])}, {format_percent(ci[1])}]", "-", format_percent(start["greedy"]),
             _num(start["tokens_per_step"], ".2f"), "-", "-", "-"]]
    for name, a in table.items():
        lo, hi = a["accuracy_ci"]
        rows.append([name, str(a["seeds"]), format_percent(a["accuracy"]),
                     f"[{format_percent(lo)}, {format_percent(hi)}]",
                     f"{format_percent(a['accuracy_min'])}-{format_percent(a['accuracy_max'])}",
                     format_percent(a["greedy"]), _num(a["tokens_per_step"], ".2f"), _num(a["train_seconds"], ".1f"),
                     _num(a["copies_per_step"], ".1f"), _num(a["scoring_seconds_per_step"], ".3f")])
    return head, rows


def text_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(format_table(head, rows, rule=True))


def _markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(head: list[str], rows: list[list[str]], note: str, paired_table: tuple | None = None) -> str:
    """A Markdown page: the table, the interval's meaning, the columns, the paired differences
    (``paired_table``: :func:`paired_rows`' header and rows), the picture."""
    extra = ["## Paired differences of the final checkpoints (points)", "", *_markdown_table(*paired_table), "",
             PAIRED_NOTE + ".", ""] if paired_table else []
    return "\n".join(["# Objectives compared", "", *_markdown_table(head, rows), "", note, "", CI_NOTE + ".", "",
                      "train s: RL training seconds (rollout + rewards + scoring + update, summed over steps); "
                      "copies/step: noisy copies scored per step; tok/step: tokens per denoising step of the "
                      "avg@k samples; final numbers are the last checkpoint's, means over seeds.", "", *extra,
                      "![accuracy against cost](compare.png)", ""])


def _band(runs: list[dict], key: str) -> tuple[list[float], list[float], list[float], list[float]] | None:
    """x (mean over seeds), y mean, y min, y max (percent) per checkpoint index; None without ``key``."""
    pts = [r["points"] for r in runs]
    n = min(len(p) for p in pts)
    if any(p[i][key] is None for p in pts for i in range(n)):
        return None
    ys = [[100 * p[i]["accuracy"] for p in pts] for i in range(n)]
    return ([sum(p[i][key] for p in pts) / len(pts) for i in range(n)], [sum(y) / len(y) for y in ys],
            [min(y) for y in ys], [max(y) for y in ys])


def plot(start: dict, runs: dict[str, list[dict]], path: Path, samples: int) -> Path:
    """Two panels, held-out avg@k (%) against cumulative training seconds and against cumulative
    scoring copies: per objective the mean over seeds, the min-max over seeds shaded; every line
    starts at the SFT checkpoint (0, its accuracy)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    y0 = 100 * start["accuracy"]
    for ax, key, label in zip(axes, ("seconds", "copies"), ("RL training seconds (cumulative)",
                                                          "noisy copies scored (cumulative)")):
        drawn = 0
        for name, seed_runs in runs.items():
            band = _band(seed_runs, key)
            if band is None:
                continue
            drawn += 1
            x, y, lo, hi = [0.0, *band[0]], [y0, *band[1]], [y0, *band[2]], [y0, *band[3]]
            line, = ax.plot(x, y, marker="o", label=f"{name} ({len(seed_runs)} seed{'s' * (len(seed_runs) > 1)})")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if not drawn:
            ax.text(0.5, 0.5, f"no run logged {'score_copies' if key == 'copies' else key}", ha="center",
                    transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out avg@{samples} (%)")
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    fig.suptitle("Objectives from one SFT checkpoint: mean over seeds, min-max shaded")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
