"""The main job's report: the before/after table and the curves (``curves.png``).

Accuracies are percent with one decimal (:func:`dirl_min.evaluation.stats.format_percent`, shared with
``python -m dirl_min.eval``); avg@k carries its 95% bootstrap interval over problems.
"""

from __future__ import annotations

import json
from pathlib import Path

from dirl_min.evaluation.stats import format_percent

__all__ = ["running_mean", "format_table", "print_table", "plot_curves"]

STAGES = ("base", "sft", "rl")


def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start): ``[n] -> [n]``."""
    if window < 1:
        raise ValueError(f"running_mean: window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def format_table(head: list[str], rows: list[list[str]], *, rule: bool = False) -> list[str]:
    """The lines of a text table (the main job's and ``python -m dirl_min.eval``'s): each column as
    wide as its widest cell, the first left-aligned, the others right-aligned; ``rule`` puts a
    line of dashes under the header."""
    widths = [max([len(h), *(len(row[c]) for row in rows)]) for c, h in enumerate(head)]
    table = [head, *([["-" * w for w in widths]] if rule else []), *rows]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            for cells in table]


def print_table(summary: dict) -> str:
    """One row per evaluated stage; accuracies in percent, avg@k with ``[lo, hi]``, plus the
    paired RL − SFT gain when both stages ran."""
    k = summary.get("samples", 16)
    head = ["stage", f"avg@{k} [95% CI]", "greedy", f"pass@{k}", "tok/step", "length", "trunc %"]
    rows = []
    for stage in STAGES:
        if stage not in summary:
            continue
        r = summary[stage]
        ci = r.get("accuracy_ci")
        avg = format_percent(r["accuracy"]) + (f" [{format_percent(ci[0])}, {format_percent(ci[1])}]" if ci else "")
        rows.append([stage, avg, format_percent(r.get("greedy_accuracy", float("nan"))),
                     format_percent(r.get(f"pass@{k}", float("nan"))), f"{r['tokens_per_step']:.2f}",
                     f"{r['mean_length']:.1f}", format_percent(r["truncation_rate"])])
    lines = format_table(head, rows)
    gain = summary.get("rl_minus_sft")
    if gain:
        lines.append(f"RL - SFT avg@{k}: {100 * gain['mean']:+.1f} points "
                     f"[{100 * gain['ci'][0]:+.1f}, {100 * gain['ci'][1]:+.1f}] (paired bootstrap over problems)")
    return "\n".join(lines)


def _panel_curves(ax, rows, keys, title, window):
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if not pts:
            continue
        steps, vals = zip(*pts)
        line, = ax.plot(steps, vals, alpha=0.2, lw=0.8)
        ax.plot(steps, running_mean(list(vals), window), color=line.get_color(), label=f"{key} (running mean)")
    ax.set_title(title)
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:  # a stage that did not run has nothing to label
        ax.legend(fontsize=7)


def _panel_stages(ax, summary):
    """Accuracy (avg@k, %, with its bootstrap interval) against tokens per step, one point per stage."""
    for stage in STAGES:
        r = summary.get(stage)
        if not r:
            continue
        y = 100 * r["accuracy"]
        lo, hi = (100 * v for v in r.get("accuracy_ci", (r["accuracy"], r["accuracy"])))
        ax.errorbar([r["tokens_per_step"]], [y], yerr=[[y - lo], [hi - y]], marker="o", capsize=3, label=stage)
        ax.annotate(stage, (r["tokens_per_step"], y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("tokens per step")
    ax.set_ylabel(f"avg@{summary.get('samples', 16)} (%)")
    ax.set_title("held-out accuracy vs decoding speed")
    ax.grid(alpha=0.3)


def plot_curves(out: Path) -> None:
    """curves.png from ``metrics.jsonl`` and ``summary.json`` in ``out``, a 2 × 3 grid: SFT loss, DiPO
    reward/accuracy, DiPO loss; rollout tokens per step, kept-group fraction (logged interval means
    faint, their running mean solid: still noisy to read), and accuracy vs tokens per step per stage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    path = out / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().split("\n") if l.strip()] if path.exists() else []
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    sft = [r for r in rows if r["stage"] == "sft"]
    rl = [r for r in rows if r["stage"] == "rl"]
    fig = Figure(figsize=(15, 8.5), layout="constrained")  # readable at a glance: ~1650 × 935 pixels
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    for ax, data, keys, title in [(axes[0], sft, ["loss"], "SFT loss"),
                                  (axes[1], rl, ["reward", "accuracy"], "DiPO rollouts: reward / accuracy"),
                                  (axes[2], rl, ["loss"], "DiPO loss"),
                                  (axes[3], rl, ["tokens_per_step"], "tokens per step (rollouts)"),
                                  (axes[4], rl, ["kept_fraction"], "kept-group fraction")]:
        _panel_curves(ax, data, keys, title, window=max(1, len(data) // 8))
    _panel_stages(axes[5], summary)
    fig.savefig(out / "curves.png", dpi=110)
