"""The results of an evaluation: the metrics of a (benchmark, threshold) run, the summary
table, and the plot of a threshold sweep.

Accuracies are percent with one decimal, in the same table layout as the main job's report
(:func:`dirl_min.evaluation.train_report.format_table`, :func:`dirl_min.evaluation.stats.format_percent`).
"""

from __future__ import annotations

from pathlib import Path

from dirl_min.evaluation.benchmarks import Benchmark
from dirl_min.evaluation.stats import avg_at_k, bootstrap_ci, format_percent, mean_pass_at_k, pass_ks
from dirl_min.evaluation.train_report import format_table

__all__ = ["run_metrics", "summarize", "plot_sweep"]


def run_metrics(b: Benchmark, thr: float, recs: list[dict], samples: int) -> dict:
    """One entry of ``results.json``'s ``runs``: the metrics of benchmark ``b`` at threshold ``thr``
    from its records ``recs`` (problem-major, ``samples`` per problem)."""
    n = len(b.problems)
    counts = [(samples, sum(recs[i * samples + j]["correct"] for j in range(samples))) for i in range(n)]
    tokens = sum(r["num_tokens"] for r in recs)
    steps = sum(r["num_steps"] for r in recs)
    secs = sum(r.get("decode_seconds", 0.0) for r in recs)
    m = len(recs)
    return {
        "benchmark": b.name,
        "threshold": thr,
        "source": b.source,
        "prompt_template": b.template,
        "problems": n,
        "samples": samples,
        "accuracy": avg_at_k(counts),
        "accuracy_ci": list(bootstrap_ci([c / n_ for n_, c in counts])),  # 95%, over problems
        f"avg@{samples}": avg_at_k(counts),
        "pass@k": {str(k): mean_pass_at_k(counts, k) for k in pass_ks(samples)},
        "tokens_per_step": sum(r["tokens_per_step"] for r in recs) / m,
        "tokens_per_step_pooled": tokens / max(1, steps),
        "mean_length": sum(r["length"] for r in recs) / m,
        "mean_generated_tokens": tokens / m,
        "truncation_rate": sum(r["truncated"] for r in recs) / m,
        "no_answer_rate": sum(r["extracted"] is None for r in recs) / m,
        "max_tokens_per_step": max(r["max_tokens_per_step"] for r in recs),
        "runtime": {"decode_seconds": secs, "tokens_per_second": tokens / secs if secs > 0 else None},
    }


def summarize(results: dict) -> str:
    """The summary table printed at the end of a run."""
    runs = results["runs"]
    if not runs:
        return "(nothing evaluated)"
    samples = runs[0]["samples"]
    kmax = max(int(k) for k in runs[0]["pass@k"])
    head = ["benchmark", "thr", "problems", f"avg@{samples}", "95% CI", f"pass@{kmax}", "tok/step", "length", "trunc %",
            "tok/s"]
    rows = []
    for r in runs:
        tps = r["runtime"]["tokens_per_second"]
        ci = r.get("accuracy_ci")
        rows.append([r["benchmark"], f"{r['threshold']:g}", str(r["problems"]), format_percent(r["accuracy"]),
                     f"[{format_percent(ci[0])}, {format_percent(ci[1])}]" if ci else "-",
                     format_percent(r["pass@k"][str(kmax)]), f"{r['tokens_per_step']:.2f}", f"{r['mean_length']:.1f}",
                     format_percent(r["truncation_rate"]), "-" if tps is None else f"{tps:.1f}"])
    return "\n".join(format_table(head, rows, rule=True))


def plot_sweep(runs: list[dict], path: Path) -> Path:
    """Accuracy (avg@k, %) against tokens per step, one line per benchmark, one labelled point per threshold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["benchmark"] for r in runs):
        pts = sorted((r["tokens_per_step"], 100 * r["accuracy"], r["threshold"]) for r in runs if r["benchmark"] == name)
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=name)
        for x, y, t in pts:
            ax.annotate(f"t={t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("tokens per step")
    ax.set_ylabel(f"accuracy (avg@{runs[0]['samples']}, %)")
    ax.set_title("Dynamic threshold sweep (labels: threshold)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
